"""Bad input to the figures (viz) and the mask scores (metrics): one clear library error, checked
before any drawing, no figure left open, no file (or temporary) left behind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from naflow_fx import LayerMaps, viz  # noqa: E402
from naflow_fx.errors import InputError, InputTypeError  # noqa: E402
from naflow_fx.metrics import energy_on_mask, mask_energy  # noqa: E402
from naflow_fx.viz import atomic_savefig, flow_gif, flow_grid, overlay  # noqa: E402


def _res(batch: int = 2, layers=("a", "b"), method: str = "naflow", classes: bool = False) -> LayerMaps:
    g = torch.Generator().manual_seed(0)
    maps = {n: torch.rand(batch, 4, 4, generator=g) for n in layers}
    cls = torch.zeros(1, dtype=torch.long) if classes else None  # one class for the whole batch: wrong
    return LayerMaps(list(layers), maps, torch.zeros(batch, 3), torch.zeros(batch), cls, (8, 8), method)


def _images(batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def no_figure_left_open():
    """Every test here: the figures open afterwards are the ones open before (none leaked)."""
    before = plt.get_fignums()
    yield
    leaked = [n for n in plt.get_fignums() if n not in before]
    for n in leaked:
        plt.close(n)
    assert not leaked, f"{len(leaked)} matplotlib figure(s) left open"


# ------------------------------------------------------------------------------------------- flow_grid

GRID_ERRORS = {
    "empty results": (dict(results=[]), InputError, "results is empty"),
    "results not LayerMaps": (dict(results=[{"a": 1}]), InputTypeError, r"results\[0\] must be a LayerMaps"),
    "batch mismatch": (dict(images=_images(3)), InputError, "3 images but the result has 2 maps"),
    "3-D images": (dict(images=_images(1)[0]), InputError, r"got shape \(3, 8, 8\).*unsqueeze\(0\)"),
    "4-channel images": (dict(images=_images(2, 4)), InputError, r"1 \(grey\) or 3 \(RGB\) channels.*images\[:, :3\]"),
    "NaN images": (dict(images=torch.full((2, 3, 8, 8), float("nan"))), InputError, "NaN or Inf"),
    "short row_labels": (dict(results=[_res(), _res()], row_labels=["x"]), InputError, "1 label.* for 2 result"),
    "row_labels str": (dict(row_labels="NAFlow"), InputTypeError, "row_labels must be a list"),
    "unknown layer": (dict(layers=["a", "zz"]), InputError, r"unknown layer\(s\) \['zz'\].*\['a', 'b'\]"),
    "layers str": (dict(layers="a"), InputTypeError, r"use \['a'\]"),
    "layer missing in 2nd result": (
        dict(results=[_res(), _res(layers=("a",), method="gradcam")]),
        InputError,
        r"\['b'\] for results\[1\] \(gradcam\)",
    ),
    "classes mismatch": (dict(results=_res(classes=True)), InputError, "1 classes for 2 images"),
    "unknown cmap": (dict(cmap="infernoo"), InputError, "unknown cmap 'infernoo'"),
    "dpi 0": (dict(dpi=0), InputError, "dpi must be > 0, got 0"),
    "dpi negative": (dict(dpi=-5), InputError, "dpi must be > 0"),
    "dpi str": (dict(dpi="150"), InputTypeError, "dpi must be a number"),
    "cell 0": (dict(cell=0), InputError, "cell must be > 0"),
    "alpha 2": (dict(alpha=2.0), InputError, "alpha must be >= 0 and <= 1"),
}


@pytest.mark.parametrize("case", list(GRID_ERRORS), ids=list(GRID_ERRORS))
def test_flow_grid_rejects_bad_input_clearly_without_leaking_a_figure(case, tmp_path):
    change, exc, match = GRID_ERRORS[case]
    args = dict(images=_images(), results=_res(), path=tmp_path / "grid.png")
    args.update(change)
    with pytest.raises(exc, match=match) as info:
        flow_grid(args.pop("images"), args.pop("results"), args.pop("path"), **args)
    assert str(info.value).startswith("flow_grid: ")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_flow_grid_without_a_path_closes_its_figure_on_error():
    before = plt.get_fignums()
    with pytest.raises(InputError, match="unknown cmap"):
        flow_grid(_images(), _res(), None, cmap="nope")
    assert plt.get_fignums() == before


def test_flow_grid_closes_its_figure_when_saving_fails(tmp_path):
    (tmp_path / "file").write_text("x")
    before = plt.get_fignums()
    with pytest.raises(OSError):  # the folder is a file: the write fails after the drawing
        flow_grid(_images(), _res(), tmp_path / "file" / "grid.png", dpi=20)
    assert plt.get_fignums() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_flow_grid_unsupported_extension_names_the_path_before_any_drawing(tmp_path, monkeypatch):
    def no_drawing(*args, **kwargs):
        raise AssertionError("drew before checking the path")

    monkeypatch.setattr(viz, "overlay", no_drawing)
    path = tmp_path / "grid.pgn"
    with pytest.raises(InputError, match="not a supported format") as info:
        flow_grid(_images(), _res(), path)
    msg = str(info.value)
    assert repr(str(path)) in msg and ".png" in msg and ".pdf" in msg
    assert list(tmp_path.iterdir()) == []


def test_flow_grid_path_without_extension_writes_a_png_there(tmp_path):
    path = tmp_path / "grid"
    flow_grid(_images(), _res(), path, dpi=20)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grid"]  # exactly there, no temporary left


def test_flow_grid_path_that_is_a_folder_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(viz, "overlay", lambda *a, **k: pytest.fail("drew before checking the path"))
    with pytest.raises(InputError, match="is a folder"):
        flow_grid(_images(), _res(), tmp_path)


def test_atomic_savefig_defaults_to_png_and_rejects_unknown_extensions(tmp_path):
    fig = plt.figure(figsize=(1, 1))
    try:
        atomic_savefig(fig, tmp_path / "fig", dpi=10)
        assert (tmp_path / "fig").read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(InputError, match=r"'\.xyz' is not a supported format"):
            atomic_savefig(fig, tmp_path / "fig.xyz", dpi=10)
    finally:
        plt.close(fig)
    assert [p.name for p in tmp_path.iterdir()] == ["fig"]


# -------------------------------------------------------------------------------------------- flow_gif

GIF_ERRORS = {
    "size 0": (dict(size=0), InputError, "size must be a positive number of pixels"),
    "size negative": (dict(size=-4), InputError, "size must be a positive number of pixels"),
    "size float": (dict(size=8.5), InputTypeError, "size must be an int"),
    "3-D images": (dict(images=_images(1)[0]), InputError, r"got shape \(3, 8, 8\).*unsqueeze\(0\)"),
    "4-channel images": (dict(images=_images(2, 4)), InputError, r"images\[:, :3\]"),
    "batch mismatch": (dict(images=_images(3)), InputError, "3 images but the result has 2 maps"),
    "unknown layer": (dict(layers=["zz"]), InputError, r"unknown layer\(s\) \['zz'\]"),
    "no layers": (dict(layers=[]), InputError, "at least one layer"),
    "result not LayerMaps": (dict(result=[_res()]), InputTypeError, "result must be a LayerMaps"),
    "unknown cmap": (dict(cmap="nope"), InputError, "unknown cmap"),
    "alpha 2": (dict(alpha=2), InputError, "alpha must be >= 0 and <= 1"),
    "NaN images": (dict(images=torch.full((2, 3, 8, 8), float("nan"))), InputError, "NaN or Inf"),
    "NaN map": (dict(result=_res(layers=("a",))), InputError, "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(GIF_ERRORS), ids=list(GIF_ERRORS))
def test_flow_gif_rejects_bad_input_clearly(case, tmp_path):
    change, exc, match = GIF_ERRORS[case]
    args = dict(images=_images(), result=_res(), path=tmp_path / "flow.gif", size=8)
    args.update(change)
    if case == "NaN map":
        args["result"].maps["a"][0, 0, 0] = float("nan")
    with pytest.raises(exc, match=match):
        flow_gif(args.pop("images"), args.pop("result"), args.pop("path"), **args)
    assert list(tmp_path.iterdir()) == []


def test_flow_gif_path_that_is_a_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        flow_gif(_images(), _res(), tmp_path, size=8)


# --------------------------------------------------------------------------------------------- overlay


@pytest.mark.parametrize(
    "image, heatmap, kwargs, exc, match",
    [
        (torch.rand(4, 8, 8), torch.rand(4, 4), {}, InputError, r"image\[:3\]"),
        (torch.rand(2, 3, 8, 8), torch.rand(4, 4), {}, InputError, r"images\[0\]"),
        (torch.rand(3, 8, 8), torch.rand(1, 4, 4), {}, InputError, r"heatmap must be one real map.*maps\[name\]\[0\]"),
        (torch.rand(3, 8, 8), torch.rand(4, 4), {"cmap": "nope"}, InputError, "unknown cmap 'nope'"),
        (torch.rand(3, 8, 8), torch.rand(4, 4), {"alpha": -0.1}, InputError, "alpha must be >= 0"),
        (torch.rand(3, 8, 8), torch.rand(4, 4), {"alpha": "0.5"}, InputTypeError, "alpha must be a number"),
        (torch.rand(3, 0, 8), torch.rand(4, 4), {}, InputError, "non-empty"),
        (torch.full((3, 8, 8), float("inf")), torch.rand(4, 4), {}, InputError, "NaN or Inf"),
        (torch.rand(3, 8, 8), torch.full((4, 4), float("nan")), {}, InputError, "NaN or Inf"),
        ([[0.0]], torch.rand(4, 4), {}, InputTypeError, "image must be a torch.Tensor"),
    ],
    ids=["rgba", "batch", "3-D heatmap", "cmap", "alpha<0", "alpha str", "empty", "inf image", "nan heatmap", "list"],
)
def test_overlay_rejects_bad_input_clearly(image, heatmap, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        overlay(image, heatmap, **kwargs)


def test_overlay_keeps_accepting_grey_and_channels_last_images_but_not_rgba():
    heat = torch.rand(4, 4)
    assert overlay(torch.rand(8, 8), heat).shape == (8, 8, 3)  # [H, W]
    assert overlay(torch.rand(1, 8, 8), heat).shape == (8, 8, 3)  # grey [1, H, W]
    assert overlay(torch.rand(8, 6, 3), heat).shape == (8, 6, 3)  # channels last, as before
    with pytest.raises(InputError):
        overlay(torch.rand(4, 8, 8), heat)


# ------------------------------------------------------------------------------------------- metrics


def _mask(batch: int = 2) -> torch.Tensor:
    m = torch.zeros(batch, 8, 8, dtype=torch.bool)
    m[:, :, 4:] = True
    return m


def test_energy_on_mask_takes_a_channel_mask_like_a_plain_one():
    res = _res()
    plain = energy_on_mask(res, _mask())
    channel = energy_on_mask(res, _mask()[:, None])
    soft = energy_on_mask(res, _mask()[:, None].float())
    for name in res.layers:
        assert torch.allclose(channel[name], plain[name]) and torch.allclose(soft[name], plain[name])
        assert float(channel[name].max()) <= 1.0


@pytest.mark.parametrize(
    "masks, exc, match",
    [
        (_mask().float() * 255, InputError, r"got values in \[0, 255\].*masks > 127"),
        (_mask().float() - 0.5, InputError, r"in \[0, 1\], got values in \[-0.5, 0.5\]"),
        (torch.full((2, 8, 8), float("nan")), InputError, "NaN or Inf"),
        (_mask(3), InputError, "3 masks but result has 2 maps"),
        (_mask(1)[0], InputError, r"\[B, H, W\] or \[B, 1, H, W\].*unsqueeze\(0\)"),
        (_mask()[:, None].expand(2, 3, 8, 8), InputError, r"got shape \(2, 3, 8, 8\)"),
        (torch.zeros(0, 8, 8), InputError, "masks is empty"),
        (_mask().numpy(), InputTypeError, "masks must be a torch.Tensor"),
    ],
    ids=["0-255", "negative", "nan", "batch", "2-D", "3 channels", "empty", "numpy"],
)
def test_energy_on_mask_rejects_bad_masks_clearly(masks, exc, match):
    with pytest.raises(exc, match=match):
        energy_on_mask(_res(), masks)


def test_energy_on_mask_rejects_a_result_that_is_not_layer_maps_or_has_nan_maps():
    with pytest.raises(InputTypeError, match="result must be a LayerMaps"):
        energy_on_mask({"a": torch.rand(2, 4, 4)}, _mask())
    res = _res()
    res.maps["b"][1] = float("nan")
    with pytest.raises(InputError, match=r"layer 'b'.*NaN or Inf"):
        energy_on_mask(res, _mask())


def test_mask_energy_checks_results_labels_and_masks():
    with pytest.raises(InputError, match="results is empty"):
        mask_energy([], _mask())
    with pytest.raises(InputError, match="labels has 1 entries for 2 results"):
        mask_energy([_res(), _res()], _mask(), labels=["x"])
    with pytest.raises(InputError, match=r"results\[1\] \(gradcam\) has no map for layer\(s\) \['b'\]"):
        mask_energy([_res(), _res(layers=("a",), method="gradcam")], _mask())
    with pytest.raises(InputError, match="3 masks"):
        mask_energy([_res()], _mask(3))
    table = mask_energy(_res(), _mask()[:, None].float())  # one result; a [B, 1, H, W] mask
    assert table.splitlines()[-1].split()[-1] == "0.50"  # the mask's area, right half

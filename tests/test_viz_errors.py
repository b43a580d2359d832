"""Bad input to the figures (viz) and the mask scores (metrics): one clear library error, checked
before any drawing, no figure left open, no file (or temporary) left behind."""

from __future__ import annotations

import errno
import os
import tempfile

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import naflow_fx.result
from naflow_fx import LayerMaps, viz
from naflow_fx.errors import InputError, InputTypeError
from naflow_fx.metrics import energy_on_mask, mask_energy
from naflow_fx.viz import atomic_savefig, flow_gif, flow_grid, overlay, short_layer_name, spread_layers


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


def test_flow_grid_closes_its_figure_when_saving_fails(tmp_path, monkeypatch):
    def full_disk(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")  # half-written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    before = plt.get_fignums()
    path = tmp_path / "grid.png"
    with pytest.raises(OSError) as info:  # the write fails after the drawing: an OSError naming the user's file
        flow_grid(_images(), _res(), path, dpi=20)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "cannot write the figure" in str(info.value)
    assert plt.get_fignums() == before
    assert list(tmp_path.iterdir()) == []  # no half-written figure, no temporary


# ----------------------------------------------------------------------------- output paths of every writer
# flow_grid (in every figure format), atomic_savefig and flow_gif: a path under a file, or in a folder
# that cannot be written, is one InputError naming the user's path, checked before any drawing where
# it can be, and nothing (not even a temporary) is left behind.


def _write_grid(path, fmt="png"):
    return flow_grid(_images(), _res(), path.with_suffix("." + fmt) if fmt else path, dpi=20)


def _write_savefig(path):
    fig = plt.figure(figsize=(1, 1))
    try:
        atomic_savefig(fig, path, dpi=10)
    finally:
        plt.close(fig)


WRITERS = {
    "grid png": (lambda p: _write_grid(p, "png"), "flow_grid"),
    "grid pdf": (lambda p: _write_grid(p, "pdf"), "flow_grid"),
    "grid svg": (lambda p: _write_grid(p, "svg"), "flow_grid"),
    "grid jpg": (lambda p: _write_grid(p, "jpg"), "flow_grid"),
    "grid no extension": (lambda p: _write_grid(p, ""), "flow_grid"),
    "gif": (lambda p: flow_gif(_images(), _res(), p.with_suffix(".gif"), size=8), "flow_gif"),
    "atomic_savefig": (_write_savefig, "atomic_savefig"),
}


@pytest.mark.parametrize("writer", list(WRITERS), ids=list(WRITERS))
@pytest.mark.parametrize("deeper", [False, True], ids=["file/out", "file/sub/out"])
def test_a_path_under_a_file_is_an_input_error_before_any_drawing(writer, deeper, tmp_path, monkeypatch):
    write, fn = WRITERS[writer]
    monkeypatch.setattr(viz, "overlay", lambda *a, **k: pytest.fail("drew before checking the path"))
    (tmp_path / "notadir").write_text("x")
    path = tmp_path / "notadir" / ("sub" if deeper else "") / "out"
    with pytest.raises(InputError, match=f"^{fn}: cannot write .*: {tmp_path / 'notadir'} is a file, not a folder"):
        write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notadir"]


@pytest.mark.parametrize("writer", list(WRITERS), ids=list(WRITERS))
@pytest.mark.parametrize(
    "code, why", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")], ids=["EACCES", "EROFS"]
)
def test_a_folder_that_cannot_be_written_is_an_input_error_naming_the_users_file(
    writer, code, why, tmp_path, monkeypatch
):
    # as root chmod does not make a folder read-only: the temporary file beside the output fails as it would
    def refuse(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), os.path.join(dir, ".out.hidden123"))

    write, fn = WRITERS[writer]
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match=f"^{fn}: cannot write {tmp_path / 'out'}.*: {why} in {tmp_path}; ") as info:
        write(tmp_path / "out")
    assert ".hidden" not in str(info.value) and info.value.__cause__ is None
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_created_is_an_input_error_naming_the_existing_parent(tmp_path, monkeypatch):
    def refuse(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(os, "makedirs", refuse)
    for write, fn in (WRITERS["grid png"], WRITERS["gif"]):
        with pytest.raises(InputError, match=f"^{fn}: cannot write .*: permission denied in {tmp_path}; choose"):
            write(tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_an_input_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match=f"^flow_gif: cannot write {ro / 'f.gif'}: permission denied in {ro}"):
            flow_gif(_images(), _res(), ro / "f.gif", size=8)
        with pytest.raises(InputError, match="^flow_grid: cannot write .*: permission denied"):
            flow_grid(_images(), _res(), ro / "grid.png", dpi=20)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_full_disk_while_writing_the_gif_stays_an_os_error_naming_the_users_file(tmp_path, monkeypatch):
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    path = tmp_path / "f.gif"
    with pytest.raises(OSError) as info:
        flow_gif(_images(), _res(), path, size=8)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "cannot write the GIF" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- figure sizes and memory


@pytest.fixture
def one_gib_free(monkeypatch):
    monkeypatch.setattr(naflow_fx.result, "free_bytes", lambda device: 2**30)


def test_a_huge_grid_cell_is_an_input_error_saying_the_memory_before_allocating(tmp_path, monkeypatch, one_gib_free):
    monkeypatch.setattr(plt, "figure", lambda *a, **k: pytest.fail("made the figure before checking its size"))
    with pytest.raises(InputError) as info:
        flow_grid(_images(), [_res()], tmp_path / "g.png", cell=1000)
    msg = str(info.value)
    assert msg.startswith("flow_grid: a figure of 2×3 cells of 1000 inches at dpi 150 would need ")
    assert "GiB, but 1 GiB are free on cpu: pass a smaller cell" in msg and "lower dpi" in msg
    with pytest.raises(InputError, match="would need .* GiB, but 1 GiB are free"):
        flow_grid(_images(), [_res()], tmp_path / "g.png", dpi=100_000)
    with pytest.raises(InputError, match="at dpi 100 would need"):  # not saved: drawn at the figure's dpi
        flow_grid(_images(), [_res()], None, cell=1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="the free memory is read from /proc/meminfo")
def test_a_huge_grid_cell_is_refused_by_the_real_memory_check_too(tmp_path):
    with pytest.raises(InputError, match=r"^flow_grid: .* GiB.*pass a smaller cell"):  # terabytes, on any machine
        flow_grid(_images(), [_res()], tmp_path / "g.png", cell=1000)


def test_a_grid_beyond_matplotlibs_pixel_limit_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(naflow_fx.result, "free_bytes", lambda device: 2**80)  # memory is no limit
    with pytest.raises(InputError, match=r"would be \d+×\d+ pixels and .* GiB of memory, but matplotlib draws at most"):
        flow_grid(_images(), [_res()], tmp_path / "g.png", cell=30_000)
    with pytest.raises(InputError, match=r"at dpi 1e\+07 would be .* pixels.*smaller cell"):
        flow_grid(_images(), [_res()], tmp_path / "g.png", dpi=1e7)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_gif_size_is_an_input_error_before_allocating(tmp_path, monkeypatch, one_gib_free):
    def no_resizing(*args, **kwargs):
        raise AssertionError("allocated the frames before checking their size")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resizing)
    with pytest.raises(InputError) as info:  # the audit's case: beyond a GIF's 65535 pixels per side
        flow_gif(_images(), _res(), tmp_path / "a.gif", size=100_000)
    msg = str(info.value)
    assert msg.startswith("flow_gif: 2 frame(s) of 2 image(s) of 100000×100000 pixels would be 200000×100014 pixels")
    assert "GiB of memory, but a GIF has at most 65535 pixels per side: pass a smaller size" in msg
    assert "at most 32767 here" in msg
    with pytest.raises(InputError, match=r"would need .* GiB, but 1 GiB are free on cpu: pass a smaller size"):
        flow_gif(_images(), _res(), tmp_path / "a.gif", size=20_000)  # a valid GIF, but not in 1 GiB
    assert list(tmp_path.iterdir()) == []


def test_when_free_memory_is_unknown_a_failed_allocation_is_still_an_input_error(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(naflow_fx.result, "free_bytes", lambda device: None)
    monkeypatch.setattr(viz, "overlay", out_of_memory)
    with pytest.raises(InputError, match=r"^flow_grid: .* would need about .* GiB, more than can be allocated: pass"):
        flow_grid(_images(), [_res()], tmp_path / "g.png", dpi=20)
    with pytest.raises(InputError, match=r"^flow_gif: .* would need about .* GiB, more than can be allocated: pass"):
        flow_gif(_images(), _res(), tmp_path / "a.gif", size=8)
    monkeypatch.setattr(viz, "overlay", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not every RuntimeError is an allocation
        flow_gif(_images(), _res(), tmp_path / "a.gif", size=8)
    assert list(tmp_path.iterdir()) == []


def test_ordinary_sizes_are_not_refused(monkeypatch):
    """8 images of 224 pixels, 20 layers: the default cell and dpi, cell=2, a 200-pixel GIF fit in 2 GiB."""
    monkeypatch.setattr(naflow_fx.result, "free_bytes", lambda device: 2 * 2**30)
    for fmt in ("png", "pdf", None):
        viz._check_grid_room(8, 21, 1.15, 150, fmt, (224, 224), "flow_grid")
        viz._check_grid_room(8, 21, 2.0, 150, fmt, (224, 224), "flow_grid")
    viz._check_gif_room(8, 20, 200, "flow_gif")
    viz._check_gif_room(8, 20, 192, "flow_gif")


def test_a_grid_and_a_gif_of_8_images_and_20_layers_are_written(tmp_path):
    layers = tuple(f"layer{i}.0.conv1" for i in range(20))
    images, res = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(2)), _res(8, layers)
    flow_grid(images, res, tmp_path / "g.png", cell=0.3, dpi=30)
    flow_gif(images, res, tmp_path / "a.gif", size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "g.png"]


# ----------------------------------------------------------------------------------------- column titles


def test_short_layer_name_is_unchanged_without_others_or_collisions():
    assert short_layer_name("features.10") == "f.10"
    assert short_layer_name("layer1.0.conv1") == "l1.0.conv1"
    assert short_layer_name("layer2.0.downsample.0") == "…downsample.0"  # whole parts: not "….downsample.0"
    assert short_layer_name("model.layer1.0.relu#2") == "…l1.0.relu#2"  # not "…l.l1.0.relu#2"
    assert short_layer_name("block.verylongmodulename_conv", width=10) == "…name_conv"  # no part fits: characters
    names = ["layer1.0.conv1", "layer2.0.downsample.0", "fc"]  # no two short names alike
    assert [short_layer_name(n, others=names) for n in names] == ["l1.0.conv1", "…downsample.0", "fc"]


def test_short_layer_name_lengthens_colliding_names_until_they_differ():
    names = ["layer2.0.downsample.0", "layer4.0.downsample.0", "layer4.1.downsample.0", "layer3.1.conv2"]
    titles = [short_layer_name(n, others=names) for n in names]
    assert titles == ["l2.0.downsample.0", "l4.0.downsample.0", "…1.downsample.0", "l3.1.conv2"]
    deep = ["encoder.blocks.0.attention.output.dense", "decoder.blocks.0.attention.output.dense"]
    assert [short_layer_name(n, others=deep) for n in deep] == [
        "encoder.blocks.0.attention.output.dense",
        "decoder.blocks.0.attention.output.dense",
    ]
    same_short = ["layer1", "l1"]  # both abbreviate to "l1": the full names
    assert [short_layer_name(n, others=same_short) for n in same_short] == ["layer1", "l1"]


def test_short_layer_name_titles_of_one_figure_are_always_unique():
    import random

    rng = random.Random(0)
    parts = ["layer1", "layer2", "0", "1", "10", "downsample", "conv1", "features", "attn", "proj", "l1", "f"]
    for _ in range(500):
        names = list({".".join(rng.choices(parts, k=rng.randint(1, 6))) for _ in range(rng.randint(2, 8))})
        titles = viz._column_titles(names)
        assert len(set(titles)) == len(names), names
        for name, title in zip(names, titles):  # a usual title no other name shares is kept
            usual = short_layer_name(name)
            if [short_layer_name(n) for n in names].count(usual) == 1:
                assert title == usual


def test_flow_grid_columns_carry_unique_titles(tmp_path):
    layers = ("layer2.0.downsample.0", "layer4.0.downsample.0", "fc")
    fig = flow_grid(_images(), _res(layers=layers), None)
    try:
        titles = [ax.get_title() for ax in fig.axes[: len(layers) + 1]]
    finally:
        plt.close(fig)
    assert titles == ["input", "l2.0.downsample.0", "l4.0.downsample.0", "fc"]


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


# ------------------------------------------------------------------ targets that are not plain files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("writer", ["grid", "gif"])
def test_a_pipe_as_the_target_is_refused_not_replaced(writer, tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match=f"flow_{writer}: cannot write .*pipe.png: it is a pipe, not a regular file"):
        if writer == "grid":
            flow_grid(_images(), _res(), pipe)
        else:
            flow_gif(_images(), _res(), pipe)
    assert os.path.exists(pipe) and not os.path.isfile(pipe)  # still the FIFO
    assert sorted(os.listdir(tmp_path)) == ["pipe.png"]


def test_a_symbolic_link_as_the_target_writes_through_it(tmp_path):
    (tmp_path / "figures").mkdir()
    real = tmp_path / "figures" / "grid.png"
    real.write_bytes(b"old")
    link = tmp_path / "grid.png"
    try:
        link.symlink_to(real)
    except OSError:  # Windows without the right to make symbolic links
        pytest.skip("cannot make symbolic links here")
    flow_grid(_images(), _res(), link, dpi=50)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "figures")) == ["grid.png"]  # no temporary left beside the target


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_file_is_refused_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "flow.gif"
    target.write_bytes(b"keep")
    target.chmod(0o444)
    if os.geteuid() == 0:  # root may write any file: what the check sees for other users
        monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK or not str(path).endswith("flow.gif"))
    with pytest.raises(InputError, match="flow_gif: cannot write .*the file is read-only"):
        flow_gif(_images(), _res(), target)
    assert target.read_bytes() == b"keep"


def test_a_path_ending_with_a_separator_names_a_folder(tmp_path):
    with pytest.raises(InputError, match="ends with a separator, so it names a folder"):
        flow_grid(_images(), _res(), str(tmp_path / "new") + os.sep)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ what the figures show


def test_flow_grid_leaves_the_users_matplotlib_backend_alone(tmp_path):
    matplotlib.use("pdf")
    try:
        flow_grid(_images(), _res(), tmp_path / "grid.png", dpi=50)
        assert matplotlib.get_backend().lower() == "pdf"
    finally:
        matplotlib.use("Agg")


def test_images_in_0_1_are_shown_as_they_are_and_others_scaled():
    grey = torch.full((1, 4, 4), 0.2)
    grey[:, :2] = 0.5
    shown = viz._image_to_numpy(grey)
    assert shown.shape == (4, 4, 3) and sorted(set(shown.ravel().round(6).tolist())) == pytest.approx([0.2, 0.5])
    assert viz._image_to_numpy(torch.full((3, 2, 2), 51, dtype=torch.uint8)).max() == pytest.approx(0.2)
    normalised = torch.linspace(-2, 2, 48).reshape(3, 4, 4)
    shown = viz._image_to_numpy(normalised)
    assert shown.min() == 0 and shown.max() == 1


def test_images_of_another_shape_than_the_inputs_are_refused(tmp_path):
    wide = torch.rand(2, 3, 8, 16)
    for call in (lambda: flow_grid(wide, _res()), lambda: flow_gif(wide, _res(), tmp_path / "f.gif")):
        with pytest.raises(InputError, match=r"the images are 8×16 but the result was computed for 8×8 inputs"):
            call()
    fig = flow_grid(torch.rand(2, 3, 32, 32), _res())  # the same images at another size: fine
    plt.close(fig)


def test_flow_gif_keeps_the_images_shape(tmp_path):
    from PIL import Image

    res = _res()
    res.input_size = (8, 16)
    gif = flow_gif(torch.rand(2, 3, 8, 16), res, tmp_path / "wide.gif", size=32)
    assert Image.open(gif).size == (2 * 32, 16 + viz._GIF_HEADER)


def test_layer_titles_abbreviate_whole_parts_and_wrap_to_the_cell(tmp_path):
    assert short_layer_name("features.denseblock2.denselayer16.conv2", width=60) == "f.denseblock2.denselayer16.conv2"
    assert short_layer_name("player1.conv", width=60) == "player1.conv"
    assert short_layer_name("encoder.layers.0", width=60) == "encoder.layers.0"
    assert short_layer_name("layer3.1.conv2") == "l3.1.conv2"
    wrapped = viz._wrap("features.denseblock4.denselayer16.conv2", 23, 3, ".")
    assert wrapped.split("\n") == ["features.denseblock4.", "denselayer16.conv2"]
    assert viz._wrap("a" * 50, 10, 3, ".").split("\n") == ["a" * 10, "a" * 10, "a" * 9 + "…"]
    names = ["a$b^$", "c.d"]  # mathtext characters are shown literally
    fig = flow_grid(_images(), _res(layers=names), tmp_path / "dollar.png", cell=3, dpi=30)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["input", r"a\$b^\$", "c.d"]
    assert fig.axes[1].title.get_fontsize() > 6  # the font grows with the cell


def test_more_figure_arguments_are_checked(tmp_path):
    with pytest.raises(InputError, match="dpi=0.01 draws each image on 0.011 pixels"):
        flow_grid(_images(), _res(), tmp_path / "g.png", dpi=0.01)
    with pytest.raises(InputError, match="duration must be >= 0 and <= 218450"):
        flow_gif(_images(), _res(), tmp_path / "f.gif", duration=10**9)
    with pytest.raises(InputTypeError, match=r"layers must be layer names \(str\), got list \[1\]"):
        flow_grid(_images(), _res(), layers=[[1]])
    res = _res()
    res.classes = [0, 0]
    with pytest.raises(InputTypeError, match="classes must be a Tensor of class indices"):
        flow_grid(_images(), res)
    assert not os.listdir(tmp_path)


def test_grid_cells_keep_the_images_shape():
    res = _res()
    res.input_size = (8, 16)
    fig = flow_grid(torch.rand(2, 3, 8, 16), res, cell=2.0)
    width, height = fig.get_size_inches()
    assert (width, height) == pytest.approx((2.0 * 3, 1.0 * 2 + 0.3))  # 3 columns, 2 rows of half-height cells
    plt.close(fig)


def test_flow_grid_can_show_the_colormaps_scale(tmp_path):
    plain = flow_grid(_images(), _res())
    fig = flow_grid(_images(), _res(), tmp_path / "bar.png", colorbar=True, cell=2.0)
    assert len(fig.axes) == len(plain.axes) + 1  # the colour bar's own axis
    bar = fig.axes[-1]
    assert bar.get_ylabel() == "each map, min-max scaled" and bar.get_ylim() == (0.0, 1.0)
    assert fig.get_figwidth() == pytest.approx(2.0 * 3 + viz._COLORBAR_INCHES)
    assert bar.get_position().x0 > max(ax.get_position().x1 for ax in fig.axes[:-1])  # beside the grid
    plt.close(plain)
    with pytest.raises(InputTypeError, match="colorbar must be True or False, got str 'yes'"):
        flow_grid(_images(), _res(), colorbar="yes")


def test_constant_maps_are_marked_empty_or_uniform_in_the_grid_and_the_gif(tmp_path):
    from PIL import Image

    res = _res(layers=("a", "b", "c"))
    res.maps["a"][0] = 0.0  # image 0: every neuron of layer a abandoned
    res.maps["b"][1] = 0.25  # image 1: a constant, non-zero map
    fig = flow_grid(_images(), res)
    cells = fig.axes[:8]  # 2 rows of [input, a, b, c]
    marks = [[t.get_text() for t in ax.texts] for ax in cells]
    assert marks == [[], ["empty"], [], [], [], [], ["uniform"], []]
    plt.close(fig)
    # a constant map is drawn flat, not as its bilinear rounding scaled to [0, 1]
    flat = overlay(_images()[0], torch.full((3, 3), 0.3))
    assert (flat == overlay(_images()[0], torch.zeros(3, 3))).all()
    # a map that is merely tiny keeps its shape, and no mark
    assert viz._flat_mark(torch.tensor([[0.0, 1e-30]])) == "" and viz._flat_mark(torch.zeros(2, 2)) == "empty"

    def frame(name: str) -> torch.Tensor:
        gif = flow_gif(_images(), res, tmp_path / f"{name}.gif", size=64, layers=["a"])
        return torch.as_tensor(np.array(Image.open(gif).convert("RGB")))

    marked = frame("marked")
    res.maps["a"][0] = torch.rand(4, 4)  # the same frame with a varying map on image 0
    unmarked = frame("unmarked")
    corner = (slice(viz._GIF_HEADER + 64 - 14, viz._GIF_HEADER + 64), slice(0, 64))
    assert (marked[corner] == 255).all(-1).sum() > 20  # the label's white box in image 0's corner
    assert (unmarked[corner] == 255).all(-1).sum() < 5


def test_flow_grid_max_columns_spreads_the_layers_keeping_the_first_and_the_last():
    names = [f"l{i}" for i in range(10)]
    fig = flow_grid(_images(1), _res(batch=1, layers=names), max_columns=4)
    assert [ax.get_title() for ax in fig.axes] == ["input", "l0", "l3", "l6", "l9"]
    plt.close(fig)
    fig = flow_grid(_images(1), _res(batch=1, layers=names[:3]), max_columns=4)  # fewer than the cap: all
    assert len(fig.axes) == 4
    plt.close(fig)
    with pytest.raises(InputError, match="max_columns must be at least 2"):
        flow_grid(_images(1), _res(batch=1, layers=names), max_columns=1)
    with pytest.raises(InputTypeError, match="max_columns must be an int, got float"):
        flow_grid(_images(1), _res(batch=1, layers=names), max_columns=4.0)


def test_overlay_weighs_the_map_by_alpha_over_the_image():
    image, heatmap = _images()[0], torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    shown = image.permute(1, 2, 0).numpy()  # an image in [0, 1] is shown as it is
    coloured = matplotlib.colormaps["inferno"](naflow_fx.result.normalize_maps(heatmap).numpy())[..., :3]
    np.testing.assert_allclose(overlay(image, heatmap, alpha=0.0), shown, rtol=0, atol=1e-6)
    np.testing.assert_allclose(overlay(image, heatmap, alpha=1.0), coloured, rtol=0, atol=1e-6)
    np.testing.assert_allclose(overlay(image, heatmap, alpha=0.25), 0.75 * shown + 0.25 * coloured, atol=1e-6)


def test_maps_of_any_dtype_and_scale_are_drawn_with_their_shape(tmp_path):
    images = _images(1)
    varying = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for maps in (varying > 0.5, (varying * 10).long(), varying * 1e300, varying * 1e-60, varying.half()):
        res = _res(batch=1, layers=("a",))
        res.maps["a"] = maps
        fig = flow_grid(images, res)
        assert [t.get_text() for ax in fig.axes for t in ax.texts] == [], maps.dtype  # no mark: the map varies
        plt.close(fig)
        flow_gif(images, res, tmp_path / "f.gif", size=8)  # the GIF draws them too
        expected = overlay(images[0], (maps[0] / maps[0].max()).double())
        np.testing.assert_allclose(overlay(images[0], maps[0]), expected, atol=2e-3)  # the shape, not inf or 0


def test_spread_layers_checks_its_limit():
    assert spread_layers(["a", "b", "c"], np.int64(2)) == ["a", "c"]
    with pytest.raises(InputError, match="limit must be at least 2"):
        spread_layers(["a", "b", "c"], 1)
    with pytest.raises(InputTypeError, match="limit must be an int, got float"):
        spread_layers(["a", "b", "c"], 2.0)

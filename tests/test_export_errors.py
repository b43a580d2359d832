"""save_maps / load_maps on bad input: one clear naflow_fx error, and never a stray or half-written file."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import naflow_fx.export
from naflow_fx import compile_naflow
from naflow_fx.errors import InputError, InputTypeError
from naflow_fx.export import load_maps, save_maps, sidecar_path
from naflow_fx.result import FlowResult, LayerMaps


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    nf = compile_naflow(model, (1, 3, 8, 8), last_layer="1")
    return nf(torch.rand(2, 3, 8, 8))


def files(folder) -> list[str]:
    """Every file and folder under ``folder``, hidden temporaries included."""
    return sorted(
        os.path.relpath(os.path.join(root, n), folder) for root, dirs, fs in os.walk(folder) for n in dirs + fs
    )


def saved(flow, tmp_path, name="maps.npz"):
    npz, side = save_maps(flow, tmp_path / name)
    return npz, side


# --- save_maps ----------------------------------------------------------------------------------


def test_unserialisable_extra_is_refused_before_anything_is_written(flow, tmp_path):
    out = tmp_path / "d" / "x.npz"
    with pytest.raises(InputTypeError, match=r"save_maps: extra\['o'\] is not JSON-serialisable.*plain str"):
        save_maps(flow, out, extra={"o": object()})
    with pytest.raises(InputTypeError, match=r"extra\[\(1, 2\)\] is not JSON-serialisable"):
        save_maps(flow, out, extra={(1, 2): 3})
    with pytest.raises(InputTypeError, match="save_maps: extra must be a dict.*got list"):
        save_maps(flow, out, extra=[("a", 1)])
    with pytest.raises(InputTypeError, match=r"save_maps: the sidecar \(model, class_names or images\)"):
        save_maps(flow, out, model=object())
    assert files(tmp_path) == []  # not even the folder


def test_extra_cannot_overwrite_the_recorded_fields(flow, tmp_path):
    with pytest.raises(InputError, match=r"extra field\(s\) \['format', 'layers'\] would overwrite.*rename"):
        save_maps(flow, tmp_path / "x.npz", extra={"layers": 3, "format": "mine", "fine": 1})
    assert files(tmp_path) == []
    npz, _ = save_maps(flow, tmp_path / "x.npz", extra={"fine": 1, "options": {"damping": 0.0}})
    assert load_maps(npz)[1]["fine"] == 1


@pytest.mark.parametrize("name", [".npz", "", "sub/", "sub/.npz"])
def test_a_path_without_a_file_name_is_refused(flow, tmp_path, name):
    with pytest.raises(InputError, match=r"has no file name, only the extension; pass a file path such as .*maps\.npz"):
        save_maps(flow, str(tmp_path / "d") + "/" + name)
    assert files(tmp_path) == []  # no empty file, no stranded temporary


def test_odd_but_valid_names_round_trip_without_temporaries(flow, tmp_path):
    for name in ["..npz", "a.b.npz", "noext"]:
        npz, side = save_maps(flow, os.path.join(tmp_path, name))
        assert side == npz[: -len(".npz")] + ".json" == sidecar_path(npz)
        assert list(load_maps(npz)[0]) == flow.layers
    assert files(tmp_path) == ["..json", "..npz", "a.b.json", "a.b.npz", "noext.json", "noext.npz"]


def test_a_folder_as_path_or_a_path_through_a_file_is_a_clear_error(flow, tmp_path):
    (tmp_path / "maps.npz").mkdir()
    with pytest.raises(InputError, match=f"save_maps: {tmp_path / 'maps.npz'} is a folder; pass a file path such as"):
        save_maps(flow, tmp_path / "maps.npz")
    (tmp_path / "other.json").mkdir()
    with pytest.raises(InputError, match=f"the sidecar {tmp_path / 'other.json'} of .* is a folder"):
        save_maps(flow, tmp_path / "other.npz")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match=f"cannot write .*: {tmp_path / 'afile'} is a file, not a folder"):
        save_maps(flow, tmp_path / "afile" / "deeper" / "maps.npz")
    assert files(tmp_path) == ["afile", "maps.npz", "other.json"]


def test_a_failed_write_names_the_users_file_and_leaves_nothing(flow, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/.maps.npz.tmp")

    def sidecar_fails(file, mode="r", *args, **kwargs):
        if str(file).endswith(".json"):  # its hidden temporary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(naflow_fx.export, "open", sidecar_fails, raising=False)  # export.py's own open()
        with pytest.raises(OSError) as info:
            save_maps(flow, tmp_path / "maps.npz")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "maps.json")
    assert files(tmp_path) == []  # no .npz without its sidecar
    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "write_array", full_disk)
        with pytest.raises(OSError) as info:
            save_maps(flow, tmp_path / "maps.npz")
    assert info.value.filename == str(tmp_path / "maps.npz")
    assert files(tmp_path) == []


def test_an_old_pair_stays_whole_when_rewriting_it_fails(flow, tmp_path, monkeypatch):
    npz, side = save_maps(flow, tmp_path / "maps.npz", model="old")
    doubled = dataclasses.replace(flow, maps={k: 2 * v for k, v in flow.maps.items()})
    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "write_array", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
        with pytest.raises(OSError):
            save_maps(doubled, npz, model="new")
    maps, meta = load_maps(npz)
    assert meta["model"] == "old" and files(tmp_path) == ["maps.json", "maps.npz"]
    np.testing.assert_array_equal(maps["0"], flow.maps["0"].numpy())  # not the new maps under the old sidecar


def test_a_pair_is_replaced_whole_or_not_at_all(flow, tmp_path, monkeypatch):
    """The sidecar has replaced the old one when the .npz cannot be replaced (chattr +i): it is put back."""
    npz, side = save_maps(flow, tmp_path / "maps.npz", model="old")
    doubled = dataclasses.replace(flow, maps={k: 2 * v for k, v in flow.maps.items()})
    real = os.replace

    def immutable_npz(src, dst):
        if npz in (os.fspath(src), os.fspath(dst)):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fspath(src), os.fspath(dst))
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", immutable_npz)
        with pytest.raises(OSError) as info:
            save_maps(doubled, npz, model="new")
    assert info.value.errno == errno.EPERM and info.value.filename == npz
    maps, meta = load_maps(npz)
    assert meta["model"] == "old" and files(tmp_path) == ["maps.json", "maps.npz"]  # no temporaries either
    np.testing.assert_array_equal(maps["0"], flow.maps["0"].numpy())
    new_npz, _ = save_maps(doubled, npz, model="new")  # and with nothing in the way, the new pair
    assert load_maps(new_npz)[1]["model"] == "new"


def test_images_and_result_are_checked_up_front(flow, tmp_path):
    out = tmp_path / "x.npz"
    with pytest.raises(InputError, match=r"images has 3 label\(s\) but the result has 2 sample\(s\)"):
        save_maps(flow, out, images=["a", "b", "c"])
    with pytest.raises(InputError, match=r"images has 1 label\(s\)"):
        save_maps(flow, out, images=["a"])
    with pytest.raises(InputTypeError, match="images must be a list with one label per sample.*got str"):
        save_maps(flow, out, images="ab")
    for bad in (None, {"0": flow.maps["0"]}):
        with pytest.raises(
            InputTypeError, match=f"save_maps: result must be a LayerMaps \\(a FlowResult is one.*{type(bad).__name__}"
        ):
            save_maps(bad, out)
    with pytest.raises(InputTypeError, match="summary: result must be"):
        naflow_fx.export.summary(None)
    with pytest.raises(InputTypeError, match="save_maps: path must be a str or os.PathLike, got int"):
        save_maps(flow, 3)
    assert files(tmp_path) == []


def test_non_finite_numbers_are_written_as_null_and_read_back_as_none(flow, tmp_path):
    nan = float("nan")
    cam = LayerMaps(
        layers=["a"],
        maps={"a": torch.tensor([[[nan, 1.0]], [[0.0, 1.0]]])},
        output=torch.tensor([[nan, 0.0], [1.0, 2.0]]),
        scores=torch.tensor([nan, float("inf")]),
        classes=torch.tensor([0, 1]),
        input_size=(8, 8),
        method="gradcam",
    )
    npz, side = save_maps(cam, tmp_path / "cam.npz", extra={"worst": [float("-inf"), 1.5]})
    text = open(side).read()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not valid JSON"))  # strict JSON
    maps, meta = load_maps(npz)
    assert meta["samples"][0]["score"] is None and meta["samples"][1]["score"] is None
    assert meta["samples"][0]["predicted_logit"] is None and meta["samples"][0]["predicted_probability"] is None
    assert meta["samples"][1]["predicted_logit"] == 2.0 and meta["worst"] == [None, 1.5]
    assert np.isnan(maps["a"][0, 0, 0])  # the maps themselves keep their NaN
    rec = next(iter(flow.diagnostics))
    bad_flow = dataclasses.replace(flow, diagnostics={rec: dataclasses.replace(flow.diagnostics[rec], residual=nan)})
    _, meta = load_maps(save_maps(bad_flow, tmp_path / "flow.npz")[0])
    assert meta["diagnostics"][0]["residual"] is None


def test_a_sidecar_of_an_older_version_with_bare_nan_reads_the_same(flow, tmp_path):
    npz, side = saved(flow, tmp_path)
    meta = json.load(open(side))
    meta["samples"][0]["score"] = float("nan")
    open(side, "w").write(json.dumps(meta))  # json.dumps writes a bare NaN, as save_maps once did
    assert load_maps(npz)[1]["samples"][0]["score"] is None


# --- load_maps ----------------------------------------------------------------------------------


def test_load_a_missing_file_or_sidecar(flow, tmp_path):
    with pytest.raises(InputError, match=f"load_maps: {tmp_path / 'nope.npz'} does not exist; check the path"):
        load_maps(tmp_path / "nope.npz")
    with pytest.raises(InputError, match=f"load_maps: {tmp_path} is a folder"):
        load_maps(tmp_path)
    npz, side = saved(flow, tmp_path)
    os.remove(side)
    with pytest.raises(InputError, match=f"{npz} has no sidecar {side}; .*keep or copy the .json together"):
        load_maps(npz)
    with pytest.raises(InputTypeError, match="load_maps: path must be a str or os.PathLike, got NoneType"):
        load_maps(None)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"just some text\n", "is not an .npz archive"),
        (b"", "is empty, not an .npz archive"),
        (b"PK\x03\x04 truncated zip", "is a damaged or foreign .npz archive"),
    ],
)
def test_load_a_file_that_is_not_an_npz(tmp_path, content, problem):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=f"load_maps: {bad} {problem}.*written by naflow_fx.export.save_maps") as info:
        load_maps(bad)
    assert "pickle" not in str(info.value)


def test_load_an_npy_or_an_npz_of_objects(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match=r"one.npy is a single .npy array, not the .npz archive"):
        load_maps(tmp_path / "one.npy")
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="obj.npz is a damaged or foreign .npz archive") as info:
        load_maps(tmp_path / "obj.npz")
    assert "allow_pickle=True" not in str(info.value)


@pytest.mark.parametrize(
    "sidecar, problem",
    [
        ("{not json", r"is not valid JSON \(Expecting property name"),
        ("[1, 2]", "is not a naflow_fx maps sidecar"),
        ("{}", "is not a naflow_fx maps sidecar"),
        (
            '{"format": "naflow_fx maps v9", "layers": []}',
            "has format 'naflow_fx maps v9'.*the naflow_fx that wrote it",
        ),
        ('{"format": "naflow_fx maps v1", "layers": [{"shape": [6, 6]}]}', 'has no valid "layers" list'),
    ],
)
def test_load_a_bad_sidecar(flow, tmp_path, sidecar, problem):
    npz, side = saved(flow, tmp_path)
    open(side, "w").write(sidecar)
    with pytest.raises(InputError, match=f"load_maps: {side} {problem}"):
        load_maps(npz)


def test_load_a_sidecar_of_other_maps(flow, tmp_path):
    npz, side = saved(flow, tmp_path)
    meta = json.load(open(side))
    meta["layers"].append({"name": "ghost", "shape": [1, 1]})
    open(side, "w").write(json.dumps(meta))
    with pytest.raises(InputError, match=r"lists layer\(s\) \['ghost'\] that .* does not hold.*do not belong together"):
        load_maps(npz)
    meta["layers"] = [{"name": "0", "shape": [5, 5]}]
    open(side, "w").write(json.dumps(meta))
    with pytest.raises(InputError, match=r"layer '0' has shape \[6, 6\] in .* but \[5, 5\] in"):
        load_maps(npz)
    meta = json.load(open(saved(flow, tmp_path)[1]))
    meta["samples"] = meta["samples"][:1]  # the sidecar of a batch of 1 beside maps of 2
    open(side, "w").write(json.dumps(meta))
    with pytest.raises(InputError, match=r"layer '0' holds 2 sample\(s\) in .* but .* describes 1; the two files"):
        load_maps(npz)


def test_an_upper_case_extension_is_kept_and_a_json_path_is_refused(flow, tmp_path):
    npz, side = save_maps(flow, tmp_path / "g.NPZ")
    assert (os.path.basename(npz), os.path.basename(side)) == ("g.NPZ", "g.json")
    assert list(load_maps(npz)[0]) == flow.layers
    with pytest.raises(InputError, match=r"f.json names the sidecar; pass the .npz path \(.*f.npz\)"):
        save_maps(flow, tmp_path / "f.json")
    assert files(tmp_path) == ["g.NPZ", "g.json"]


def test_an_embedding_flow_records_no_predicted_class(tmp_path):
    """The argmax of an embedding is no class: only flows of class targets record a prediction."""
    from naflow_fx import SimilarityTarget

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    x = torch.randn(2, 3, 8, 8)
    nf = compile_naflow(encoder.eval(), x[:1])
    _, meta = load_maps(save_maps(nf(x, SimilarityTarget(torch.rand(4) + 0.5)), tmp_path / "sim")[0])
    assert all("predicted" not in row and "predicted_probability" not in row for row in meta["samples"])
    assert all("score" in row for row in meta["samples"])


# --- layer names --------------------------------------------------------------------------------


def cam_of(names, batch=2, classes=None) -> LayerMaps:
    """A LayerMaps with these layers, each map filled with values of its own."""
    gen = torch.Generator().manual_seed(0)
    return LayerMaps(
        layers=list(names),
        maps={n: torch.rand(batch, 2 + i % 3, 3, generator=gen) + i for i, n in enumerate(names)},
        output=torch.zeros(batch, 2),
        scores=torch.zeros(batch),
        classes=classes,
        input_size=(8, 8),
        method="gradcam",
    )


def test_any_storable_layer_name_round_trips_exactly(tmp_path):
    """numpy's own savez/load took "file" and "allow_pickle" for its keywords and "a.npy" for "a"."""
    names = ["file", "allow_pickle", "a", "a.npy", "a.npy.npy", "blocks/0/conv", "/lead", "..", "", "схема λ"]
    cam = cam_of(names)
    npz, side = save_maps(cam, tmp_path / "odd.npz")
    with zipfile.ZipFile(npz) as zf:
        assert zf.namelist() == [n + ".npy" for n in names]  # one member per layer, named exactly
    maps, meta = load_maps(npz)
    assert list(maps) == names and [layer["name"] for layer in meta["layers"]] == names
    for n in names:
        assert maps[n].dtype == np.float32
        np.testing.assert_array_equal(maps[n], cam.maps[n].numpy(), err_msg=repr(n))
    assert files(tmp_path) == ["odd.json", "odd.npz"]


def test_numpy_reads_the_maps_of_ordinary_layers_itself(flow, tmp_path):
    npz, _ = saved(flow, tmp_path)
    with np.load(npz) as data:  # a standard .npz
        assert data.files == flow.layers
        np.testing.assert_array_equal(data["0"], flow.maps["0"].numpy())
    npz, _ = save_maps(cam_of(["file", "allow_pickle", "layer1.0.conv1"]), tmp_path / "cam.npz")
    with np.load(npz) as data:
        for n in ["file", "allow_pickle", "layer1.0.conv1"]:
            np.testing.assert_array_equal(data[n], load_maps(npz)[0][n])


@pytest.mark.parametrize(
    "name, problem",
    [
        ("a\0b", "holds a NUL character"),
        ("a\\b", "holds a backslash"),
        ("bad\udcff", "is not valid Unicode text"),
        ("x" * 70_000, "is longer than the 65535 bytes of a zip member name"),
    ],
)
def test_a_layer_name_a_zip_cannot_hold_is_refused_before_anything_is_written(tmp_path, name, problem):
    with pytest.raises(
        InputError, match=f"save_maps: layer name .* {problem}.*, so the .npz cannot hold it; rename the layer"
    ):
        save_maps(cam_of(["fine", name]), tmp_path / "d" / "maps.npz")
    with pytest.raises(InputTypeError, match="save_maps: layer names must be str, got int 3"):
        save_maps(cam_of(["fine", 3]), tmp_path / "d" / "maps.npz")
    assert files(tmp_path) == []


def test_load_an_npz_with_a_damaged_member(flow, tmp_path):
    npz, _ = saved(flow, tmp_path)
    data = bytearray(open(npz, "rb").read())
    data[100:110] = b"\xff" * 10  # inside the first member's compressed data
    open(npz, "wb").write(data)
    with pytest.raises(InputError, match=f"load_maps: {npz} is a damaged or foreign .npz archive"):
        load_maps(npz)


# --- repr and equality --------------------------------------------------------------------------


def test_a_result_prints_as_one_short_line(flow):
    names = [f"features.{i}.block.conv" for i in range(200)]
    big = torch.zeros(16, 64, 32, 32)
    many = FlowResult(
        **vars(cam_of(names, batch=16, classes=torch.arange(16))) | {"method": "naflow"},
        bpfm=dict.fromkeys(names, big),
        coefficients=dict.fromkeys(names, big),
    )
    text = repr(many)
    assert len(text) < 600 and "\n" not in text, text
    assert text.startswith("FlowResult(method='naflow', batch=16, 200 layers 'features.0.block.conv' ... ")
    assert "'features.199.block.conv'" in text and "input_size=(8, 8)" in text and "float32 on cpu" in text
    assert "classes=[0, 1, 2, 3, 4, 5, ...]" in text and "tensor" not in text
    assert repr(flow).startswith(f"FlowResult(method='naflow', batch=2, {len(flow.layers)} layers")
    cam = cam_of(["conv"])
    assert repr(cam) == "LayerMaps(method='gradcam', batch=2, 1 layer 'conv', input_size=(8, 8), maps: float32 on cpu)"
    assert str(cam) == repr(cam)


def test_results_compare_by_identity_without_raising(flow):
    twin = dataclasses.replace(flow)  # equal, but separate tensors
    assert flow == flow and not (flow != flow)
    assert twin != flow and not (twin == flow)
    cam = cam_of(["a", "b"])
    assert cam == cam and cam != cam_of(["a", "b"])
    assert len({flow, twin, cam}) == 3  # hashable, by identity


def test_an_interrupt_right_after_a_rename_still_rolls_the_set_back(tmp_path, monkeypatch):
    """atomic_write_all records each replacement before its rename, so Ctrl-C landing just after
    one leaves every file as it was (not a mix of old and new)."""
    from naflow_fx import _io

    for name in "abc":
        (tmp_path / name).write_text("old")
    real, renames = os.replace, []

    def replace(src, dst):
        real(src, dst)
        renames.append(dst)
        if len(renames) == 2 and not os.path.basename(str(dst)).startswith("."):
            raise KeyboardInterrupt  # after the second file's rename, before anything else

    monkeypatch.setattr(_io.os, "replace", replace)
    files = [(tmp_path / n, lambda tmp: open(tmp, "w").write("new")) for n in "abc"]
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write_all(files)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a": "old", "b": "old", "c": "old"}


def test_a_class_index_outside_the_names_gets_no_name():
    """``class_names`` names indices 0..len−1 only: a negative index is not counted from the end."""
    cam = LayerMaps(
        ["conv"], {"conv": torch.ones(2, 2, 2)}, torch.tensor([[0.0, 1.0], [2.0, 0.5]]),
        torch.tensor([1.0, 0.5]), torch.tensor([-1, 5]), (8, 8), "gradcam",
    )  # fmt: skip
    rows = naflow_fx.export.summary(cam, class_names=["cat", "dog"])["samples"]
    assert [r["target"] for r in rows] == [-1, 5]
    assert all("target_name" not in r for r in rows)
    assert [r["predicted_name"] for r in rows] == ["dog", "cat"]


def test_non_finite_floats_inside_tuples_of_extra_are_written_as_null(tmp_path):
    cam = LayerMaps(["conv"], {"conv": torch.ones(1, 2, 2)}, torch.tensor([[0.0, 1.0]]), torch.tensor([1.0]), None,
                    (8, 8), "gradcam")  # fmt: skip
    npz, _ = save_maps(cam, tmp_path / "cam.npz", extra={"window": (0.0, float("nan")), "nested": [(float("inf"),)]})
    meta = load_maps(npz)[1]
    assert meta["window"] == [0.0, None] and meta["nested"] == [[None]]


def test_image_labels_given_as_paths_are_recorded_as_paths(tmp_path):
    """``images=`` takes str and os.PathLike labels: a path is recorded as its path, not its repr (os.DirEntry)."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).touch()
    entries = sorted(os.scandir(tmp_path), key=lambda e: e.name)
    cam = LayerMaps(["conv"], {"conv": torch.ones(3, 2, 2)}, torch.zeros(3, 2), torch.zeros(3), None, (8, 8), "gradcam")
    rows = naflow_fx.export.summary(cam, images=[*entries, tmp_path / "c.png"])["samples"]
    assert [r["image"] for r in rows] == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]

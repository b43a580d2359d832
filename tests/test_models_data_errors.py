"""Bad input to results, model builders, the shapes dataset / embedded model and ``naflow inspect``:
each is one library error that says what was wrong and what to do (never a stack trace from deep
inside torch, numpy or PIL, a silently wrong result or a half-written file)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from naflow_fx import ConfigError, InputError, InputTypeError, compile_naflow
from naflow_fx.cli import main
from naflow_fx.data import shapes as data_shapes
from naflow_fx.data.shapes import (
    MEAN,
    STD,
    ShapesBatch,
    denormalize,
    make_shapes,
    normalize,
    render_shape,
    samples,
    write_samples,
)
from naflow_fx.models import (
    BAM,
    CBAM,
    SEModule,
    conv4_encoder,
    ms_resnet50,
    npid_resnet,
    resnet12,
    resnet50_bam,
    resnet50_cbam,
    se_resnet50,
)
from naflow_fx.result import concat, normalize_maps
from naflow_fx.zoo.shapes import ShapesResNet, shapes_embedding, shapes_resnet

# --------------------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def flows():
    """Two one-image flows and a Grad-CAM of the embedded model at 32 px, plus a flow at 48 px."""
    model = shapes_resnet()
    x = normalize(make_shapes(2, seed=1, size=32).images)
    nf = compile_naflow(model, x[:1], layers="blocks")
    nf48 = compile_naflow(model, torch.zeros(1, 3, 48, 48), layers="blocks")
    x48 = normalize(make_shapes(1, seed=1, size=48).images)
    return nf, nf(x[:1]), nf(x[1:]), nf.gradcam(x[:1]), nf48(x48), x


def test_concat_needs_a_nonempty_list_of_results(flows):
    _, f1, f2, *_ = flows
    with pytest.raises(InputError, match="at least one result"):
        concat([])
    with pytest.raises(InputTypeError, match=r"concat\(\[result\]\)"):
        concat(f1)
    with pytest.raises(InputTypeError, match=r"results\[1\] must be a LayerMaps"):
        concat([f1, None])
    joined = concat(r for r in (f1, f2))  # any iterable
    assert joined.maps[f1.layers[0]].shape[0] == 2


def test_concat_rejects_results_of_different_explainers(flows):
    nf, f1, f2, cam, f48, x = flows
    with pytest.raises(InputError, match="method 'gradcam'.*same explainer"):
        concat([f1, cam])
    with pytest.raises(InputError, match="method 'naflow'"):
        concat([cam, f1])
    with pytest.raises(InputError, match=r"size \(48, 48\)"):
        concat([f1, f48])
    other = copy.copy(f2)
    other.layers = f2.layers[1:]
    with pytest.raises(InputError, match="other layers"):
        concat([f1, other])
    no_class = copy.copy(f2)
    no_class.classes = None
    with pytest.raises(InputError, match="non-class target"):
        concat([f1, no_class])
    with pytest.raises(InputError, match="keep='maps'"):
        concat([f1, nf(x[1:], keep="maps")])
    meta = copy.copy(f2)
    meta.maps = {k: v.to("meta") for k, v in f2.maps.items()}
    with pytest.raises(InputError, match="meta.*one device"):
        concat([f1, meta])


def test_concat_keeps_a_nan_residual_wherever_it_is(flows):
    _, f1, f2, *_ = flows
    key = next(iter(f1.diagnostics))
    bad = copy.copy(f2)
    bad.diagnostics = dict(f2.diagnostics)
    bad.diagnostics[key] = dataclasses.replace(f2.diagnostics[key], residual=math.nan)
    assert math.isnan(concat([f1, bad]).diagnostics[key].residual)
    assert math.isnan(concat([bad, f1]).diagnostics[key].residual)
    ok = concat([f1, f2]).diagnostics[key]
    assert ok.residual == max(f1.diagnostics[key].residual, f2.diagnostics[key].residual)


def test_concat_takes_the_worst_normal_residual(flows):
    x = flows[-1]
    nf = compile_naflow(shapes_resnet(), x[:1], layers="blocks", solver="iterative", max_iter=20)
    f1, f2 = nf(x[:1]), nf(x[1:])
    solved = [k for k, r in f1.diagnostics.items() if r.normal_residual is not None]
    closed = [k for k, r in f1.diagnostics.items() if r.normal_residual is None]
    assert solved and closed
    worse = copy.copy(f1)
    worse.diagnostics = dict(f1.diagnostics)
    worse.diagnostics[solved[0]] = dataclasses.replace(f1.diagnostics[solved[0]], normal_residual=0.5)
    for parts in ([f2, worse], [worse, f2]):  # whichever part it is in
        merged = concat(parts).diagnostics
        assert merged[solved[0]].normal_residual == 0.5 and merged[closed[0]].normal_residual is None


def test_upsample_checks_size_and_normalize(flows):
    _, f1, *_ = flows
    assert f1.upsample(20).shape == (1, len(f1.layers), 20, 20)
    assert f1.upsample((np.int64(9), torch.tensor(7))).shape[-2:] == (9, 7)
    torch.testing.assert_close(f1.upsample((33, 17)), f1.upsample([33, 17]), rtol=0, atol=0)
    for bad in ((0, 5), (-1, 5), 0):
        with pytest.raises(InputError, match="at least 1 pixel"):
            f1.upsample(bad)
    for bad in ((2.5, 3), (True, 3), (20, 10, 3), "big"):
        with pytest.raises(InputTypeError, match=r"size must be \(H, W\)"):
            f1.upsample(bad)
    with pytest.raises(InputTypeError, match="normalize must be True or False"):
        f1.upsample(normalize="no")
    empty = copy.copy(f1)
    empty.layers = []
    with pytest.raises(InputError, match="no layers"):
        empty.upsample()
    missing = copy.copy(f1)
    missing.maps = {k: v for k, v in f1.maps.items() if k != f1.layers[0]}
    with pytest.raises(InputError, match="has no map"):
        missing.upsample()


def test_upsample_refuses_what_cannot_fit_and_matches_the_stacked_maps(flows, monkeypatch):
    _, f1, *_ = flows
    layers = len(f1.layers)
    with pytest.raises(InputError, match=rf"upsample: {layers} layers of 1×1000000×1000000 float32 maps would need"):
        f1.upsample(10**6)  # 4 TB per layer: before, a raw allocator error (or the process was killed)
    ref = torch.stack([F.interpolate(f1.maps[n][:, None], size=(40, 30), mode="bilinear")[:, 0] for n in f1.layers], 1)
    torch.testing.assert_close(f1.upsample((40, 30), normalize=False), ref, rtol=0, atol=0)
    torch.testing.assert_close(f1.upsample((40, 30)), normalize_maps(ref), rtol=0, atol=0)
    need = 40 * 30 * 4 * (layers + 4)  # the output plus a few one-layer temporaries
    monkeypatch.setattr("naflow_fx.result.free_bytes", lambda device: need - 1)
    with pytest.raises(InputError, match=r"GiB are free on cpu: pass a smaller size, or upsample the layers"):
        f1.upsample((40, 30))
    monkeypatch.setattr("naflow_fx.result.free_bytes", lambda device: need)
    assert f1.upsample((40, 30)).shape == (1, layers, 40, 30)
    monkeypatch.setattr("naflow_fx.result.free_bytes", lambda device: None)  # not Linux: the allocator decides
    with pytest.raises(InputError, match=r"would need [0-9.e+]+ GiB, more than can be allocated: pass a smaller"):
        f1.upsample(10**6)


def test_upsample_refuses_to_normalise_nan_maps(flows):
    _, f1, *_ = flows
    nan = copy.copy(f1)
    name = f1.layers[1]
    nan.maps = dict(f1.maps)
    nan.maps[name] = f1.maps[name].clone()
    nan.maps[name][0, 0, 0] = math.nan
    with pytest.raises(InputError, match=f"{name!r}.*normalize=False"):
        nan.upsample()
    raw = nan.upsample(normalize=False)
    assert raw[:, 1].isnan().any() and raw[:, 0].isfinite().all()


def test_normalize_maps_valid_input_unchanged():
    maps = torch.randn(3, 2, 7, 5)
    maps[0, 1] = 4.0  # a constant map
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = hi - lo
    varies = span > 1e-12 * torch.maximum(hi.abs(), lo.abs())
    ref = torch.where(varies, (flat - lo) / torch.where(varies, span, 1), torch.zeros_like(flat))
    assert torch.equal(normalize_maps(maps), ref.reshape(maps.shape))
    assert torch.equal(normalize_maps(maps[0, 1]), torch.zeros(7, 5))


def test_normalize_maps_rejects_bad_maps_and_eps():
    nan = torch.rand(1, 3, 3)
    nan[0, 1, 1] = math.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        normalize_maps(nan)  # was: silently all zeros
    with pytest.raises(InputError, match="NaN or Inf"):
        normalize_maps(torch.tensor([[[0.0, math.inf]]]))
    with pytest.raises(InputError, match="eps must be >= 0"):
        normalize_maps(torch.ones(1, 2, 2), eps=-1.0)  # was: NaN maps
    with pytest.raises(InputError, match="eps must be >= 0"):
        normalize_maps(torch.rand(1, 2, 2), eps=math.nan)
    with pytest.raises(InputTypeError, match="eps must be a number"):
        normalize_maps(torch.rand(1, 2, 2), eps="small")
    assert torch.equal(normalize_maps(torch.ones(1, 2, 2), eps=0), torch.zeros(1, 2, 2))
    with pytest.raises(InputTypeError, match="torch.as_tensor"):
        normalize_maps(np.random.rand(1, 2, 2))
    for bad in (torch.rand(4), torch.rand(2, 0, 3)):
        with pytest.raises(InputError, match=r"h, w ≥ 1"):
            normalize_maps(bad)
    for bad in (torch.rand(1, 2, 2) > 0.5, torch.rand(1, 2, 2, dtype=torch.cfloat)):
        with pytest.raises(InputTypeError, match="real"):
            normalize_maps(bad)


def test_maps_of_any_scale_keep_their_shape_when_normalised_and_upsampled(flows):
    """The constant-map threshold was an absolute 1e-12, so a map peaking at 1e-30 (a flow of a tiny
    input) became all zeros; and upsample cast to float32 first, so float64 maps of 1e300 or 1e-60
    (the float64 flow that NumericalWarning advises) came back as 0."""
    peak = torch.zeros(1, 3, 3, dtype=torch.float64)
    peak[0, 1, 2] = 1e-30
    assert normalize_maps(peak)[0, 1, 2] == 1 and normalize_maps(peak).sum() == 1
    assert normalize_maps(torch.full((1, 2, 2), 1e-30)).eq(0).all()  # constant, at any scale
    _, f1, *_ = flows
    reference = f1.upsample()
    for scale in (1e300, 1e-60):
        scaled = copy.copy(f1)
        scaled.maps = {name: m.double() * scale for name, m in f1.maps.items()}
        torch.testing.assert_close(scaled.upsample(), reference, atol=1e-5, rtol=0)


def test_normalize_maps_does_not_overflow():
    int8 = torch.tensor([[[-128, 127], [0, -128]]], dtype=torch.int8)  # int8 span 255 wrapped to -1: all zeros
    torch.testing.assert_close(normalize_maps(int8), torch.tensor([[[0.0, 1.0], [128 / 255, 0.0]]]))
    huge = torch.tensor([[[-3e38, 3e38, 0.0]]])  # float32 span overflowed to inf: 0 and NaN
    torch.testing.assert_close(normalize_maps(huge), torch.tensor([[[0.0, 1.0, 0.5]]]))


def test_format_diagnostics_widens_for_long_layer_names(flows):
    _, f1, *_ = flows
    long = copy.copy(f1)
    name = "features.denseblock4.denselayer16.relu2"  # a DenseNet layer: longer than the column
    long.diagnostics = {name: next(iter(f1.diagnostics.values()))} | dict(f1.diagnostics)
    rows = long.format_diagnostics().splitlines()
    rule_col = {row.index(rec.rule) for row, rec in zip(rows[2:], long.diagnostics.values())}
    assert len(rule_col) == 1 and rows[0].index("rule") in rule_col
    assert f1.format_diagnostics().splitlines()[0].index("rule") == 29  # short names: the layout is unchanged
    junk = copy.copy(f1)
    junk.diagnostics = {"x": "not a record"}
    with pytest.raises(InputTypeError, match="SolveRecord"):
        junk.format_diagnostics()


# ---------------------------------------------------------------------------------------- models

BUILDERS = [resnet50_cbam, resnet50_bam, se_resnet50]
TINY = (1, 1, 1, 1)


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("num_classes", [0, -1, True, 2.5, "3", None])
def test_attention_builders_check_num_classes(build, num_classes):
    with pytest.raises(ConfigError, match=f"{build.__name__}: num_classes must be a positive int"):
        build(num_classes, TINY, 8)


@pytest.mark.parametrize("build", BUILDERS)
def test_attention_builders_check_layers_width_and_reduction(build):
    name = build.__name__
    with pytest.raises(InputTypeError, match=f"{name}: layers must be a sequence of 4"):
        build(3, 3, 8)
    with pytest.raises(ConfigError, match="layers must be 4 positive block counts"):
        build(3, (1, 1, 1), 8)
    for layers in ((1.5, 1, 1, 1), (True, 1, 1, 1), (0, 1, 1, 1), ("a", 1, 1, 1)):  # 1.5 and True were accepted
        with pytest.raises(ConfigError, match="every block count in layers must be a positive int"):
            build(3, layers, 8)
    for width in (0, 2.5, True, "8"):
        with pytest.raises(ConfigError, match=f"{name}: width must be a positive int"):
            build(3, TINY, width)
    for reduction in (0, -2, 2.5, True):  # 0 was a ZeroDivisionError, -2 silently a width-1 MLP
        with pytest.raises(ConfigError, match=f"{name}: reduction must be a positive int"):
            build(3, TINY, 8, reduction)


@pytest.mark.parametrize("build", BUILDERS)
def test_attention_builders_take_numpy_integers(build):
    torch.manual_seed(0)
    a = build(np.int64(3), np.array([1, 1, 1, 1]), np.int32(8), np.int64(4)).eval()
    torch.manual_seed(0)
    b = build(3, TINY, 8, 4).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x)) and a(x).shape == (1, 3)


def test_attention_modules_check_their_arguments():
    with pytest.raises(ConfigError, match="SEModule: reduction must be a positive int"):
        SEModule(8, 0)
    with pytest.raises(ConfigError, match="SEModule: channels must be a positive int"):
        SEModule(0)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        CBAM(8, 2, kernel_size=4)  # was: a shape mismatch in forward
    with pytest.raises(ConfigError, match="dilation must be a positive int"):
        BAM(8, 2, dilation=0)


@pytest.mark.parametrize("depth", [34, 0, True, 18.0, "18", None])
def test_npid_resnet_checks_depth(depth):
    with pytest.raises(ConfigError, match="depth must be 18 or 50"):
        npid_resnet(depth, 4)


def test_embedding_builders_check_dims():
    assert npid_resnet(np.int64(18), np.int64(4)).fc.out_features == 4
    for dim in (0, -1, True, 2.5, "4", None):
        with pytest.raises(ConfigError, match="npid_resnet: dim must be a positive int"):
            npid_resnet(18, dim)
        with pytest.raises(ConfigError, match="ms_resnet50: dim must be a positive int"):
            ms_resnet50(dim)
    for bad in (0, -1, True, 2.5, "4"):
        with pytest.raises(ConfigError, match="hidden must be a positive int"):
            conv4_encoder(bad)
        with pytest.raises(ConfigError, match="in_channels must be a positive int"):
            conv4_encoder(4, bad)


def test_resnet12_checks_channels_and_slope():
    with pytest.raises(InputTypeError, match="sequence of 4 stage widths"):
        resnet12(channels=4)
    with pytest.raises(InputTypeError, match="sequence of 4 stage widths"):
        resnet12(channels="abcd")
    for channels in ((0, 4, 4, 4), (True, 4, 4, 4), (2.5, 4, 4, 4)):
        with pytest.raises(ConfigError, match="every stage width in channels must be a positive int"):
            resnet12(channels=channels)
    for leaky in (math.nan, "a", None, True):  # were accepted, then failed (or not) in forward
        with pytest.raises(ConfigError, match="leaky"):
            resnet12(leaky=leaky, channels=(4, 4, 4, 4))
    assert resnet12(channels=np.array([4, 4, 8, 8])).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 8)


# ------------------------------------------------------------------------------- shapes dataset


def test_make_shapes_checks_counts_sizes_seeds_and_indices():
    for n in (-1, True, 2.5, "1", None):
        with pytest.raises(ConfigError, match="make_shapes: n must be an int"):
            make_shapes(n, size=16)
    for size in (15, True, 16.5, "16"):
        with pytest.raises(ConfigError, match="make_shapes: size must be an int"):
            make_shapes(1, size=size)
    for seed in (True, 1.5, "1", None, 2**62):  # True was seed 1; 2**62 an overflow in torch
        with pytest.raises(ConfigError, match="make_shapes: seed must be an int"):
            make_shapes(1, seed=seed, size=16)
    for start in (-1, 1.5, None):  # -1 of seed 1 was image 1_000_002 of seed 0
        with pytest.raises(ConfigError, match="make_shapes: start must be an int"):
            make_shapes(1, seed=1, start=start, size=16)
    with pytest.raises(ConfigError, match="use another seed"):  # it was seed 1's image 0
        make_shapes(2, seed=0, start=1_000_002, size=16)


def test_make_shapes_takes_numpy_integers_with_the_same_pixels():
    a = make_shapes(np.int64(2), seed=np.int64(3), size=np.int32(24), start=np.int64(1))
    b = make_shapes(2, seed=3, size=24, start=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert make_shapes(0, size=16).images.shape == (0, 3, 16, 16)


def test_normalize_checks_images():
    batch = make_shapes(2, seed=0, size=16)
    mean, std = torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1)
    assert torch.equal(normalize(batch.images), (batch.images.float() / 255.0 - mean) / std)  # unchanged
    assert torch.equal(normalize(batch.float_images()), normalize(batch.images))
    with pytest.raises(InputError, match="uint8"):
        normalize(batch.images.float())  # 0..255 floats: was silently ~1000× too large
    with pytest.raises(InputError, match="do not normalize images twice"):
        normalize(normalize(batch.images))
    with pytest.raises(InputTypeError, match="torch.Tensor"):
        normalize(batch.images.numpy())
    for bad in (batch.images.long(), batch.images.bool()):  # int64 0..255 was treated as [0, 1]
        with pytest.raises(InputTypeError, match=r"uint8 \(0..255\) or float"):
            normalize(bad)
    for shape in ((2, 4, 8, 8), (2, 8, 8, 3), (8, 8)):
        with pytest.raises(InputError, match="channels first"):
            normalize(torch.rand(shape))
    with pytest.raises(InputTypeError, match="torch.Tensor"):
        denormalize(np.zeros((1, 3, 2, 2)))
    with pytest.raises(InputError, match="channels first"):
        denormalize(torch.zeros(1, 4, 2, 2))


def test_float_images_needs_uint8_images():
    batch = make_shapes(1, size=16)
    floats = ShapesBatch(batch.float_images(), batch.labels, batch.masks, batch.params)
    with pytest.raises(InputTypeError, match="uint8"):
        floats.float_images()  # was: divided by 255 a second time


def test_render_shape_checks_coordinates():
    with pytest.raises(InputError, match="one shape"):
        render_shape("star", torch.zeros(3, 3), torch.zeros(4, 4))
    with pytest.raises(InputError, match="unknown shape 'Circle'"):
        render_shape("Circle", torch.zeros(3, 3), torch.zeros(3, 3))


def test_write_samples_checks_folder_and_never_half_writes(tmp_path, monkeypatch):
    from PIL import Image

    with pytest.raises(InputTypeError, match="folder must be a path"):
        write_samples(None)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        write_samples(str(afile))
    paths = write_samples(tmp_path / "ok")
    assert len(paths) == 10 and np.array_equal(np.asarray(Image.open(paths[0])), samples().images[0].permute(1, 2, 0))

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "full"
    with pytest.raises(InputError, match="No space left on device"):
        write_samples(out)
    assert os.listdir(out) == []  # no partial PNG, no temporary file


# ------------------------------------------------------------------------------- embedded model


def test_shapes_resnet_checks_pretrained_and_weights(tmp_path):
    for pretrained in ("yes", None, 1):
        with pytest.raises(InputTypeError, match="pretrained must be True or False"):
            shapes_resnet(pretrained)
    with pytest.raises(InputTypeError, match="path of a state-dict file"):
        shapes_resnet(weights=3)
    with pytest.raises(InputError, match="weights file not found"):
        shapes_resnet(weights=str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="weights file not found"):
        shapes_resnet(weights=str(tmp_path))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights"):
        shapes_resnet(weights=str(tmp_path / "junk.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(InputError, match="hold a Tensor, not a state dict"):
        shapes_resnet(weights=str(tmp_path / "tensor.pt"))
    torch.save(ShapesResNet(), tmp_path / "whole.pt")
    with pytest.raises(InputError, match=r"pickled Python objects.*save model.state_dict\(\) instead"):
        shapes_resnet(weights=str(tmp_path / "whole.pt"))
    torch.save(ShapesResNet(num_classes=3).state_dict(), tmp_path / "three.pt")
    with pytest.raises(InputError, match=r"with another shape \(e.g. fc.weight\)"):
        shapes_embedding(weights=str(tmp_path / "three.pt"))
    torch.save(shapes_resnet().state_dict(), tmp_path / "same.pt")
    x = normalize(make_shapes(2, seed=1, size=32).images)
    assert torch.equal(shapes_resnet(weights=tmp_path / "same.pt")(x), shapes_resnet()(x))


def test_sample_indices_are_deterministic():  # the PNGs themselves: test_shapes.py
    assert data_shapes.sample_indices() == data_shapes.sample_indices()


# --------------------------------------------------------------------------------- naflow inspect


class _Stdout:
    def __init__(self, exc: OSError) -> None:
        self.exc = exc

    def write(self, text: str) -> int:
        raise self.exc

    def flush(self) -> None:
        raise self.exc


def test_inspect_stops_quietly_when_the_reader_goes_away(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _Stdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))  # naflow inspect | head
    assert main(["inspect", "--model", "shapes", "--size", "16", "--no-code"]) == 0
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err


def test_inspect_reports_an_unwritable_stdout(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _Stdout(OSError(errno.ENOSPC, "No space left on device")))  # > /dev/full
    code = main(["inspect", "--model", "shapes", "--size", "16", "--no-code"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("naflow: error: cannot write to standard output (No space left on device)")


def test_inspect_output_is_one_write_of_the_same_text(capsys):
    assert main(["inspect", "--model", "shapes", "--size", "16", "--no-code"]) == 0
    out = capsys.readouterr().out
    head, blank, table_head = out.splitlines()[:3]
    assert head.startswith("shapes at 16x16:") and blank == "" and table_head.split()[:2] == ["stage", "kind"]
    assert out.endswith("\n") and not out.endswith("\n\n") and "\n\n  # layer" in out

"""The user's model after compile_naflow: weights changed in place or replaced by like ones are
followed, others ask to compile again (a stale flow would explain the old ones), leaf modules in
training mode change nothing, and weights or observers autograd cannot use are refused at compile
time."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils._pytree import tree_leaves

from naflow_fx import compile_naflow
from naflow_fx.errors import ConfigError, InputError, InputTypeError, UnsupportedModelError


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m[0], "weight", nn.Parameter(torch.randn_like(m[0].weight))),
        lambda m: m.load_state_dict(_net(5).state_dict(), assign=True),
        lambda m: setattr(m[1], "running_var", m[1].running_var * 4),
        lambda m: m.double().float(),
    ],
    ids=["new-parameter", "assign", "new-buffer", "cast-back"],
)
def test_weights_replaced_by_like_ones_after_compile_are_followed(change):
    model = _net()
    nf = compile_naflow(model, X[:1])
    before = nf(X)
    change(model)
    flow = nf(X)
    torch.testing.assert_close(flow.output, model(X))
    fresh = compile_naflow(model, X[:1])(X)
    for name in nf.layers:
        torch.testing.assert_close(flow.maps[name], fresh.maps[name], rtol=1e-4, atol=1e-6)
    changed = not torch.equal(before.output, flow.output)
    assert changed or torch.equal(model(X), _net()(X))  # only casting back keeps the same output


_UNLIKE = {
    "weight-of-another-shape": (
        lambda m: setattr(m[0], "weight", nn.Parameter(torch.rand(6, 3, 1, 1))),
        r"'0.weight' .*replaced by one of shape",
    ),
    "pruned-later": (
        lambda m: prune.l1_unstructured(m[3], "weight", 0.5),
        r"'3.weight' of the model was removed or is now computed",
    ),
    "new-head": (
        lambda m: m.__setitem__(7, nn.Linear(8, 4)),
        r"module '7' \(Linear\) of the model was replaced by a Linear",
    ),
    "same-shape-other-padding": (
        lambda m: m.__setitem__(3, nn.Conv2d(6, 8, 3, padding=2, dilation=2)),
        r"module '3' \(Conv2d\) of the model was replaced",
    ),
    "new-activation": (
        lambda m: m.__setitem__(2, nn.GELU()),
        r"module '2' \(ReLU\) of the model was replaced by a GELU",
    ),
    "removed": (
        lambda m: m.__setitem__(1, nn.Identity()),
        r"module '1' \(BatchNorm2d\) of the model was replaced by an Identity",
    ),
    "padding-changed-in-place": (
        lambda m: setattr(m[3], "padding", (2, 2)),
        r"'padding' of module '3' \(Conv2d\) was changed from \(1, 1\) to \(2, 2\)",
    ),
    "eps-changed-in-place": (
        lambda m: setattr(m[1], "eps", 10.0),
        r"'eps' of module '1' \(BatchNorm2d\) was changed from 1e-05 to 10.0",
    ),
}


@pytest.mark.parametrize("case", list(_UNLIKE))
def test_weights_or_layers_replaced_by_unlike_ones_ask_to_compile_again(case):
    change, what = _UNLIKE[case]
    model = _net()
    nf = compile_naflow(model, X[:1])
    change(model)
    with pytest.raises(InputError, match=f"{what}.* since compile_naflow.*compile it again"):
        nf(X)
    compile_naflow(model, X[:1])(X)  # compiled again, it explains


def test_weights_changed_in_place_are_followed_without_recompiling():
    model = _net()
    nf = compile_naflow(model, X[:1])
    model.load_state_dict(_net(5).state_dict())
    with torch.no_grad():
        model[3].weight.mul_(2)
    torch.testing.assert_close(nf(X, keep="maps").output, model(X))


def test_settings_that_change_nothing_in_eval_may_change_after_compile():
    model = _net()
    nf = compile_naflow(model, X[:1])
    model[2].inplace, model[1].momentum, model[1].track_running_stats = True, 0.5, False
    model[3].note = "annotated by a tool"  # not a setting the flow was traced with
    torch.testing.assert_close(nf(X).output, model(X))
    dropped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    flow = compile_naflow(dropped.eval(), X[:1])
    dropped[1].p = 0.1  # nothing of a dropout changes an eval flow
    flow(X)


def _swap_channels(w: torch.Tensor) -> None:
    w.copy_(w[[1, 0, 2, 3, 4, 5, 6, 7]])


def _keep_row_and_column_sums(w: torch.Tensor) -> None:
    """[[a, b], [b, a]] becomes [[b, a], [a, b]] in the corner: every row's and column's sum is kept, exactly."""
    corner = w.view(w.shape[0], -1)[:2, :2]
    corner.copy_(corner.flip(1))


def _symmetric_corner(model: nn.Module) -> None:
    corner = model[2].weight.data.view(8, -1)[:2, :2]
    corner[1] = corner[0].flip(0)


@pytest.mark.parametrize("change", [_swap_channels, _keep_row_and_column_sums], ids=["swap", "row-and-column-sums"])
def test_a_data_write_that_only_moves_weights_is_followed(change):
    """NOTE [weight cache]: swapping two output channels through ``.data`` keeps every sum and every
    version counter, and a change can keep every row's and column's sum too; the cached
    closed-form inverse of the 1×1 conv must still be made again."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    _symmetric_corner(model)
    nf = compile_naflow(model, X[:1])
    nf(X)  # caches the 1×1 conv's SVD
    weight = model[2].weight
    change(weight.data)
    flow, fresh = nf(X), compile_naflow(model, X[:1])(X)
    assert all(bool(flow.maps[name].any()) for name in nf.layers)
    for name in nf.layers:
        torch.testing.assert_close(flow.maps[name], fresh.maps[name], rtol=1e-4, atol=1e-6)


def test_a_forward_hook_added_after_compile_is_warned_about_once():
    model = _net()
    nf = compile_naflow(model, X[:1])
    handle = model[3].register_forward_hook(lambda m, i, o: o * 0.1)
    with pytest.warns(UserWarning, match=r"forward hooks added since compile_naflow on '3'\. .*differs from model"):
        nf(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf(X)  # said once
        handle.remove()
        nf(X)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)).relu())


def test_leaf_modules_in_training_mode_run_in_eval_mode_and_change_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.Conv2d(6, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    state = copy.deepcopy(model.state_dict())
    nf = compile_naflow(model, X[:1], leaf_modules=[_Block], fallback="linearize")
    flows = [nf(X, keep="maps"), nf(X, keep="maps")]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running statistics untouched
    assert all(m.training for m in model.modules())  # and the training flags as they were
    reference = copy.deepcopy(model).eval()(X)
    for flow in flows:
        torch.testing.assert_close(flow.output, reference)  # no dropout, running statistics
    torch.testing.assert_close(flows[0].maps["1"], flows[1].maps["1"])


def test_a_model_that_fails_on_the_input_prints_no_traceback(capfd):
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    nf = compile_naflow(model, torch.rand(1, 3, 12, 12))
    capfd.readouterr()
    with pytest.raises(InputError, match=r"the model failed on an input of shape \(1, 3, 4, 4\)"):
        nf(torch.rand(1, 3, 4, 4))
    assert capfd.readouterr().err == ""  # fx's generated-code traceback is not printed


def test_weights_made_under_inference_mode_are_refused_at_compile():
    with torch.inference_mode():
        model = _net()
    with pytest.raises(InputError, match=r"made under torch.inference_mode\(\).*outside inference_mode"):
        compile_naflow(model, X[:1])


def _quantized(kind: str) -> nn.Module:
    """``_net`` after one of torch.ao.quantization's workflows (its deprecation warnings silenced)."""
    import torch.ao.quantization as tq
    from torch.ao.quantization.observer import MinMaxObserver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _net()
        if kind == "observer":
            model.insert(1, MinMaxObserver())
            return model
        if kind == "dynamic":  # the head only: it computes in int8 with no autograd kernel
            return tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        if kind == "static":
            model = nn.Sequential(tq.QuantStub(), *model, tq.DeQuantStub()).eval()
            model.qconfig = tq.get_default_qconfig("fbgemm")
            prepared = tq.prepare(model)
            prepared(X)
            return tq.convert(prepared)
        model.train().qconfig = tq.get_default_qat_qconfig("fbgemm")
        qat = tq.prepare_qat(model)
        qat(X)
        if kind == "qat, everything disabled":  # fake quantization then passes values through, but is still there
            qat.apply(tq.disable_observer).apply(tq.disable_fake_quant)
        return qat.eval()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("observer", r"module '1' \(MinMaxObserver\) is a quantization observer, .* before prepare / prepare_fx"),
        ("dynamic", r"module '7' \(Linear\) is a quantized layer \(torch.ao.nn.quantized.dynamic.* every map would be"),
        ("static", r"module '0' \(Quantize\) is a quantized layer .* explain the float model, before quantize_dynamic"),
        ("qat", r"module '0' \(Conv2d\) fake-quantizes weights or activations .* before prepare_qat"),
        ("qat, everything disabled", r"module '0' \(Conv2d\) fake-quantizes weights or activations"),
    ],
)
def test_quantization_modules_are_refused(kind, match):
    """Observers would write into the model; quantized layers have no gradient (a dynamically quantized
    head gave all-zero maps with a warning about the target); fake quantization has no inverse."""
    model = _quantized(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying packed parameters: torch's TypedStorage deprecation
        before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=match):
        compile_naflow(model, X[:1])
    # packed quantized parameters are tuples of tensors and dtypes
    leaves = [(a, b) for k, v in model.state_dict().items() for a, b in zip(tree_leaves(v), tree_leaves(before[k]))]
    assert all(torch.equal(a, b) if isinstance(a, Tensor) else a == b for a, b in leaves)


def test_fused_float_modules_explain_as_their_layers():
    """torch.ao.nn.intrinsic.ConvReLU2d (fuse_modules) is a float conv and ReLU: the same maps."""
    from torch.ao.quantization import fuse_modules

    model = _net()
    fused = fuse_modules(copy.deepcopy(model), [["0", "1", "2"], ["3", "4"]])
    assert type(fused[0]).__module__.startswith("torch.ao.nn.intrinsic")
    a, b = compile_naflow(model, X[:1])(X, keep="maps"), compile_naflow(fused, X[:1])(X, keep="maps")
    torch.testing.assert_close(b.maps[b.layers[-1]], a.maps[a.layers[-1]], rtol=1e-4, atol=1e-6)
    # torchvision's quantizable models before quantization are float: their adds are FloatFunctional
    import torchvision

    quantizable = torchvision.models.quantization.resnet18(weights=None, quantize=False, num_classes=4).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    flow = compile_naflow(quantizable, x, layers="blocks", max_iter=5)
    assert any(n.startswith("layer1.0.") for n in flow.layers)


def test_torchvision_frozen_batch_norm_is_one_batch_norm_layer():
    """FrozenBatchNorm2d (torchvision's detection backbones) was traced into a multiply and an add,
    reported as two layers '1.mul' and '1.add'; it is now the one layer '1', as a BatchNorm2d is."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _net()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    frozen = copy.deepcopy(model)
    frozen[1] = FrozenBatchNorm2d(6, eps=model[1].eps)
    frozen[1].load_state_dict({k: v for k, v in model[1].state_dict().items() if k != "num_batches_tracked"})
    a, b = compile_naflow(frozen, X[:1]), compile_naflow(model, X[:1])
    assert a.layers == b.layers and "1" in a.layers
    for name, value in a(X).maps.items():
        torch.testing.assert_close(value, b(X).maps[name])
    with torch.no_grad():
        frozen[1].weight.mul_(2.0)  # its buffers are followed after compiling, as a BatchNorm's
    torch.testing.assert_close(a(X).output, frozen(X), rtol=1e-5, atol=1e-6)


def test_targets_is_another_name_for_target():
    nf = compile_naflow(_net(), X[:1])
    a, b = nf(X, target=[1, 2], keep="maps"), nf(X, targets=[1, 2], keep="maps")
    assert a.classes.tolist() == b.classes.tolist() == [1, 2]
    torch.testing.assert_close(a.maps["4"], b.maps["4"])
    assert nf.gradcam(X, targets=[3, 0]).classes.tolist() == [3, 0]
    with pytest.raises(ConfigError, match="pass the target once"):
        nf(X, 1, targets=[1, 2])


def test_input_tensor_is_another_name_for_x_as_pytorch_grad_cam_spells_it():
    nf = compile_naflow(_net(), X[:1])
    a, b = nf(X, [1, 2], keep="maps"), nf(input_tensor=X, targets=[1, 2], keep="maps")
    torch.testing.assert_close(a.maps["4"], b.maps["4"], rtol=0, atol=0)
    for method in (nf.gradcam, nf.layercam):
        torch.testing.assert_close(method(input_tensor=X, targets=[3, 0]).maps["4"], method(X, [3, 0]).maps["4"])
    with pytest.raises(ConfigError, match="pass the images once: as x or as input_tensor"):
        nf(X, input_tensor=X)
    with pytest.raises(ConfigError, match="pass the images once"):
        nf.gradcam(X, input_tensor=X)
    with pytest.raises(InputTypeError, match=r"nf\(\) needs the images: nf\(x\) with x a Tensor\[B, C, H, W\]"):
        nf()
    with pytest.raises(InputTypeError, match=r"nf.layercam\(\) needs the images"):
        nf.layercam(targets=[1, 2])


def test_a_sparse_input_is_refused_clearly():
    nf = compile_naflow(_net(), X[:1])
    with pytest.raises(InputError, match=r"the input is a sparse_coo tensor; pass a dense one, e.g. x.to_dense\(\)"):
        nf(X.to_sparse())


def test_a_list_or_array_of_images_is_told_how_to_make_a_batch():

    from naflow_fx.errors import InputTypeError

    nf = compile_naflow(_net(), X[:1])
    with pytest.raises(InputTypeError, match=r"got list; for a list of images .* torch.stack\(images\)"):
        nf(list(X))
    with pytest.raises(InputTypeError, match=r"got ndarray; convert it with torch.from_numpy\(x\)"):
        nf(X.numpy())


def test_a_dataclass_output_is_named_with_its_fields_and_the_field_to_return():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        feats: torch.Tensor
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            f = self.conv(x).relu()
            return Out(f, self.fc(f.mean((2, 3))))

    with pytest.raises(UnsupportedModelError, match=r"returns an Out dataclass with fields \['feats', 'logits'\]") as e:
        compile_naflow(Net().eval(), X[:1])
    assert "return self.model(x).logits" in str(e.value)


def test_tied_weights_untied_after_compile_are_followed_per_path():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
            self.b.weight = self.a.weight
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.b(self.a(x).relu()).relu().mean((2, 3)))

    model = Tied().eval()
    nf = compile_naflow(model, X[:1])
    original = model.a.weight.detach().clone()
    model.b.weight = nn.Parameter(model.a.weight.detach() * 2)  # untied: only b's changed
    for _ in range(3):  # the same flow on every call, not the old and the new weights in turn
        torch.testing.assert_close(nf(X, keep="maps").output, model(X))
    assert torch.equal(model.a.weight, original)  # a's own weight untouched


def test_a_module_swapped_with_another_models_leaves_that_model_alone():
    first, second = _net(0), _net(1)
    nf = compile_naflow(first, X[:1])
    reference = second(X)
    first[0], second[0] = second[0], first[0]
    with pytest.raises(InputError, match=r"module '0' \(Conv2d\) of the model was replaced"):
        nf(X)
    first[0], second[0] = second[0], first[0]
    torch.testing.assert_close(second(X), reference)


class _InPlace(nn.Module):
    """Scales its input in place, as some preprocessing steps do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x.mul_(0.5))


def test_compiling_leaves_the_example_alone_when_forward_changes_its_input():
    x = X[:1].clone()
    nf = compile_naflow(_InPlace().eval(), x)  # not refused: the check's two runs get copies
    assert torch.equal(x, X[:1])
    nf(X.clone())


def test_lazy_layers_must_be_made_before_compiling():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(InputError, match=r"lazy layers .*run it once on a batch, model\(x\), before compile_naflow"):
        compile_naflow(model, X[:1])
    model(X[:1])
    compile_naflow(model, X[:1])(X)


def test_pruning_removed_after_compile_asks_to_compile_again():
    model = _net()
    prune.l1_unstructured(model[3], "weight", 0.5)
    nf = compile_naflow(model, X[:1])
    nf(X)
    prune.remove(model[3], "weight")
    with pytest.raises(InputError, match="compile it again"):
        nf(X)


def test_embedding_a_gallery_runs_leaf_modules_in_eval_mode():
    from naflow_fx.retrieval import explain_match

    torch.manual_seed(0)
    encoder = nn.Sequential(_Block(), nn.Conv2d(6, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    state = copy.deepcopy(encoder.state_dict())
    nf = compile_naflow(encoder, X[:1], leaf_modules=[_Block], fallback="linearize")
    explain_match(
        nf, X[:1], torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2)), explain_matches=False
    )
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key

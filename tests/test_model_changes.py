"""The user's model after compile_naflow: weights changed in place or replaced by like ones are
followed, others ask to compile again (a stale flow would explain the old ones), leaf modules in
training mode change nothing, and weights or observers autograd cannot use are refused at compile
time."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from naflow_fx import compile_naflow
from naflow_fx.errors import ConfigError, InputError, UnsupportedModelError


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


def test_quantization_observers_are_refused():
    from torch.ao.quantization.observer import MinMaxObserver

    model = _net()
    model.insert(1, MinMaxObserver())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(MinMaxObserver\) is a quantization observer"):
        compile_naflow(model, X[:1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_targets_is_another_name_for_target():
    nf = compile_naflow(_net(), X[:1])
    a, b = nf(X, target=[1, 2], keep="maps"), nf(X, targets=[1, 2], keep="maps")
    assert a.classes.tolist() == b.classes.tolist() == [1, 2]
    torch.testing.assert_close(a.maps["4"], b.maps["4"])
    assert nf.gradcam(X, targets=[3, 0]).classes.tolist() == [3, 0]
    with pytest.raises(ConfigError, match="pass the target once"):
        nf(X, 1, targets=[1, 2])


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

"""The user's model after compile_naflow: weights changed in place or replaced by like ones are
followed, others ask to compile again (a stale flow would explain the old ones), leaf modules in
training mode change nothing, and weights or observers autograd cannot use are refused at compile
time."""

from __future__ import annotations

import copy

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
        lambda m: m.__setitem__(7, nn.Linear(8, 4)),
        lambda m: m.double().float(),
    ],
    ids=["new-parameter", "assign", "new-buffer", "new-head", "cast-back"],
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


@pytest.mark.parametrize(
    "change, what",
    [
        (
            lambda m: m.__setitem__(7, nn.Linear(8, 3)),
            r"parameter '7.weight' of the model was replaced by one of shape",
        ),
        (
            lambda m: prune.l1_unstructured(m[3], "weight", 0.5),
            r"'3.weight' of the model was removed or is now computed",
        ),
        (lambda m: m.__setitem__(1, nn.Identity()), r"'1.[a-z_]+' of the model was removed"),
    ],
    ids=["head-of-another-shape", "pruned-later", "layer-removed"],
)
def test_weights_replaced_by_unlike_ones_ask_to_compile_again(change, what):
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

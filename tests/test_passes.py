"""The compiler passes: normalize, partition, assign_rules, codegen, and tracing errors."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from naflow_fx import UnsupportedModelError, UnsupportedOpError, compile_naflow
from naflow_fx.canonical import CANONICAL_SIGNATURES
from naflow_fx.passes import assign_inverse_rules, normalize, partition_stages, propagate_shapes
from naflow_fx.passes.partition import articulation_nodes, feature_subgraph
from naflow_fx.tracing import trace


def _compile_graph(model: nn.Module, shape=(1, 3, 8, 8), last_layer=None) -> fx.GraphModule:
    gm = normalize(trace(model))
    gm.graph.lint()
    gm = propagate_shapes(gm, torch.randn(shape))
    gm = partition_stages(gm, last_layer)
    gm.graph.lint()
    return gm


class Aliases(nn.Module):
    """The same ReLU written five ways, plus clamp/relu6 spellings and dropout/identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.conv(x)
        x = self.relu(x)
        x = F.relu(x, inplace=True)
        x = torch.relu(x)
        x = x.relu()
        x.relu_()
        x = self.drop(self.ident(x))
        x = F.dropout(x, 0.3, training=True)
        x = x.clamp(min=0.0, max=6.0)
        x = F.relu6(x)
        x = self.relu6(x)
        return x.flatten(1)


def test_normalize_makes_one_canonical_op_per_node_and_removes_identities():
    gm = normalize(trace(Aliases()))
    gm.graph.lint()
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    targets = [n.target for n in calls]
    assert targets.count(torch.relu) == 5
    assert targets.count(F.hardtanh) == 3
    assert all(n.op == "call_function" for n in calls), [n.format_node() for n in calls]
    assert all(t in CANONICAL_SIGNATURES for t in targets)
    assert not any("dropout" in str(t) for t in targets)
    # canonical form: one positional (the input), the rest as kwargs with defaults filled in
    conv = next(n for n in calls if n.target is torch.conv2d)
    assert len(conv.args) == 1 and set(conv.kwargs) == {"weight", "bias", "stride", "padding", "dilation", "groups"}
    assert conv.meta["naflow.name"] == "conv"
    # in-place x.relu_() read by the later nodes: the chain is linear
    for n in calls[1:]:
        assert n.args[0].op == "call_function"


@pytest.mark.parametrize(
    "clip",
    [
        lambda x: x.clamp_max(0.5),
        lambda x: x.clamp_min(-0.1),
        lambda x: torch.clamp_max(x, max=0.5),
        lambda x: torch.clamp_min(x, -0.1),
        lambda x: (x * 1).clamp_max_(0.3),
        lambda x: torch.clamp_min_(x * 1, -0.2),
    ],
    ids=["method-max", "method-min", "function-max", "function-min", "in-place-method-max", "in-place-function-min"],
)
def test_one_sided_clamps_lower_to_hardtanh_in_every_spelling(clip):
    """``x.clamp_min`` and ``torch.clamp(max=)`` were inverted, but ``x.clamp_max``, ``torch.clamp_min``
    and ``torch.clamp_max`` were refused as ops without an inverse rule."""

    class Clipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.b(clip(self.a(x))).mean((2, 3))

    torch.manual_seed(0)
    model, x = Clipped().eval(), torch.randn(2, 2, 6, 6)
    gm = normalize(trace(model))
    torch.testing.assert_close(gm(x), model(x))
    hardtanh = [n for n in gm.graph.nodes if n.target is F.hardtanh]
    assert len(hardtanh) == 1 and not any("clamp" in str(n.target) for n in gm.graph.nodes)
    flow = compile_naflow(model, x)(x)
    assert flow.diagnostics[hardtanh[0].meta["naflow.name"]].rule == "hardtanh_inverse"


def test_normalize_in_place_method_rewires_later_readers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            y.mul_(2.0)  # result unused, y mutated
            return y + 1

    model = M().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = normalize(trace(model))
    assert torch.allclose(gm(x), model(x))
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    assert add.args[0].target == "mul"  # reads the out-of-place product, not the conv output
    assert torch.equal(x, x.clone())  # placeholders are never mutated


def test_normalize_does_not_mutate_the_input_tensor():
    class M(nn.Module):
        def forward(self, x):
            x.add_(1.0)
            return x

    x = torch.zeros(1, 1, 2, 2)
    gm = normalize(trace(M()))
    out = gm(x)
    assert torch.equal(x, torch.zeros(1, 1, 2, 2)) and torch.equal(out, torch.ones(1, 1, 2, 2))


def test_normalize_uses_eval_semantics_for_a_model_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.9), nn.ReLU())
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 8, 8)
    assert model.training
    expected = nn.Sequential(*model).eval()(x)
    model.train()
    assert torch.allclose(gm(x), expected)


def test_padding_modes_lower_to_pad_and_conv():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    gm = normalize(trace(model))
    x = torch.randn(1, 2, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [F.pad, torch.conv2d, torch.relu]


@pytest.mark.parametrize(
    ("pad", "conv_padding"),
    [
        (nn.ZeroPad2d(1), dict(padding=1)),
        (nn.ReflectionPad2d(1), dict(padding=1, padding_mode="reflect")),
        (nn.ReplicationPad2d(1), dict(padding=1, padding_mode="replicate")),
        (nn.CircularPad2d(1), dict(padding=1, padding_mode="circular")),
        (nn.ConstantPad2d((1, 2, 0, 1), 0.5), None),
    ],
)
def test_padding_modules_lower_to_pad_and_give_the_conv_padding_flow(pad, conv_padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(pad, conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][:3] == [F.pad, torch.conv2d, torch.relu]
    flow = compile_naflow(model, x)(x)  # before: UnsupportedOpError on the padding module
    assert flow.layers[0] == "0" and all(torch.isfinite(m).all() for m in flow.maps.values())
    if conv_padding is not None:  # the same network as a conv that pads itself
        same = nn.Sequential(nn.Conv2d(3, 4, 3, **conv_padding), *list(model)[2:]).eval()
        same[0].load_state_dict(conv.state_dict())
        ref = compile_naflow(same, x)(x)
        torch.testing.assert_close(flow.maps["2"], ref.maps["1"])


def test_selu_and_celu_modules_functions_and_in_place_forms_lower_to_one_target():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.selu, self.celu = nn.SELU(), nn.CELU(0.7)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.selu_(self.celu(self.conv1(x)))
            x = F.celu(self.selu(self.conv2(x)), alpha=1.5)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    acts = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.selu, F.celu)]
    assert acts == [F.celu, F.selu, F.selu, F.celu]
    flow = compile_naflow(model, x)(x)  # before: UnsupportedOpError on SELU and CELU
    assert all(torch.isfinite(m).all() for m in flow.maps.values())


@pytest.mark.parametrize(
    ("norm", "target"),
    [
        (nn.GroupNorm(2, 4), F.group_norm),
        (nn.InstanceNorm2d(4, affine=True), F.instance_norm),  # the sample's own statistics
        (nn.InstanceNorm2d(4, track_running_stats=True), F.batch_norm),  # eval: running statistics
        (nn.LocalResponseNorm(3), F.local_response_norm),
    ],
)
def test_normalisation_modules_lower_to_their_functions_and_explain(norm, target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 2))
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    model.eval()
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][:3] == [torch.conv2d, target, torch.relu]
    flow = compile_naflow(model, x)(x)  # before: UnsupportedOpError on the normalisation module
    assert flow.diagnostics["1"].rule == f"{target.__name__}_inverse"
    assert all(torch.isfinite(m).all() for m in flow.maps.values())


class _SegNetLike(nn.Module):
    """Max pooling with indices for unpooling, as a module or a function; an adaptive max pool too."""

    def __init__(self, modules: bool) -> None:
        super().__init__()
        self.modules_, self.enc, self.dec = modules, nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, 2, return_indices=True), nn.MaxUnpool2d(2, 2)
        self.gmp, self.head = nn.AdaptiveMaxPool2d(1, return_indices=True), nn.Linear(4, 3)

    def forward(self, x):
        if self.modules_:
            y, i = self.pool(torch.relu(self.enc(x)))
            y = self.dec(self.unpool(y, i, output_size=x.shape[-2:]))
            return self.head(self.gmp(y)[0].flatten(1))
        y, i = F.max_pool2d(torch.relu(self.enc(x)), 2, 2, return_indices=True)
        y = self.dec(F.max_unpool2d(y, i, 2, 2, output_size=x.shape[-2:]))
        return self.head(F.adaptive_max_pool2d(y, 1, return_indices=True)[0].flatten(1))


class _Values(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)[0].flatten(1)


def test_max_pool_modules_that_return_indices_explain_like_the_functions():
    """``nn.MaxPool2d(return_indices=True)`` (SegNet's encoder) used to be refused outright, though
    the same model written with ``F.max_pool2d(..., return_indices=True)`` explained (its unpooling
    needs the fallback: ``max_unpool2d`` has no inverse rule of its own)."""
    torch.manual_seed(0)
    modules, functions, x = _SegNetLike(True).eval(), _SegNetLike(False).eval(), torch.randn(2, 2, 8, 10)
    functions.load_state_dict(modules.state_dict())
    gm = normalize(trace(modules))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.max_pool2d_with_indices in targets and F.adaptive_max_pool2d_with_indices in targets
    with pytest.raises(UnsupportedOpError, match="unpool"):  # MaxUnpool2d has no inverse rule of its own
        compile_naflow(modules, x)
    nf = compile_naflow(modules, x, fallback="linearize", solver="dense")
    assert nf.layers[:3] == ["enc", "relu", "pool"]  # the pooled values are the layer, named by the module
    for last in ("pool", modules.pool):  # and the module or its name stands for them (decision 20)
        assert compile_naflow(modules, x, fallback="linearize", last_layer=last).last_layer == "pool"
    assert compile_naflow(modules, x, fallback="linearize", layers=[modules.pool]).layers == ["pool"]
    # a head's adaptive max pool to 1×1 is the global pool, with its indices or without
    head = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1, return_indices=True))
    assert compile_naflow(_Values(head).eval(), x).last_layer == "head.1"
    flows = [compile_naflow(m, x, fallback="linearize", solver="dense")(x) for m in (modules, functions)]
    torch.testing.assert_close(flows[0].output, flows[1].output)
    assert len(flows[0].maps) == len(flows[1].maps)
    for a, b in zip(flows[0].maps.values(), flows[1].maps.values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_functional_instance_norm_never_updates_the_models_running_statistics(use_input_stats):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
            self.register_buffer("mean", torch.rand(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x):
            y = F.instance_norm(self.conv(x), self.mean, self.var, use_input_stats=use_input_stats)
            return self.fc(torch.relu(y).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    flow = compile_naflow(model, x)(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model's own call updates them
    assert flow.diagnostics["instance_norm"].rule == "instance_norm_inverse"
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x))


class _Arithmetic(nn.Module):
    """conv → ReLU → ``f(·)`` (a lone stage) → conv → ReLU → head."""

    def __init__(self, f):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.f, self.fc = f, nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.f(self, torch.relu(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize(
    ("f", "c"),
    [
        (lambda m, y: y * 2.0, 2.0),
        (lambda m, y: 2.0 * y, 2.0),
        (lambda m, y: y / 4, 0.25),
        (lambda m, y: torch.div(y, 4), 0.25),
        (lambda m, y: y.mul(3), 3.0),
        (lambda m, y: y + 1, 1.0),
        (lambda m, y: 1 - y, -1.0),
        (lambda m, y: -y, -1.0),
        (lambda m, y: y * m.scale, None),  # a learnt per-channel scale
    ],
)
def test_arithmetic_with_a_constant_is_inverted_exactly(f, c):
    torch.manual_seed(0)
    model = _Arithmetic(f).eval()
    x = torch.randn(2, 3, 8, 8)
    nf = compile_naflow(model, x)  # before: UnsupportedOpError on the lone mul/add/...
    flow = nf(x)
    step = nf.layers[2]
    rec = flow.diagnostics[step]
    assert (rec.rule, rec.method) == ("elementwise_affine_inverse", "closed form")
    scale = model.scale.detach() if c is None else c
    theta = f(model, torch.zeros(1, 4, 8, 8)).detach()  # f(y) = c·y + θ
    live = flow.coefficients["relu"] != 0  # abandoning keeps B_u where Λ_u ≠ 0
    torch.testing.assert_close(flow.bpfm["relu"], torch.where(live, (flow.bpfm[step] - theta) / scale, 0))


def test_arithmetic_that_is_not_affine_in_the_feature_is_still_refused():
    for f in (lambda m, y: 1 / (y + 1), lambda m, y: torch.div(y, 3, rounding_mode="floor")):
        with pytest.raises(UnsupportedOpError, match="no inverse rule"):
            compile_naflow(_Arithmetic(f).eval(), torch.randn(1, 3, 8, 8))


def test_batch_statistics_of_weights_are_kept_and_of_features_refused():
    class StdConv(nn.Conv2d):  # weight standardisation, as NF-ResNets do it
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-5)
            return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 2))
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(normalize(trace(model.eval()))(x), model(x), atol=1e-6)
    flow = compile_naflow(model, x)(x)  # before: "running_mean must be defined in evaluation mode"
    assert all(torch.isfinite(m).all() for m in flow.maps.values())

    class BatchStats(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    features = nn.Sequential(nn.Conv2d(3, 4, 3), BatchStats(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UnsupportedOpError, match="F.batch_norm without running statistics .* batch statistics"):
        compile_naflow(features.eval(), x)


def test_bn_without_running_stats_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(UnsupportedOpError, match="track_running_stats=False"):
        normalize(trace(model))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.b(self.relu(self.a(x)))
        out += x
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def test_partition_finds_articulation_nodes_regions_and_last_layer():
    gm = _compile_graph(Residual())
    plan = gm.meta["naflow.plan"]
    names = {n.name: n.meta["naflow.name"] for n in gm.graph.nodes}
    assert names[plan.last] == "relu#3"
    kinds = [(names[s.input], names[s.output], s.is_region) for s in plan.stages]
    assert kinds == [("x", "stem", False), ("stem", "relu", False), ("relu", "add", True), ("add", "relu#3", False)]
    region = plan.stages[2]
    assert [names[b] for b in region.body] == ["a", "relu#2", "b", "add"]
    assert [names[n] for n in plan.layers] == ["stem", "relu", "a", "relu#2", "b", "add", "relu#3"]


def test_articulation_nodes_on_a_diamond():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b1 = g.call_function(torch.sigmoid, (a,))
    b2 = g.call_function(torch.tanh, (a,))
    c = g.call_function(operator.add, (b1, b2))
    d = g.call_function(torch.relu, (c,))
    g.output(d)
    gm = fx.GraphModule(nn.Module(), g)
    propagate_shapes(gm, torch.randn(1, 2, 3, 3))
    nodes = feature_subgraph(gm.graph, x, d)
    assert [n.name for n in articulation_nodes(nodes)] == ["x", "relu", "add", "relu_1"]


def test_default_last_layer_stops_before_global_pooling():
    import torchvision

    vgg = torchvision.models.vgg11()
    nf = compile_naflow(vgg, (1, 3, 64, 64), layers=["features.20"])
    assert nf.last_layer == "features.20"  # the last max-pool (2×2), not the adaptive avgpool after it
    nf = compile_naflow(vgg, (1, 3, 32, 32), layers=["features.19"])
    assert nf.last_layer == "features.19"  # at 32×32 the last max-pool is global (2×2 → 1×1): N is before it
    res = torchvision.models.resnet18()
    nf = compile_naflow(res, (1, 3, 32, 32), layers=["layer4.1.relu#2"])
    assert nf.last_layer == "layer4.1.relu#2"  # output of layer4


def test_an_adaptive_pool_that_convolutions_follow_is_not_the_global_pool():
    """A spatial adaptive pool mid-network (here 9×13 → 11×15) was taken for the head's global
    pool, so N stopped before it and every later layer went unexplained, without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d((11, 15)), nn.Conv2d(3, 4, 3), nn.ReLU(),
        nn.AdaptiveMaxPool2d((5, 6)), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    nf = compile_naflow(model, (1, 2, 9, 13))
    assert nf.last_layer == "6"  # the last spatial adaptive pool, with a Linear after it, is the head's
    assert nf.layers == ["0", "1", "2", "3", "4", "5", "6"]
    # a classifier written as convolutions (7×7 to 1×1, then 1×1) after the head's pool is still the head
    head = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(4, 8, 7), nn.ReLU(), nn.Conv2d(8, 3, 1), nn.Flatten())
    fully_convolutional = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *head).eval()
    for size in (28, 64):
        assert compile_naflow(fully_convolutional, (1, 2, size, size)).last_layer == "2"


def test_last_layer_override_and_its_error():
    model = Residual()
    nf = compile_naflow(model, (1, 3, 8, 8), last_layer="stem")
    assert nf.layers == ["stem"]
    with pytest.raises(UnsupportedModelError, match="Choose one of: stem, relu, add, relu#3"):
        compile_naflow(model, (1, 3, 8, 8), last_layer="a")  # inside the residual region


def test_a_complex_intermediate_is_named_and_its_leaf_module_route_works():
    class Spectrum(nn.Module):
        def forward(self, y):
            return torch.fft.fft2(y).abs()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spectrum, self.fc = nn.Conv2d(3, 4, 3, padding=1), Spectrum(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.spectrum(self.conv(x)).mean((2, 3)))

    model = M().eval()
    with pytest.raises(UnsupportedModelError, match=r"through 'spectrum.fft_fft2'.*complex64.*leaf_modules"):
        compile_naflow(model, (1, 3, 8, 8))
    flow = compile_naflow(model, (1, 3, 8, 8), leaf_modules=[Spectrum], fallback="linearize")  # what it advises
    assert flow.layers == ["conv", "spectrum"]

    class Constant(nn.Module):  # no path at all keeps the plain message
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(1, 2))

        def forward(self, x):
            return self.bias * 1.0

    with pytest.raises(UnsupportedModelError, match="the model's output does not depend on its input$"):
        compile_naflow(Constant(), (1, 3, 8, 8))


def test_assign_rules_reports_every_unsupported_node_at_once():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            x = torch.cumsum(self.conv(x), 2)
            x = torch.special.erf(x)
            return x.mean((2, 3))

    gm = _compile_graph(M(), last_layer=None)
    with pytest.raises(UnsupportedOpError) as err:
        assign_inverse_rules(gm)
    msg = str(err.value)
    assert "2 node(s)" in msg and "cumsum" in msg and "erf" in msg and "fallback='linearize'" in msg
    gm = assign_inverse_rules(gm, fallback="linearize")
    kinds = {n.name: n.meta["naflow.inverse"].kind for n in gm.graph.nodes if "naflow.inverse" in n.meta}
    assert kinds == {"conv": "rule", "cumsum": "linearize", "special_erf": "linearize"}


class _Cumulated(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 2)


def test_unsupported_functional_ops_are_named_by_their_layer():
    """Two blocks' ``torch.cumsum`` are layers ``b1.cumsum`` and ``b2.cumsum`` everywhere (decision
    1); the error listed them as ``[cumsum]`` and ``[cumsum]``."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Cumulated(), nn.Conv2d(4, 4, 1), _Cumulated(), nn.Conv2d(4, 2, 1))
    with pytest.raises(UnsupportedOpError) as err:
        compile_naflow(model.eval(), (1, 3, 6, 6))
    assert "[layer '1.cumsum' (cumsum)]" in str(err.value) and "[layer '3.cumsum' (cumsum)]" in str(err.value)
    assert compile_naflow(model, (1, 3, 6, 6), fallback="linearize").layers[1::2] == ["1.cumsum", "3.cumsum"]


def test_generated_inverse_code_names_the_forward_nodes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU())
    nf = compile_naflow(model, (1, 3, 10, 10))
    code = nf.inverse.code
    nf.inverse.graph.lint()
    assert "inv__4 = naflow_fx_rules_pointwise_relu_inverse(solver, _4, _3, layer = '4')" in code
    assert "conv2d_inverse(solver, bpfm__3, _2, weight = _3_weight" in code
    assert "bpfm__1 = naflow_fx_rules_abandon(inv__2, lam__1)" in code
    assert "layer = '2'" in code and "max_pool2d_inverse" in code


def test_inverse_network_stops_at_the_shallowest_requested_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    nf = compile_naflow(model, (1, 3, 8, 8), layers=["2", "3"])
    code = nf.inverse.code
    assert "conv2d_inverse" not in code and "relu_inverse" in code
    flow = nf(torch.randn(1, 3, 8, 8), target=lambda out: out.sum((1, 2, 3)))
    assert list(flow.diagnostics) == ["3"]


def test_untraceable_model_names_the_offending_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            x = self.conv(x)
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return x

    with pytest.raises(UnsupportedModelError) as err:
        compile_naflow(Branchy(), (1, 3, 8, 8))
    msg = str(err.value)
    assert "if x.sum() > 0:" in msg and "test_passes.py" in msg and "leaf_modules" in msg


def test_leaf_modules_policy():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * 2

    model = nn.Sequential(Block(), nn.ReLU())
    gm = trace(model, leaf_modules=[Block])
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    gm = trace(model, leaf_modules=["0"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    nf = compile_naflow(model, (1, 3, 6, 6), leaf_modules=[Block], fallback="linearize")
    flow = nf(torch.randn(1, 3, 6, 6), target=lambda out: out.sum((1, 2, 3)))
    assert flow.layers == ["0", "1"] and flow.diagnostics["1"].rule == "relu_inverse"


def test_tracing_does_not_run_user_hooks_and_restores_them():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 3))
    calls = []

    def numpy_hook(module, inputs, output):  # would fail on an fx proxy
        calls.append(output.detach().cpu().numpy().shape)

    handle = model[0].register_forward_hook(numpy_hook)
    pre = model[1].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    nf = compile_naflow(model, (1, 3, 9, 9))
    assert calls == []
    nf(torch.randn(1, 3, 9, 9), target=lambda out: out.sum((1, 2, 3)))
    assert calls == []
    model(torch.randn(1, 3, 9, 9))
    assert calls == [(1, 4, 7, 7), "pre"]
    handle.remove()
    pre.remove()


class ShuffleBlock(nn.Module):
    """ShuffleNet-style: chunk → branch on one half → cat → channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.relu(x)


def test_tuple_nodes_stay_inside_regions_and_layer_norm_is_inverted():
    torch.manual_seed(0)
    model = ShuffleBlock().eval()
    nf = compile_naflow(model, (1, 3, 6, 6), solver="dense", damping=0.0)
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    boundaries = {s.input for s in nf.plan.stages} | {s.output for s in nf.plan.stages}
    assert not any(nodes[b].target == "chunk" for b in boundaries)
    region = next(s for s in nf.plan.stages if s.is_region)
    assert nodes[region.output].target is torch.cat
    flow = nf(torch.randn(2, 3, 6, 6), target=lambda out: out.sum((1, 2, 3)))
    assert flow.diagnostics["norm"].rule == "layer_norm_inverse"
    assert flow.diagnostics["cat"].rule == "region_inverse"
    assert all(bool(torch.isfinite(m).all()) for m in flow.maps.values())
    assert {"branch.0", "branch.1", "branch.2"} <= set(flow.layers)  # layers inside the region have maps


@pytest.mark.parametrize(
    ("layer", "channels", "target", "rule"),
    [
        (nn.Upsample(scale_factor=2), 4, F.interpolate, "interpolate_inverse"),
        (nn.Upsample(scale_factor=1.5, mode="bicubic"), 4, F.interpolate, "interpolate_inverse"),
        (nn.UpsamplingNearest2d(size=(9, 7)), 4, F.interpolate, "interpolate_inverse"),
        (nn.UpsamplingBilinear2d(scale_factor=2), 4, F.interpolate, "interpolate_inverse"),
        (nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), 3, torch.conv_transpose2d, None),
        (nn.PixelShuffle(2), 1, torch.pixel_shuffle, "pixel_shuffle_inverse"),
        (nn.PixelUnshuffle(2), 16, torch.pixel_unshuffle, "pixel_unshuffle_inverse"),
        (nn.ChannelShuffle(2), 4, torch.channel_shuffle, "channel_shuffle_inverse"),
        # decision 36
        (nn.SyncBatchNorm(4), 4, F.batch_norm, "batch_norm_inverse"),
        (nn.RReLU(), 4, F.leaky_relu, "leaky_relu_inverse"),
        (nn.LogSigmoid(), 4, F.logsigmoid, "logsigmoid_inverse"),
        (nn.Softsign(), 4, F.softsign, "softsign_inverse"),
        (nn.Tanhshrink(), 4, F.tanhshrink, "tanhshrink_inverse"),
        (nn.Hardshrink(0.05), 4, F.hardshrink, "hardshrink_inverse"),
        (nn.Softshrink(0.05), 4, F.softshrink, "softshrink_inverse"),
        (nn.Threshold(0.05, -1.0), 4, F.threshold, "threshold_inverse"),
        (nn.GLU(dim=1), 2, F.glu, "glu_inverse"),
        (nn.Softmax2d(), 4, F.softmax, "softmax_inverse"),
        (nn.Softmax(dim=1), 4, F.softmax, "softmax_inverse"),
        (nn.LogSoftmax(dim=1), 4, F.log_softmax, "log_softmax_inverse"),
        (nn.LPPool2d(2, 2), 4, F.lp_pool2d, "lp_pool2d_inverse"),
    ],
)
def test_more_torch_nn_layers_lower_and_explain(layer, channels, target, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model.append(nn.Flatten()).append(nn.Linear(channels, 2)).eval()
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][:3] == [torch.conv2d, torch.relu, target]
    flow = compile_naflow(model, x)(x)  # before: UnsupportedOpError on the module
    assert flow.diagnostics["2"].rule == (rule or f"{target.__name__}_inverse")
    assert flow.diagnostics["2"].converged
    assert all(torch.isfinite(m).all() for m in flow.maps.values())


def test_a_transposed_conv_given_output_size_is_reported_or_linearized():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up, self.fc = nn.Conv2d(3, 4, 3, 2, 1), nn.ConvTranspose2d(4, 4, 3, 2, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.up(F.relu(self.conv(x)), output_size=x.shape[-2:]).mean((2, 3)))

    model, x = Net().eval(), torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedOpError, match=r"module 'up' \(ConvTranspose2d\)"):
        compile_naflow(model, x)
    flow = compile_naflow(model, x, fallback="linearize")(x)
    assert flow.diagnostics["up"].rule == "linearized_inverse" and flow.maps["up"].shape == (1, 6, 6)


class FunctionalOps(nn.Module):
    """Ops a model writes as functions: softmax over the channels (fx records its ``_stacklevel``) and
    FilterResponseNorm's TLU, ``torch.maximum(x, τ)`` with a learnt per-channel τ."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
        self.tau = nn.Parameter(torch.randn(1, 4, 1, 1) * 0.1)

    def forward(self, x):
        y = self.conv(x)
        if self.op == "softmax":
            y = F.softmax(y, dim=1)
        elif self.op == "log_softmax":
            y = F.log_softmax(y, 1)
        else:
            y = torch.maximum(y, self.tau)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("op", "rule"), [("softmax", "softmax"), ("log_softmax", "log_softmax"), ("tlu", "maximum")])
def test_functional_softmax_and_a_maximum_with_a_parameter_explain(op, rule):
    torch.manual_seed(0)
    model, x = FunctionalOps(op).eval(), torch.randn(2, 3, 6, 6)
    flow = compile_naflow(model, x[:1])(x)  # before: "cannot read the arguments" / UnsupportedOpError
    step = next(r for r in flow.diagnostics.values() if r.rule.startswith(rule))
    assert step.rule == f"{rule}_inverse" and step.converged
    assert all(torch.isfinite(m).all() for m in flow.maps.values())


def test_an_op_without_forward_mode_derivative_in_a_region_is_named():
    class Recurrent(nn.Module):  # a residual branch through an LSTM over the rows (as Sequencer does)
        def __init__(self):
            super().__init__()
            self.conv, self.lstm, self.fc = (
                nn.Conv2d(3, 4, 3, padding=1),
                nn.LSTM(4, 4, batch_first=True),
                nn.Linear(4, 2),
            )

        def forward(self, x):
            y = torch.relu(self.conv(x))
            b, c, h, w = y.shape
            seq = y.permute(0, 2, 3, 1).reshape(b * h, w, c)
            z = self.lstm(seq)[0].reshape(b, h, w, c).permute(0, 3, 1, 2)
            return self.fc(torch.relu(y + z).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Recurrent().eval(), torch.randn(1, 3, 4, 4)
    flow = compile_naflow(model, x)
    with pytest.raises(UnsupportedOpError, match=r"layer 'lstm' .*no forward-mode derivative in torch.*last_layer="):
        flow(x)


class _Warped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("theta", torch.tensor([[[0.9, 0.1, 0.0], [0.0, 1.1, 0.1]]]))

    def forward(self, x):  # one 4×6×6 image
        return F.grid_sample(x, F.affine_grid(self.theta, [1, 4, 6, 6], align_corners=False), align_corners=False)


def test_an_op_without_forward_mode_derivative_alone_in_its_stage_is_not_called_a_region():
    """The message said "inside a multi-branch region" for any op the fallback could not linearise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), _Warped(), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(1, 2, 6, 6)
    flow = compile_naflow(model.eval(), x, fallback="linearize")
    with pytest.raises(UnsupportedOpError, match=r"^layer '1.grid_sample' .*so its stage cannot") as err:
        flow(x)
    assert "region" not in str(err.value) and "register_inverse" in str(err.value)


class _LikeNamed(nn.Module):
    """Layers ``conv.1`` (a ReLU in a Sequential) and ``conv_1`` (a conv) spell the same attribute name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.conv_1(self.conv(x)))


def test_layers_whose_names_spell_the_same_attribute_keep_their_own_stage_modules():
    torch.manual_seed(0)
    model = _LikeNamed().eval()
    x = torch.randn(2, 3, 8, 8)
    nf = compile_naflow(model, x[:1], solver="dense")
    children = [name for name, _ in nf.inverse.named_children()]
    assert {"stage_conv_1_coefficients", "stage_conv_1_2_coefficients"} <= set(children)
    flow = nf(x)
    seen = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name, module in (("conv.0", model.conv[0]), ("conv.1", model.conv[1]), ("conv_1", model.conv_1))
    ]
    out = model(x)
    for handle in hooks:
        handle.remove()
    grads = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), list(seen.values()))
    for name, grad in zip(seen, grads):
        torch.testing.assert_close(flow.coefficients[name], grad)  # each layer's Λ, from its own stage


def test_rrelu_lowers_to_its_eval_slope_on_negative_inputs():
    """nn.RReLU in eval is a leaky ReLU of slope (lower + upper) / 2: checked where its inputs are negative
    (test_more_torch_nn_layers_lower_and_explain puts it after a ReLU, where the slope never shows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.RReLU(0.1, 0.3)).eval()
    gm = normalize(trace(model))
    x = torch.randn(2, 3, 6, 6)
    assert bool((model[0](x) < 0).any())
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    (node,) = [n for n in gm.graph.nodes if n.target is F.leaky_relu]
    assert node.kwargs["negative_slope"] == pytest.approx(0.2)


def test_emit_inverse_runs_down_to_the_shallowest_requested_layer_in_any_order():
    from naflow_fx.passes import emit_inverse

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    gm = assign_inverse_rules(_compile_graph(model))
    node = {n.meta.get("naflow.name"): n.name for n in gm.graph.nodes}
    deep_first, shallow_first = emit_inverse(gm, [node["3"], node["1"]]), emit_inverse(gm, [node["1"], node["3"]])
    assert deep_first.steps == shallow_first.steps == 2  # the ReLU '3' and the conv '2'
    assert deep_first.module.code == shallow_first.module.code

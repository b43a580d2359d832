"""Multi-branch regions (spec §2 "Regions", §3 I1–I6) on real architectures.

Residual adds (``out += identity``), projection shortcuts, channel concatenation (DenseNet),
channel shuffle + chunk (ShuffleNetV2) and sigmoid gates (squeeze-excitation) are solved jointly
through the region's composite affine piece, and the nodes inside a region get their BPFM as the
``jvp`` image of the region input. Everything runs on random weights with fixed seeds at small
inputs (no downloads).

Input sizes: a torchvision classifier's last stage is 1×1 at 32 px, and the default last layer N
stops before any op that reduces a larger map to 1×1 (docs/naflow.md, decision 2), so tests that
need N at the end of ``features`` use 64 px (DenseNet, MobileNetV2), and I1 uses 96 px (N is 3×3).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from models import seeded, warm_batchnorm
from test_models import (
    _Counter,
    activations,
    assert_batch_equals_samples,
    assert_finite_flow,
    batch,
    pearson,
    rel_err,
    torchvision_model,
)
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from naflow_fx import compile_naflow
from naflow_fx.passes.codegen import emit_recorder, extract_stage
from naflow_fx.passes.partition import Stage
from naflow_fx.result import normalize_maps
from naflow_fx.rules.generic import affine_piece
from naflow_fx.solvers import SolverConfig, SolverContext

# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this file on one intra-op thread (restored afterwards).

    These tests are thousands of small jvp/vjp/conv calls. With torch's default of one thread per
    core on a machine whose cores are busy with other work, OpenMP's barriers make them 10–20×
    slower (measured: one I3 case 1.7 s with one thread, 34 s with two on a loaded 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _nodes(nf) -> dict:
    return {n.name: n for n in nf.graph_module.graph.nodes}


def _layer(nf, node_name: str) -> str:
    return _nodes(nf)[node_name].meta.get("naflow.name", node_name)


def _node(nf, layer: str) -> str:
    match = [n.name for n in nf.graph_module.graph.nodes if n.meta.get("naflow.name", n.name) == layer]
    assert len(match) == 1, (layer, match)
    return match[0]


def _region(nf, output_layer: str) -> Stage:
    """The region stage whose output is ``output_layer``."""
    stage = next(s for s in nf.plan.stages if _layer(nf, s.output) == output_layer)
    assert stage.is_region, stage
    return stage


def _recorded(nf, x: Tensor, layers: list[str], nodes: bool = False) -> dict[str, object]:
    """Forward values of the named layers (or fx nodes), from the flow's own recording forward."""
    recorder = emit_recorder(nf.graph_module, list(layers) if nodes else [_node(nf, name) for name in layers])
    with torch.no_grad():
        _, values = recorder(x)
    return dict(zip(layers, values))


def _piece(nf, input_layer: str, output_layer: str) -> tuple[nn.Module, list[str]]:
    """The graph from ``input_layer`` to ``output_layer`` (one or more consecutive stages) as
    ``f(x, *extras)``, and the fx node names of the extras (shape values such as ``x.size(1)``)."""
    nodes, order = _nodes(nf), {n.name: i for i, n in enumerate(nf.graph_module.graph.nodes)}
    u, w = _node(nf, input_layer), _node(nf, output_layer)
    stages = [s for s in nf.plan.stages if order[u] < order[s.output] <= order[w]]
    assert stages[0].input == u and stages[-1].output == w, (input_layer, output_layer)
    body = [nodes[b] for s in stages for b in s.body]
    module, extras = extract_stage(nf.graph_module, nodes[u], body, [nodes[w]])
    return module, [e.name for e in extras]


def _dense_jacobian(module: nn.Module, points: Tensor, i: int, extras: tuple = ()) -> Tensor:
    """``∂module/∂x`` of sample ``i`` at ``points[i]``, float64 ``[q, p]``, by ``jacrev``.

    The sample is differentiated in place inside the batch: a piece may read the batch size
    (``x.size(0)`` in a channel shuffle) as one of its ``extras``."""
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    base = points.double()

    def fn(z: Tensor) -> Tensor:
        return functional_call(module, state, (torch.cat([base[:i], z[None], base[i + 1 :]]), *extras))[i]

    jac = jacrev(fn)(base[i])
    return jac.reshape(-1, base[i].numel())


# A fast solver setting for tests that check structure, not accuracy: undamped (no σ_max power
# iteration, which dominates damped region solves) and early-stopped CGLS. Unconverged solves are
# still finite, which is what these tests check. (The defaults take 30–50 s per model here.)
CHEAP = dict(solver="iterative", damping=0.0, tol=1e-3, max_iter=30)


# ------------------------------------------------------------------------------ I1: = Grad-CAM at N


def _densenet_head(twin: nn.Module) -> tuple[nn.Module, nn.Module]:
    """DenseNet applies its last ReLU (= N) functionally; the same computation with a ReLU module."""
    relu = nn.ReLU()
    return nn.Sequential(twin.features, relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), twin.classifier), relu


def _calibrated(name: str) -> nn.Module:
    """A random model whose BN running statistics are those of a random batch.

    At torchvision's init (mean 0, var 1) MobileNetV2's activations at N are ~1e-10, below the
    package's normalisation epsilon (``img / (1e-7 + max)``), so its maps could not be compared.
    """
    model = torchvision_model(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the statistics of that batch
    model.train()
    with torch.no_grad():
        model(batch((8, 3, 64, 64), seed=99))
    return model.eval()


@pytest.mark.parametrize(
    "build, last, hook",
    [
        (lambda: torchvision_model("resnet18"), "layer4.1.relu#2", lambda m: (m, m.layer4[-1])),
        (lambda: torchvision_model("resnet50"), "layer4.2.relu#3", lambda m: (m, m.layer4[-1])),
        (lambda: torchvision_model("densenet121"), "relu", _densenet_head),
        (lambda: _calibrated("mobilenet_v2"), "features.18.2", lambda m: (m, m.features[-1])),
    ],
    ids=["resnet18", "resnet50", "densenet121", "mobilenet_v2"],
)
def test_i1_last_layer_equals_grad_cam_package(build, last, hook):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = build()
    x = batch((2, 3, 96, 96), seed=20)  # N is 3×3 (1×1 at 32 px)
    nf = compile_naflow(model, x, layers=[last])
    assert nf.last_layer == last and nf.layers == [last]
    flow = nf(x)  # the predicted classes (other classes can give all-zero maps on random weights)
    ours = flow.maps[last]
    assert ours.shape == (2, 3, 3)
    assert (ours.flatten(1).amax(1) > ours.flatten(1).amin(1) + 1e-3).all()  # premise: non-constant maps

    twin = copy.deepcopy(model)  # the package hooks the model and calls backward
    net, layer = hook(twin)
    with torch.no_grad():
        torch.testing.assert_close(net(x), flow.output, rtol=1e-5, atol=1e-5)

    class AtLayerResolution(GradCAM):
        """The package without its final resize to the input size (a bilinear upsampling of the map)."""

        def get_target_width_height(self, input_tensor):
            return tuple(ours.shape[-1:-3:-1])

    targets = [ClassifierOutputTarget(int(c)) for c in flow.classes]
    with AtLayerResolution(model=net, target_layers=[layer]) as cam:
        reference = torch.from_numpy(cam(input_tensor=x.clone(), targets=targets))
    assert reference.shape == ours.shape
    torch.testing.assert_close(normalize_maps(ours), reference, rtol=0, atol=1e-4)
    lam = flow.coefficients[last]  # GAP + linear head: ∂s/∂a_N is constant over space
    torch.testing.assert_close(lam, lam[:, :, :1, :1].expand_as(lam))


# ------------------------------------------------------- every layer, inside regions too, has a map


@pytest.mark.parametrize(
    "name, size, last, inner",
    [
        (
            "resnet18",
            32,
            "layer4.1.relu#2",
            ["layer1.0.conv1", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu#2", "layer2.0.downsample.1"],
        ),
        ("resnet50", 32, "layer4.2.relu#3", ["layer1.0.conv3", "layer1.0.downsample.0", "layer1.0.add"]),
        (
            "densenet121",
            64,
            "relu",
            ["features.denseblock1.denselayer1.conv2", "features.denseblock1.denselayer2.cat", "features.norm5"],
        ),
        ("mobilenet_v2", 64, "features.18.2", ["features.3.conv.1.2", "features.3.add", "features.16.conv.3"]),
    ],
)
def test_region_models_give_finite_maps_for_every_layer(name, size, last, inner):
    model = torchvision_model(name)
    x = batch((2, 3, size, size), seed=21)
    nf = compile_naflow(model, x, **CHEAP)
    assert nf.last_layer == last
    assert set(inner) <= set(nf.layers), sorted(set(inner) - set(nf.layers))
    # every 4-D node inside every region is an explained layer, its BPFM a jvp image of the region
    regions = [s for s in nf.plan.stages if s.is_region]
    assert regions
    for stage in regions:
        for node in stage.body:
            if node in nf.plan.layers:
                assert _layer(nf, node) in nf.layers, node
    assert f"jvp image of region {_layer(nf, regions[0].output)}" in nf.layer_table()
    flow = nf(x)
    assert_finite_flow(nf, flow, x)
    assert any(r.rule == "region_inverse" for r in flow.diagnostics.values())
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow.bpfm[last], _recorded(nf, x, [last])[last], rtol=0, atol=0)  # B_N = a_N


# --------------------------------------------------------------- I2: exact inversion through regions


@pytest.mark.parametrize(
    "name, size, last, below",
    [
        # identity shortcut: I + J_F. Random-init blocks are ill-conditioned (≈1000 CGLS steps at
        # 4×4; at 8×8 5000 steps reach only 5e-3), hence 16 px
        ("resnet18", 16, "layer1.0.add", "maxpool"),
        # projection shortcut with q ≥ p (1×1 conv 64 → 256, stride 1): injective
        ("resnet50", 16, "layer1.0.add", "maxpool"),
        # a dense block: cat([x, f1(x), f2(x, f1), ...]) contains x itself, so it is injective
        ("densenet121", 32, "features.denseblock1.cat", "features.pool0"),
    ],
    ids=["resnet18-identity", "resnet50-projection", "densenet121-concat"],
)
def test_i2_injective_region_reconstructs_its_input(name, size, last, below):
    model = torchvision_model(name)
    x = batch((1, 3, size, size), seed=22)
    probe = compile_naflow(model, x, last_layer=last, layers=[below])
    inner = [_layer(probe, n) for n in _region(probe, last).body[:-1] if n in probe.plan.layers]
    nf = compile_naflow(
        model,
        x,
        last_layer=last,
        layers=[below, *inner, last],
        damping=0.0,
        solver="iterative",
        tol=1e-9,
        max_iter=5000,
    )
    flow = nf(x)
    acts = _recorded(nf, x, [below, *inner, last])
    assert torch.equal(flow.bpfm[last], acts[last])  # B_w = a_w exactly
    rec = flow.diagnostics[last]
    assert rec.rule == "region_inverse" and rec.method == "cgls" and rec.converged, flow.format_diagnostics()
    dead = flow.coefficients[below] == 0
    assert (acts[below][dead] == 0).all(), "premise: abandoning at the input removes nothing"
    assert rel_err(flow.bpfm[below], acts[below]) < 1e-3, rel_err(flow.bpfm[below], acts[below])
    # nodes inside the region: the jvp image of B_u = a_u is a_v, then the abandoning mask
    assert inner
    for v in inner:
        expected = acts[v] * (flow.coefficients[v] != 0)
        assert rel_err(flow.bpfm[v], expected) < 1e-3, (v, rel_err(flow.bpfm[v], expected))


def test_i3_projection_region_with_fewer_outputs_gives_the_minimum_norm_input():
    """ResNet-18 ``layer2.0`` (3×3 stride-2 conv + 1×1 stride-2 projection) maps 64×4×4 → 128×2×2:
    q < p, so it is not injective and I2 does not apply. The flow's B_u must be the min-norm
    solution ``J⁺(a_w − θ)`` of the consistent system: ``J B_u + θ = a_w``, ``B_u ⟂ null(J)``.
    (The iterative solver on the same region: ``test_i3_region_solves_are_consistent_and_minimum_norm``.)"""
    model = torchvision_model("resnet18")
    x = batch((1, 3, 16, 16), seed=23)
    last, below = "layer2.0.add", "layer1.1.relu#2"
    nf = compile_naflow(model, x, last_layer=last, layers=[below], damping=0.0, solver="dense")
    flow = nf(x)
    assert flow.diagnostics[last].rule == "region_inverse" and flow.diagnostics[last].method == "dense"
    acts = _recorded(nf, x, [below, last])
    assert (flow.coefficients[below] != 0).all(), "premise: nothing is abandoned at the input"
    region, extras = _piece(nf, below, last)
    assert extras == []
    jac = _dense_jacobian(region, acts[below], 0)
    assert jac.shape == (512, 1024)
    a_u = acts[below][0].double().flatten()
    theta = region(acts[below]).double().flatten() - jac @ a_u
    rhs = acts[last][0].double().flatten() - theta
    b_u = flow.bpfm[below][0].double().flatten()
    pinv = torch.linalg.pinv(jac)
    assert rel_err(jac @ b_u, rhs) < 1e-5  # consistent
    assert rel_err(pinv @ (jac @ b_u), b_u) < 1e-5  # in the row space: ⟂ null(J)
    assert rel_err(b_u, pinv @ rhs) < 1e-5  # = J⁺(a_w − θ)
    assert b_u.norm() < a_u.norm() and rel_err(b_u, a_u) > 1e-2  # the null-space part of a_u was dropped


# ------------------------------------------------------- I3: J_R B_u + θ_R ≈ B_w on consistent systems


def _densenet_small() -> nn.Module:
    """torchvision's DenseNet code at a toy size (two dense blocks of two layers)."""
    model = seeded(0, lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16))
    return warm_batchnorm(model, (4, 3, 16, 16), seed=1)


@pytest.mark.parametrize(
    "build, size, first, last, injective",
    [
        # identity shortcut, 128×2×2 → 128×2×2
        (lambda: torchvision_model("resnet18"), 16, "layer2.0.relu#2", "layer2.1.add", True),
        # projection shortcut, stride 2: 64×4×4 → 128×2×2 (q < p)
        (lambda: torchvision_model("resnet18"), 16, "layer1.1.relu#2", "layer2.0.add", False),
        # dense block (concat), 16×4×4 → 32×4×4
        (_densenet_small, 16, "features.pool0", "features.denseblock1.cat", True),
        # chunk → branch → cat, then the channel shuffle (view → transpose → view) after it: 96×2×2
        (lambda: torchvision_model("shufflenet_v2_x0_5"), 32, "stage3.0.view#2", "stage3.1.view#2", False),
        # squeeze-excitation gate x ⊙ hardsigmoid(fc2(relu(fc1(avgpool(x))))), 16×4×4
        (lambda: torchvision_model("mobilenet_v3_small"), 16, "features.1.block.0.2", "features.1.block.1.mul", True),
    ],
    ids=["resnet18-identity", "resnet18-projection", "densenet-concat", "shufflenet-shuffle", "mobilenet_v3-se"],
)
def test_i3_region_solves_are_consistent_and_minimum_norm(build, size, first, last, injective):
    """Undamped solves of ``J_R B_u = B_w − θ_R`` for a consistent ``B_w = J_R v + θ_R``.

    Dense: ``B_u = J⁺(B_w − θ)`` of an independent ``jacrev`` Jacobian. CGLS: consistent and in the
    row space of J (⟂ null(J)), which together make it the min-norm solution; its distance to
    ``J⁺(B_w − θ)`` is that residual over the smallest non-zero singular value, which is ~1e-5 for
    the (numerically rank-deficient) shuffle block, so only the dense solve is compared directly.
    """
    model = build()
    x = batch((2, 3, size, size), seed=24)
    nf = compile_naflow(model, x, layers=[first])
    first_region = next(s for s in nf.plan.stages if s.input == _node(nf, first))
    assert first_region.is_region, first_region
    module, extra_nodes = _piece(nf, first, last)
    a_u = _recorded(nf, x, [first])[first]
    extras = tuple(_recorded(nf, x, extra_nodes, nodes=True).values())  # x.size(0), x.size(1) // 2 (shuffle)
    op, theta = affine_piece(module, a_u, *extras)
    v = batch(a_u.shape, seed=25) * a_u.std() + a_u  # a point near a_u; B_w = J v + θ is consistent
    with torch.no_grad():  # (the generated inverse network also solves without autograd)
        torch.testing.assert_close(op.matvec(a_u) + theta, module(a_u, *extras), rtol=1e-5, atol=1e-5)  # affine
        b_w = op.matvec(v) + theta
    jacs = [_dense_jacobian(module, a_u, i, extras) for i in range(x.shape[0])]
    pinvs = [torch.linalg.pinv(jac) for jac in jacs]
    rank = [int(torch.linalg.matrix_rank(jac)) for jac in jacs]
    assert all(r == jacs[0].shape[1] for r in rank) == injective, (rank, jacs[0].shape)

    for solver, kwargs in [("dense", {}), ("iterative", dict(tol=1e-6, max_iter=3000))]:
        ctx = SolverContext(SolverConfig(solver=solver, damping=0.0, **kwargs))
        with torch.no_grad(), ctx.step(last, "test"):
            b_u = ctx.solve(op, b_w - theta)
            image = op.matvec(b_u) + theta
        record = ctx.records[0]
        assert record.method == ("dense" if solver == "dense" else "cgls") and record.converged
        assert rel_err(image, b_w) < 1e-4, (solver, rel_err(image, b_w))  # J_R B_u + θ_R ≈ B_w
        for i, (jac, pinv) in enumerate(zip(jacs, pinvs)):
            sol = b_u[i].double().flatten()
            assert rel_err(pinv @ (jac @ sol), sol) < 1e-5, (solver, i)  # in the row space: ⟂ null(J)
            ref = pinv @ (b_w[i] - theta[i]).double().flatten()
            if solver == "dense":
                assert rel_err(sol, ref) < 1e-5, (i, rel_err(sol, ref))  # = J⁺(B_w − θ)
            err = rel_err(sol, v[i].double().flatten())
            assert err < 1e-3 if injective else err > 1e-2, (solver, i, err)  # v itself iff injective


# ------------------------------------------------------------------------ I5: batch equivariance


@pytest.mark.parametrize(
    "name, size, last, prefixes",
    [
        # N moved to layer3's output: its regions are 2×2 (layer4's are 1×1, and its first
        # region's damped solve alone takes ~15 s)
        ("resnet18", 32, "layer3.1.relu#2", ("layer3.0.relu#2", "layer3.1")),
        ("mobilenet_v2", 64, None, ("features.15.add", "features.16", "features.17", "features.18")),
    ],
)
def test_i5_batch_equals_per_sample_results(name, size, last, prefixes):
    model = torchvision_model(name)
    every = compile_naflow(model, (1, 3, size, size), last_layer=last).layers
    layers = [n for n in every if n.startswith(prefixes)]
    x = batch((3, 3, size, size), seed=26)
    nf = compile_naflow(model, x[:1], last_layer=last, layers=layers, solver="iterative", tol=1e-6, max_iter=2000)
    assert any(_layer(nf, s.output) in layers and s.is_region for s in nf.plan.stages)
    assert_batch_equals_samples(nf, x, [3, 0, 2])


# ----------------------------------------------------------------------- I6: the model is untouched


@pytest.mark.parametrize(
    "name, size, prefixes, hooked, block, to_n",
    [
        ("resnet18", 32, ("layer4.1",), ("layer4.1", "layer4.1.conv1", "layer4.1.relu", "fc"), "layer4.1", None),
        (
            "densenet121",
            64,
            ("features.denseblock4.denselayer16", "features.norm5", "relu"),
            ("features", "features.denseblock4", "features.norm5", "classifier"),
            "features",
            torch.relu,  # DenseNet's forward applies F.relu(features, inplace=True)
        ),
    ],
)
def test_i6_region_models_are_untouched(name, size, prefixes, hooked, block, to_n):
    model = torchvision_model(name)
    every = compile_naflow(model, (1, 3, size, size)).layers
    layers = [n for n in every if n.startswith(prefixes)]
    x = batch((2, 3, size, size), seed=27)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    model.train()  # left in train mode: BN would use (and update) batch statistics
    modules = dict(model.named_modules())
    counter = _Counter()
    for tag in ("", *hooked):
        modules[tag].register_forward_hook(counter.hook(f"{tag}:fwd"))
        modules[tag].register_forward_pre_hook(counter.hook(f"{tag}:pre"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in modules.items()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}

    nf = compile_naflow(model, x, layers=layers, **CHEAP)
    counter.calls.clear()  # tracing may run container hooks on fx proxies; nf(x) must not call any
    flow = nf(x, [7, 3])
    assert any(r.rule == "region_inverse" for r in flow.diagnostics.values())
    assert_finite_flow(nf, flow, x)

    assert counter.calls == [], counter.calls
    torch.testing.assert_close(flow.output, expected, rtol=1e-5, atol=1e-5)  # eval semantics
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k  # incl. running stats and num_batches_tracked
    assert {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in modules.items()} == hooks
    # in-place `out += identity` / `relu(inplace=True)` did not corrupt the recorded a_N (= B_N)
    a_n = activations(model, x, [block])[block]
    torch.testing.assert_close(flow.bpfm[nf.last_layer], to_n(a_n) if to_n else a_n, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- dense and iterative agree


class RegionNet(nn.Module):
    """stem → basic residual block (``out += identity``) → dense concat → SE gate → conv → GAP → fc."""

    def __init__(self, c: int = 6, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.grow = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.1))
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * c, c, 1), nn.ReLU(), nn.Conv2d(c, 2 * c, 1), nn.Sigmoid()
        )
        self.head = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        x = self.relu(out)
        x = torch.cat([x, self.grow(x)], 1)
        x = x * self.gate(x)
        x = self.act(self.head(x))
        return self.fc(x.mean((2, 3)))

    @classmethod
    def build(cls, size: int = 8, seed: int = 0) -> RegionNet:
        return warm_batchnorm(seeded(seed, cls), (8, 3, size, size), seed=seed + 1)


def _resnet18_layer3_setup():
    # N = layer3's output: layer3.0 (projection, 2048 → 1024) and layer3.1 (identity, 1024²) have
    # dense Jacobians that jacrev builds in a few seconds; layer4's maps are 1×1 at 32 px
    model = torchvision_model("resnet18")
    every = compile_naflow(model, (1, 3, 32, 32), last_layer="layer3.1.relu#2").layers
    # In float32, CGLS on layer3.0's projection region stagnates at a normal residual of ~2.5e-7
    # (measured): tol=1e-7 is never reached and 3000 iterations take ~20 s, so cap at 500
    return model, 32, "layer3.1.relu#2", [n for n in every if n.startswith("layer3")], 1, 500


@pytest.mark.parametrize(
    "setup",
    [_resnet18_layer3_setup, lambda: (RegionNet.build(), 8, None, "all", 2, 3000)],
    ids=["resnet18-layer3", "region-net"],
)
def test_dense_and_iterative_solvers_agree_on_regions(setup):
    """Same damped problem, dense SVD vs CGLS at a tight tolerance: maps and BPFMs agree (r ≥ 0.999)."""
    model, size, last, layers, n, max_iter = setup()
    x = batch((n, 3, size, size), seed=28)
    dense = compile_naflow(model, x, solver="dense", last_layer=last, layers=layers)(x)
    iterative = compile_naflow(
        model, x, solver="iterative", last_layer=last, layers=layers, tol=1e-7, max_iter=max_iter
    )(x)
    regions = [k for k, r in dense.diagnostics.items() if r.rule == "region_inverse"]
    assert len(regions) >= 2, dense.format_diagnostics()
    for k in regions:
        assert dense.diagnostics[k].method == "dense" and iterative.diagnostics[k].method == "cgls"
        assert iterative.diagnostics[k].normal_residual <= 1e-5, iterative.format_diagnostics()
        assert iterative.diagnostics[k].damping == dense.diagnostics[k].damping > 0  # the same damped problem
    for name in dense.layers:
        a, b = dense.maps[name], iterative.maps[name]
        if a.numel() > n:  # Pearson needs more than one pixel per sample (not the gate's 1×1 maps)
            assert a.abs().max() > 0, name
            assert pearson(a, b) >= 0.999, (name, pearson(a, b))
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
        assert pearson(dense.bpfm[name], iterative.bpfm[name]) >= 0.999, (
            name,
            pearson(dense.bpfm[name], iterative.bpfm[name]),
        )


# ------------------------------------------------ eval-mode stochastic depth and layer scale


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("convnext_tiny", {}),  # layer scale (mul by γ) + StochasticDepth in every block
        ("efficientnet_b0", dict(solver="iterative", max_iter=100)),  # StochasticDepth after the SE blocks
    ],
)
def test_stochastic_depth_and_layer_scale_models_give_finite_maps(name, kwargs):
    model = torchvision_model(name)
    x = batch((2, 3, 32, 32), seed=29)
    nf = compile_naflow(model, x, **kwargs)
    drops = [n for n in nf.graph_module.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
    before_n = [n for n in drops if n.meta.get("naflow.role") != "head"]  # (after N: part of the head)
    assert before_n and all(n.meta.get("naflow.role") == "inner" for n in before_n)  # inside regions
    assert all(_layer(nf, n.name) in nf.layers for n in before_n)
    flow = nf(x)
    assert_finite_flow(nf, flow, x)
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x), rtol=1e-5, atol=1e-5)


def test_channels_last_layers_get_spatial_maps():
    """ConvNeXt's channels-last nodes (B×H×W×C) are reported on their NCHW view (NOTE [layouts])."""
    model = torchvision_model("convnext_tiny")
    x = batch((1, 3, 32, 32), seed=31)
    layers = ["features.0.0", "features.0.1.permute", "features.0.1.layer_norm", "features.0.1.permute#2"]
    layers += ["features.1.0.block.2", "features.1.0.block.3"]  # LayerNorm and Linear inside a block
    nf = compile_naflow(model, x, layers=layers, **CHEAP)
    flow = nf(x)
    acts = {}
    handles = [
        dict(model.named_modules())[m].register_forward_hook(lambda mod, i, o, m=m: acts.__setitem__(m, o))
        for m in ("features.1.0.block.2", "features.1.0.block.3")
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    lean = nf(x, keep="maps")  # made by the maps-only program, which permutes the channels-last BPFMs itself
    for name in nf.layers:  # a 32×32 input: every spatial map of the stem stage and block 1 is 8×8
        assert flow.maps[name].shape == (1, 8, 8), (name, tuple(flow.maps[name].shape))
        assert flow.bpfm[name].shape[2:] == flow.coefficients[name].shape[2:] == (8, 8), name
        torch.testing.assert_close(lean.maps[name], flow.maps[name], rtol=0, atol=0)
    # the Linear's output (B×H×W×384 in the model) is reported as B×384×H×W, and Grad-CAM likewise
    assert flow.bpfm["features.1.0.block.3"].shape == (1, 384, 8, 8)
    cam = nf.gradcam(x)
    lam, a = flow.coefficients["features.1.0.block.3"], acts["features.1.0.block.3"].permute(0, 3, 1, 2)
    expected = torch.relu((lam.mean((2, 3), keepdim=True) * a).sum(1))
    torch.testing.assert_close(cam.maps["features.1.0.block.3"], expected, rtol=1e-5, atol=1e-6)


class _Permuted(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


def _around_a_layout_change(change: nn.Module, channels: int) -> nn.Sequential:
    """A float64 1×1 conv, then ``change`` (a permute or transpose), then a 1×1 conv that reads ``channels``
    channels, a ReLU and a linear head (seeded: call it before drawing the input)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 1), change, nn.Conv2d(channels, 3, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize(
    ("dims", "channels", "grid", "view"),
    [
        ((0, 3, 2, 1), 9, (7, 4), (0, 1, 2, 3)),
        ((0, 2, 1, 3), 7, (4, 9), (0, 1, 2, 3)),
        ((0, 1, 3, 2), 4, (9, 7), (0, 1, 3, 2)),
    ],
    ids=["columns-as-channels", "rows-as-channels", "rows-and-columns-swapped"],
)
def test_a_conv_after_a_permute_sums_its_own_channels(dims, channels, grid, view):
    """NOTE [layouts]: a conv reads dim 1 as its channels, whatever the permute before it moved
    there, so its map sums its own output channels. It used to keep the permute's layout and be
    summed over a spatial axis, its channels shown as the image's width. Rows and columns only
    swapped stay image-aligned: the conv's map is shown on the image's grid (``view``)."""
    model = _around_a_layout_change(_Permuted(*dims), channels)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    nf = compile_naflow(model, x, solver="dense", damping=0.0)
    flow = nf(x)
    a = model[:3](x).permute(view)  # the conv's output: B×3×(grid), reported on the image's grid
    bpfm, lam = flow.bpfm["2"], flow.coefficients["2"]
    assert a.shape == bpfm.shape == lam.shape == (2, 3, *(grid[i - 2] for i in view[2:]))
    torch.testing.assert_close(flow.maps["2"], torch.relu((lam * bpfm).sum(1)))
    torch.testing.assert_close(nf.gradcam(x).maps["2"], torch.relu((lam.mean((2, 3), keepdim=True) * a).sum(1)))
    assert flow.maps["1.permute"].shape == (2, 7, 9)  # the permute's output: on the NCHW view of the image


class ScaledResidual(nn.Module):
    """stem → ``x + StochasticDepth(γ ⊙ branch(x))`` (layer scale γ) → conv → ReLU → GAP → fc."""

    def __init__(self, stochastic: bool, c: int = 6, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 1, bias=False)
        )
        self.gamma = nn.Parameter(torch.linspace(0.2, 1.5, c).reshape(c, 1, 1))
        self.drop = torchvision.ops.StochasticDepth(0.5, "row") if stochastic else nn.Identity()
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop(self.gamma * self.branch(x))
        return self.fc(self.head(x).mean((2, 3)))


def test_eval_mode_stochastic_depth_is_the_identity_in_a_region():
    plain = warm_batchnorm(seeded(0, lambda: ScaledResidual(stochastic=False)), (8, 3, 8, 8), seed=1)
    model = ScaledResidual(stochastic=True)
    model.load_state_dict(plain.state_dict())
    model.eval()
    x = batch((2, 3, 8, 8), seed=30)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    kwargs = dict(solver="dense")
    nf, ref_nf = compile_naflow(model, x, **kwargs), compile_naflow(plain, x, **kwargs)
    extra = set(nf.layers) - set(ref_nf.layers)
    assert set(ref_nf.layers) <= set(nf.layers) and len(extra) == 1, extra  # the stochastic-depth node
    region = _region(nf, "add")
    assert _node(nf, extra.pop()) in region.body
    flow, ref = nf(x), ref_nf(x)
    for name in ref_nf.layers:
        for field in ("maps", "bpfm", "coefficients"):
            got, want = getattr(flow, field)[name], getattr(ref, field)[name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{field}[{name}]")
    # a model left in train mode (stochastic depth active) is explained with eval semantics
    model.train()
    again = compile_naflow(model, x, **kwargs)(x)
    for name in ref_nf.layers:
        torch.testing.assert_close(again.maps[name], ref.maps[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("solver", "copied"), [("iterative", False), ("dense", True)])
def test_region_weights_are_copied_to_float64_only_for_the_dense_solver(solver, copied, monkeypatch):
    """The float64 copy of a region's weights serves the dense solver's Jacobian only: made lazily,
    it costs nothing for matrix-free solves (it was ~89 MB per ResNet-18 call at 64×64, and MPS has
    no float64 at all)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 16, 16)
    flow = compile_naflow(model, x, solver=solver, last_layer="layer1.0.relu#2")
    seen: list[tuple] = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if isinstance(self, nn.Parameter) and torch.float64 in (*args, kwargs.get("dtype")):
            seen.append(tuple(self.shape))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    flow(x)
    assert bool(seen) == copied


class _Transposed(nn.Module):
    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x):
        return x.transpose(self.dim0, self.dim1)


@pytest.mark.parametrize(("dims", "channels"), [((1, 3), 9), ((2, 1), 7)], ids=["columns-as-channels", "rows"])
def test_a_transposed_layer_is_reported_on_the_nchw_view(dims, channels):
    """NOTE [layouts]: a transpose composes the layout like a permute, so its map is on the image's grid."""
    model = _around_a_layout_change(_Transposed(*dims), channels)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    flow = compile_naflow(model, x, solver="dense", damping=0.0)(x)
    bpfm, lam = flow.bpfm["1.transpose"], flow.coefficients["1.transpose"]
    assert bpfm.shape == lam.shape == (2, 4, 7, 9)
    assert flow.maps["1.transpose"].shape == (2, 7, 9)
    torch.testing.assert_close(flow.maps["1.transpose"], torch.relu((lam * bpfm).sum(1)))

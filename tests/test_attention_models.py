"""Attention-module ResNets (CBAM, BAM, SE; ``naflow_fx.models``): compile, finite maps, invariants.

The gates (sigmoid × feature map, ``torch.max`` / ``torch.mean`` over channels, BAM's broadcast
add) sit inside multi-branch regions, which are inverted jointly through their affine piece
(spec §2). Tiny variants (one block per stage, width 8) keep the file fast; random weights with
fixed seeds, nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import seeded, warm_batchnorm
from test_models import _Counter, activations, assert_batch_equals_samples, assert_finite_flow, batch, rel_err
from torch import nn

from naflow_fx import compile_naflow
from naflow_fx.models import resnet50_bam, resnet50_cbam, se_resnet50
from naflow_fx.passes.codegen import emit_recorder, extract_stage
from naflow_fx.result import normalize_maps
from naflow_fx.rules.generic import affine_piece, region_inverse
from naflow_fx.solvers import SolverConfig, SolverContext

BUILDERS = {"cbam": resnet50_cbam, "bam": resnet50_bam, "se": se_resnet50}
KINDS = list(BUILDERS)

# Layers named after attention modules, per stage k (module names: stable, not fx node names).
ATTENTION_LAYERS = {
    "cbam": lambda k: [
        f"layer{k}.0.cbam.channel.mlp.0",
        f"layer{k}.0.cbam.channel.mlp.2",
        f"layer{k}.0.cbam.channel.mlp.0#2",  # the shared MLP's second call (max-pooled descriptor)
        f"layer{k}.0.cbam.spatial.conv",
        f"layer{k}.0.cbam.spatial.bn",
    ],
    "bam": lambda k: [f"bam{k}.spatial.body.{m}" for m in ("reduce", "dilated1", "dilated2", "project") if k < 4],
    "se": lambda k: [f"layer{k}.0.se.{m}" for m in ("pool", "reduce", "expand", "gate")],
}
# A module inside the region used for the region-level checks (I2, I3).
REGION_MARKER = {
    "cbam": "layer{k}.0.cbam.spatial.conv",
    "bam": "bam{k}.spatial.body.project",
    "se": "layer{k}.0.se.expand",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread while these tests run, restored afterwards.

    The CGLS region solves make thousands of small jvp/vjp calls; with two OpenMP threads on a
    machine whose cores are busy, each call waits for a descheduled thread and the file runs
    ~50× slower (measured: 185 s instead of 3 s for one flow).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, size: int = 32, seed: int = 0, width: int = 8) -> nn.Module:
    """A one-block-per-stage attention ResNet with warmed BatchNorm statistics, in eval mode."""
    model = seeded(seed, lambda: BUILDERS[kind](num_classes=5, layers=(1, 1, 1, 1), width=width))
    return warm_batchnorm(model, (8, 3, size, size), seed=seed + 1)


def region_of(nf, marker: str):
    """The region stage (multi-branch) whose body holds the node of layer ``marker``."""
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    for stage in nf.plan.stages:
        if stage.is_region and any(nodes[b].meta.get("naflow.name") == marker for b in stage.body):
            return stage
    raise AssertionError(f"no region contains {marker}")


def layer_name(nf, node_name: str) -> str:
    node = next(n for n in nf.graph_module.graph.nodes if n.name == node_name)
    return node.meta.get("naflow.name", node.name)


# ------------------------------------------------------------ compile, finite maps, attention layers


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_attention_resnets_give_finite_maps_for_all_layers(kind):
    model = tiny(kind)
    x = batch((2, 3, 32, 32), seed=20)
    nf = compile_naflow(model, x)
    assert nf.last_layer == layer_name(nf, nf.plan.last)
    flow = nf(x, [1, 3])
    assert_finite_flow(nf, flow, x)
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x), rtol=1e-5, atol=1e-5)
    # N is the output of the last block (= layer4), and B_N = a_N
    torch.testing.assert_close(flow.bpfm[nf.last_layer], activations(model, x, ["layer4"])["layer4"])
    # the attention modules are explained layers, inside the regions of their blocks
    expected = [name for k in (1, 2, 3, 4) for name in ATTENTION_LAYERS[kind](k)]
    missing = [name for name in expected if name not in nf.layers]
    assert not missing, (missing, nf.layer_table())
    assert sum(f".{kind}" in name or name.startswith(kind) for name in nf.layers) >= len(expected)
    table = nf.layer_table()
    assert "region_inverse" in table and "jvp image of region" in table
    regions = [s for s in nf.plan.stages if s.is_region]
    assert len(regions) == (7 if kind == "bam" else 4)  # one per block (+ one per BAM)
    assert all(r.converged for r in flow.diagnostics.values()), flow.format_diagnostics()
    # maps are not all zero in the attention layers (the gates carry signal)
    assert any(flow.maps[name].abs().max() > 0 for name in expected)


@pytest.mark.parametrize("build", [resnet50_cbam, resnet50_bam], ids=["resnet50_cbam", "resnet50_bam"])
def test_full_depth_resnet50_attention_compiles_and_flows_at_the_last_layer(build):
    model = seeded(0, build).eval()
    x = batch((1, 3, 32, 32), seed=21)
    nf = compile_naflow(model, x, layers="all")
    assert nf.last_layer == layer_name(nf, nf.plan.last) and nf.last_layer.startswith("layer4.2.")
    if build is resnet50_cbam:
        assert {f"layer{k}.{j}.cbam.spatial.conv" for k, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for j in range(n)} <= set(
            nf.layers
        )
        assert sum(s.is_region for s in nf.plan.stages) == 16
    else:
        assert {f"bam{k}.spatial.body.dilated2" for k in (1, 2, 3)} <= set(nf.layers)
        assert sum(s.is_region for s in nf.plan.stages) == 16 + 3
    last = compile_naflow(model, x, layers=[nf.last_layer])
    flow = last(x)
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flow.bpfm[nf.last_layer], activations(model, x, ["layer4"])["layer4"])
    assert torch.isfinite(flow.maps[nf.last_layer]).all()


# ------------------------------------------------------------------------------ I1: = Grad-CAM at N


@pytest.mark.parametrize("kind", KINDS)
def test_i1_last_layer_equals_grad_cam_package(kind):
    """At N (the output of ``layer4``, the block module ``model.layer4[-1]``) NAFlow is Grad-CAM.

    The package resizes its map to the input size. To compare at N's own resolution, the package
    explains the model behind a pixel shuffle from an input of N's size (``pixel_unshuffle(x)``,
    the same pixels rearranged), so its resize is the identity and the model sees exactly ``x``.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    size, n = 128, 4  # N is 4×4 at 128 px (total stride 32)
    model = tiny(kind, size=size)
    x = batch((3, 3, size, size), seed=22)
    nf = compile_naflow(model, x, layers="all")
    nf = compile_naflow(model, x, layers=[nf.last_layer])  # N only: no solves needed
    flow = nf(x)  # the predicted classes: random weights give non-trivial maps for them
    classes = flow.classes.tolist()
    ours = flow.maps[nf.last_layer]
    assert ours.shape == (3, n, n)
    assert (ours.flatten(1).amax(1) > ours.flatten(1).amin(1)).all()  # non-constant maps

    twin = copy.deepcopy(model)  # the package calls backward (fills .grad) and hooks the model
    wrapped = nn.Sequential(nn.PixelShuffle(size // n), twin).eval()
    small = F.pixel_unshuffle(x, size // n)
    assert small.shape[-2:] == (n, n)
    with GradCAM(model=wrapped, target_layers=[twin.layer4[-1]]) as cam:
        reference = cam(input_tensor=small, targets=[ClassifierOutputTarget(c) for c in classes])
    reference = torch.from_numpy(reference)
    assert reference.shape == (3, n, n)

    torch.testing.assert_close(normalize_maps(ours), reference, rtol=0, atol=1e-4)
    baseline = nf.gradcam(x, classes)
    torch.testing.assert_close(normalize_maps(baseline.maps[nf.last_layer]), reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, baseline.maps[nf.last_layer], rtol=1e-5, atol=1e-6)
    lam = flow.coefficients[nf.last_layer]  # ∂s/∂a_N is constant over space (GAP + linear head)
    torch.testing.assert_close(lam, lam[:, :, :1, :1].expand_as(lam))


# --------------------------------------------------- I3: region solves are consistent and minimal


@pytest.mark.parametrize(
    "kind, solver, kwargs, tol",
    [
        ("cbam", "dense", {}, 1e-5),
        ("se", "dense", {}, 1e-5),
        ("bam", "dense", {}, 1e-5),
        ("cbam", "iterative", dict(tol=1e-9, max_iter=3000), 1e-4),
    ],
    ids=["cbam-dense", "se-dense", "bam-dense", "cbam-iterative"],
)
def test_i3_attention_region_solve_is_consistent_and_minimum_norm(kind, solver, kwargs, tol):
    """``J u + θ = B_w`` for a consistent ``B_w = J v + θ``, and ``u = J⁺(B_w − θ)`` (dense oracle)."""
    model = tiny(kind)
    x = batch((2, 3, 32, 32), seed=23)
    nf = compile_naflow(model, x[:1], layers="all")
    stage = region_of(nf, REGION_MARKER[kind].format(k=3))
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    body = [nodes[b] for b in stage.body]
    module, extras = extract_stage(nf.graph_module, nodes[stage.input], body, [nodes[stage.output]])
    recorder = emit_recorder(nf.graph_module, [stage.input, *(e.name for e in extras)])
    with torch.no_grad():
        _, (a_u, *extra_values) = recorder(x)
    op, theta = affine_piece(module, a_u, *extra_values)
    q, p = op.size
    assert any(f".{kind}" in layer_name(nf, b) or layer_name(nf, b).startswith(kind) for b in stage.body)

    v = torch.randn(a_u.shape, generator=torch.Generator().manual_seed(24))
    b_w = op.matvec(v) + theta  # consistent right-hand side
    ctx = SolverContext(SolverConfig(solver=solver, damping=0.0, **kwargs))
    with torch.no_grad():  # as in the generated inverse network
        u = region_inverse(ctx, b_w, module, a_u, *extra_values, layer=layer_name(nf, stage.output))
    (record,) = ctx.records
    assert record.rule == "region_inverse" and record.method == ("dense" if solver == "dense" else "cgls")
    assert record.converged and record.residual < tol, record

    assert rel_err(op.matvec(u) + theta, b_w) < tol  # J u + θ = B_w
    for i in range(x.shape[0]):  # u = J⁺ (B_w − θ): no component in null(J)
        jac = op.jacobian(i)
        assert jac.shape == (q, p)
        oracle = torch.linalg.pinv(jac) @ (b_w[i] - theta[i]).double().flatten()
        assert rel_err(u[i].flatten(), oracle) < 10 * tol, (i, rel_err(u[i].flatten(), oracle))
    # the region's forward point is on its own affine piece: J a_u + θ = g(a_u)
    with torch.no_grad():
        torch.testing.assert_close(op.matvec(a_u) + theta, module(a_u, *extra_values), rtol=1e-4, atol=1e-5)


# ------------------------------------------- I2 through a region: the region input is reconstructed


@pytest.mark.parametrize("kind", KINDS)
def test_i2_injective_attention_region_reconstructs_its_input(kind):
    """With N at a region's output (B_w = a_w exactly) and damping 0, the region's input and every
    node inside it get their own activations back (where not abandoned): the region is injective
    (q ≥ p: the stage-1 block widens 8 → 32 channels; BAM maps 32×8×8 onto itself)."""
    model = tiny(kind)
    x = batch((1, 3, 32, 32), seed=25)
    marker = REGION_MARKER[kind].format(k=1)
    probe = compile_naflow(model, x, layers="all")
    stage = region_of(probe, marker)
    last, first = layer_name(probe, stage.output), layer_name(probe, stage.input)
    inner = [layer_name(probe, b) for b in stage.body[:-1] if layer_name(probe, b) in probe.layers]
    nf = compile_naflow(
        model, x, last_layer=last, layers=[first, *inner], damping=0.0, solver="iterative", tol=1e-8, max_iter=3000
    )
    assert nf.last_layer == last and marker in nf.layers
    flow = nf(x)
    rec = flow.diagnostics[last]
    assert rec.rule == "region_inverse" and rec.converged, flow.format_diagnostics()

    node_of = {layer_name(nf, n.name): n.name for n in nf.graph_module.graph.nodes}
    with torch.no_grad():
        _, values = emit_recorder(nf.graph_module, [node_of[name] for name in nf.layers])(x)
    act = dict(zip(nf.layers, values))
    lam = flow.coefficients[first]
    assert (lam != 0).float().mean() > 0.9, "premise: (almost) nothing is abandoned at the region input"
    assert rel_err(flow.bpfm[first], act[first] * (lam != 0)) < 1e-3, rel_err(flow.bpfm[first], act[first])
    for name in inner:  # B_v = J_{u→v} B_u + θ_{u→v} = a_v, then the abandoning mask
        mask = flow.coefficients[name] != 0
        assert rel_err(flow.bpfm[name], act[name] * mask) < 1e-3, name


# ------------------------------------------------------------------------ I5: batch equivariance


@pytest.mark.parametrize(
    "kind, solver, kwargs, deep",
    [
        ("cbam", "dense", {}, ("layer3", "layer4")),
        # both regions are dense for the batch and for each sample (q·p·3 ≤ dense_limit)
        ("bam", "auto", {}, ("bam3", "layer4")),
        # CGLS stops each sample at its own tolerance: batch and single agree to about the tolerance
        ("se", "iterative", dict(tol=1e-6, max_iter=2000), ("layer4",)),
        # "auto" picks dense or CGLS per matrix, never by batch size: the 512 × 1024 layer3 region
        # is dense for one sample and for three alike
        ("cbam", "auto", {}, ("layer3", "layer4")),
    ],
    ids=["cbam-dense", "bam-auto", "se-iterative", "cbam-auto"],
)
def test_i5_batch_equals_per_sample_results(kind, solver, kwargs, deep):
    model = tiny(kind)
    x = batch((3, 3, 32, 32), seed=26)
    targets = [3, 0, 2]
    every = compile_naflow(model, x[:1], layers="all").layers
    nf = compile_naflow(model, x[:1], solver=solver, layers=[n for n in every if n.startswith(deep)], **kwargs)
    assert any(kind in name for name in nf.layers)
    assert_batch_equals_samples(nf, x, targets)


# ----------------------------------------------------------------------- I6: the model is untouched


@pytest.mark.parametrize("kind", KINDS)
def test_i6_model_left_in_train_mode_is_untouched(kind):
    model = tiny(kind).train()  # BN would use batch statistics (BAM's BatchNorm1d too)
    x = batch((2, 3, 32, 32), seed=27)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    modules = dict(model.named_modules())
    hooked = ["", "layer1.0", "layer4.0.conv3", "fc"]
    hooked += {"cbam": ["layer2.0.cbam", "layer2.0.cbam.spatial.conv"], "bam": ["bam2", "bam2.channel.mlp.1"]}.get(
        kind, ["layer2.0.se", "layer2.0.se.gate"]
    )
    counter = _Counter()
    for name in hooked:
        modules[name].register_forward_hook(counter.hook(f"{name}:fwd"))
        modules[name].register_forward_pre_hook(counter.hook(f"{name}:pre"))
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    hook_ids = {name: (list(modules[name]._forward_hooks), list(modules[name]._forward_pre_hooks)) for name in hooked}
    every = compile_naflow(model, x[:1], layers="all").layers
    nf = compile_naflow(model, x, layers=[n for n in every if n.startswith(("bam3", "layer4"))])
    assert any(kind in name for name in nf.layers)  # an attention region is inverted
    counter.calls.clear()  # tracing may run container hooks on fx proxies; nf(x) must not call any
    flow = nf(x)
    again = nf(x)

    assert counter.calls == [], counter.calls
    torch.testing.assert_close(flow.output, expected, rtol=1e-5, atol=1e-5)  # eval semantics
    assert torch.equal(flow.output, again.output)
    for name in nf.layers:
        assert torch.equal(flow.maps[name], again.maps[name]), name
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k  # incl. running stats, counters
    assert {
        name: (list(modules[name]._forward_hooks), list(modules[name]._forward_pre_hooks)) for name in hooked
    } == hook_ids
    # the user's hooks still work on the user's model
    with torch.no_grad():
        model.eval()(x)
    assert {f"{name}:{when}" for name in hooked for when in ("pre", "fwd")} <= set(counter.calls)

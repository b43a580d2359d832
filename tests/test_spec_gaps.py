"""Spec requirements an audit found untested: each test here fails on a known mutation of the code.

* Region inner nodes get ``B_v = J_{u→v} B_u + θ_{u→v}`` (spec §2 "Regions", decision 17), checked
  with damping (so ``B_u ≠ a_u``) against an independent ``torch.func.jvp`` of hand-written
  sub-functions of the model.
* I6 "hooks are as before": backward hooks survive tracing, and every hook dict is the same object.
* Decision 13: a frozen model is explained exactly like the unfrozen one.
* Decisions 6/14: σ_max is cached per layer *and* input shape.
* Decision 32: the measured default damping is pinned.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from _oracle import assert_rel_close
from models import ResidualNet, seeded, warm_batchnorm
from torch import Tensor, nn
from torch.func import jvp

import naflow_fx
from naflow_fx import SolverConfig, ZeroMapsWarning, compile_naflow

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (restored afterwards): these are many tiny ops on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _input(shape, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


# ------------------------------------------------------------------------ 1. region inner nodes


class SEResidualNet(nn.Module):
    """A stem, then one residual block whose branch is conv → BN → ReLU → conv → squeeze-excitation gate.

    The region ``stem_relu → add`` holds the branch's convs, its ReLU and the gate (global pool,
    1×1 convs, ReLU, sigmoid, product): every kind of node a region's ``jvp`` image must follow.
    """

    def __init__(self, c: int = 6, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stem_relu = nn.ReLU()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)
        self.gate = nn.Sigmoid()
        self.out_relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem_relu(self.stem(x))
        out = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        g = self.gate(self.fc2(torch.relu(self.fc1(self.squeeze(out)))))
        out = self.out_relu(out * g + x)
        return self.fc(self.pool(out).mean((2, 3)))


# Hand-written forwards, independent of naflow_fx: ``stem`` gives the region input a_u (the flow's
# layer ``stem_relu``), ``branch`` every inner node of the region u → add by the flow's layer name,
# ``head`` the logits from the region output (``add``).


def _residual_stem(m: ResidualNet, x: Tensor) -> Tensor:
    return torch.relu(m.stem_bn(m.stem(x)))


def _residual_branch(m: ResidualNet, u: Tensor) -> dict[str, Tensor]:
    out = {"conv1": m.conv1(u)}
    out["bn1"] = m.bn1(out["conv1"])
    out["relu"] = torch.relu(out["bn1"])
    out["conv2"] = m.conv2(out["relu"])
    out["bn2"] = m.bn2(out["conv2"])
    out["add"] = out["bn2"] + u
    return out


def _residual_head(m: ResidualNet, w: Tensor) -> Tensor:
    return m.fc(m.pool(F.relu(w)).mean((2, 3)))


def _se_stem(m: SEResidualNet, x: Tensor) -> Tensor:
    return torch.relu(m.stem(x))


def _se_branch(m: SEResidualNet, u: Tensor) -> dict[str, Tensor]:
    out = {"conv1": m.conv1(u)}
    out["bn1"] = m.bn1(out["conv1"])
    out["relu1"] = torch.relu(out["bn1"])
    out["conv2"] = m.conv2(out["relu1"])
    out["squeeze"] = out["conv2"].mean((2, 3), keepdim=True)
    out["fc1"] = m.fc1(out["squeeze"])
    out["relu"] = torch.relu(out["fc1"])
    out["fc2"] = m.fc2(out["relu"])
    out["gate"] = torch.sigmoid(out["fc2"])
    out["mul"] = out["conv2"] * out["gate"]
    out["add"] = out["mul"] + u
    return out


def _se_head(m: SEResidualNet, w: Tensor) -> Tensor:
    return m.fc(m.pool(torch.relu(w)).mean((2, 3)))


def _residual_net() -> nn.Module:
    return ResidualNet.pair(size=8, seed=3)[1].double()


def _se_net() -> nn.Module:
    return warm_batchnorm(seeded(4, SEResidualNet), (8, 3, 8, 8), seed=5).double()


REGION_MODELS = {
    "residual": (_residual_net, _residual_stem, _residual_branch, _residual_head),
    "squeeze_excitation": (_se_net, _se_stem, _se_branch, _se_head),
}


@pytest.mark.parametrize("name", list(REGION_MODELS))
def test_region_inner_nodes_follow_the_tangent_of_the_solved_input(name):
    """Spec §2 "Regions", decision 17: inside a region u → w, ``B_v = a_v + J_{u→v}(B_u − a_u)``, masked by Λ_v ≠ 0.

    With the default damping (1e-2) the region solve does not return ``a_u`` (and ``B_w`` is
    abandoned below w), so ``B_u − a_u`` is far from 0 and the tangent term matters: a flow that
    gave the inner nodes their activations ``a_v`` (the primal alone) fails here. The oracle is
    ``torch.func.jvp`` of hand-written sub-functions u → v of the model's own modules, float64.
    """
    build, stem, branch, head = REGION_MODELS[name]
    model = build()
    x = _input((2, 3, 8, 8), seed=11, dtype=F64)
    nf = compile_naflow(model, x[:1], layers="all")
    flow = nf(x)

    # The region whose inner nodes are checked: its stage in the plan, and the flow's names for it.
    nodes = {n.name: n for n in nf.graph_module.graph.nodes}
    layer_of = {n: nodes[n].meta.get("naflow.name", n) for n in nodes}
    (stage,) = [s for s in nf.plan.stages if layer_of[s.output] == "add"]
    assert stage.is_region
    u = layer_of[stage.input]
    assert u == "stem_relu"
    inner = [layer_of[b] for b in stage.body[:-1]]

    # Independent forward: a_u, every a_v, the scores and their gradients Λ.
    with torch.enable_grad():
        a_u = stem(model, x).detach().requires_grad_(True)
        acts = branch(model, a_u)
        logits = head(model, acts["add"])
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
        assert sorted(inner) == sorted(k for k in acts if k != "add"), "the region's inner layers changed"
        target = logits.detach().argmax(1)
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, [a_u, *(acts[v] for v in inner)])
    lam_u, lams = grads[0], dict(zip(inner, grads[1:]))

    # B_u: the flow's BPFM of the region input is the solve's output masked by Λ_u ≠ 0, and the
    # inner nodes are computed from the unmasked solve output (decision 17). They coincide when
    # Λ_u has no zeros, which holds here (a_u feeds the identity path, whose gradient is dense).
    assert bool((lam_u != 0).all()), "Λ_u has zeros: flow.bpfm[u] is not the solve's output any more"
    b_u = flow.bpfm[u]
    a_u = a_u.detach()
    drift = float((b_u - a_u).norm() / a_u.norm())
    assert drift > 1e-2, f"B_u ≈ a_u (relative difference {drift:.1e}): the test would not see the tangent term"
    assert flow.diagnostics["add"].damping > 0

    for v in inner:

        def to_v(z: Tensor, v: str = v) -> Tensor:
            return branch(model, z)[v]

        a_v, tangent = (t.detach() for t in jvp(to_v, (a_u,), (b_u - a_u,)))
        keep = lams[v] != 0
        expected = (a_v + tangent) * keep
        got = flow.bpfm[v]
        torch.testing.assert_close(flow.coefficients[v], lams[v], rtol=1e-9, atol=1e-12, msg=f"Λ at {v}")
        leaked = int(got[~keep].ne(0).sum())
        assert leaked == 0, f"{name}/{v}: B_v is not abandoned where Λ_v = 0 ({leaked} non-zero entries)"
        assert_rel_close(got, expected, 1e-9, what=f"{name}/{v}: B_v vs a_v + J_(u→v)(B_u − a_u)")
        # the tangent term is a visible part of B_v at every inner node, so the check above has teeth
        share = float((tangent * keep).norm() / expected.norm().clamp_min(1e-300))
        assert share > 1e-3, f"{name}/{v}: the tangent term is only {share:.1e} of B_v"


# ------------------------------------------------------------------------ 2. I6: hooks as before


def _hook_dicts(model: nn.Module) -> dict:
    """Every hook container of every module (any attribute whose name mentions hooks, such as
    ``_forward_hooks``, ``_backward_pre_hooks``, ``_forward_hooks_with_kwargs``, state-dict hooks):
    ``{(module name, attribute): (the dict object, [(key, hook object), ...])}``, plus the flag a
    full backward hook sets."""
    seen = {}
    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if "hook" in attr and isinstance(value, dict):
                seen[(name, attr)] = (value, list(value.items()))
        seen[(name, "_is_full_backward_hook")] = (getattr(mod, "_is_full_backward_hook", None), None)
    return seen


def _assert_same_hooks(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), "hook containers were added or removed"
    for where, (obj, items) in before.items():
        now, now_items = after[where]
        if items is None:  # the full-backward-hook flag
            assert now == obj, f"{where} changed from {obj!r} to {now!r}"
            continue
        assert now is obj, f"{where}: the hook dict was replaced by another object (a handle's remove() would miss it)"
        assert [k for k, _ in now_items] == [k for k, _ in items], f"{where}: hook keys changed"
        assert all(a is b for (_, a), (_, b) in zip(now_items, items)), f"{where}: hook objects changed"


class Wrapped(nn.Module):
    """A model whose body is a composite module: fx traces through it (it is not a leaf), so its
    hooks would run on fx proxies if they were not detached while tracing."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def test_i6_backward_and_forward_hooks_are_as_before_and_still_fire():
    """Spec I6 ("hooks are as before"), decisions 3/4: hooks are detached while tracing and put back.

    After compiling and running a flow, the user's backward hooks (full backward and backward-pre
    hooks on a leaf module and on a traced composite module, a full backward hook on the root)
    still fire on ``model(x).sum().backward()``, forward hooks too; every hook dict of every module
    is the very object it was, holding the same hooks; the flow runs none of them; and the
    handles still remove them.
    """
    model = Wrapped(ResidualNet.pair(size=8, seed=0)[1])
    body = model.body
    x = _input((2, 3, 8, 8), seed=1)
    fired: list[str] = []

    def hook(what: str):
        return lambda *args, **kwargs: fired.append(what)

    handles = [
        body.conv2.register_full_backward_hook(hook("conv2 backward")),
        body.conv2.register_full_backward_pre_hook(hook("conv2 backward pre")),
        body.register_full_backward_hook(hook("body backward")),
        body.register_full_backward_pre_hook(hook("body backward pre")),
        body.register_forward_hook(hook("body forward")),
        body.register_forward_pre_hook(hook("body forward pre")),
        model.register_full_backward_hook(hook("root backward")),
        body.bn1.register_forward_hook(hook("bn1 forward")),
        body.bn1.register_forward_pre_hook(hook("bn1 forward pre")),
        body.stem.register_forward_hook(hook("stem forward kwargs"), with_kwargs=True),
        body.stem.register_forward_pre_hook(hook("stem pre kwargs"), with_kwargs=True),
        body.stem_bn.register_forward_hook(hook("stem_bn always"), always_call=True),
    ]
    everything = {
        "conv2 backward",
        "conv2 backward pre",
        "body backward",
        "body backward pre",
        "body forward",
        "body forward pre",
        "root backward",
        "bn1 forward",
        "bn1 forward pre",
        "stem forward kwargs",
        "stem pre kwargs",
        "stem_bn always",
    }
    xg = x.clone().requires_grad_(True)  # so that the full backward hooks have an input gradient
    model(xg).sum().backward()
    assert set(fired) == everything  # the hooks work before compiling
    model.zero_grad()
    before = _hook_dicts(model)

    fired.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nf = compile_naflow(model, x[:1])
    # Tracing must not run the user's hooks on fx proxies either: torch then warns that "for backward
    # hooks to be called, module output should be a Tensor" (naflow's own warning about forward
    # hooks, decision 3, is expected).
    on_proxies = [
        str(w.message)
        for w in caught
        if "hook" in str(w.message) and "the model has forward hooks" not in str(w.message)
    ]
    assert not on_proxies, f"the user's hooks ran while tracing: {on_proxies}"
    _assert_same_hooks(before, _hook_dicts(model))
    nf(x)
    assert fired == [], f"compiling or running the flow ran the user's hooks: {fired}"
    _assert_same_hooks(before, _hook_dicts(model))

    model(xg).sum().backward()
    assert set(fired) == everything, f"hooks that no longer fire: {sorted(everything - set(fired))}"

    for handle in handles:
        handle.remove()
    fired.clear()
    model(xg).sum().backward()
    assert fired == [], f"hooks the handles could not remove after compile_naflow: {fired}"


# ------------------------------------------------------------------------ 3. decision 13: frozen models


def test_a_frozen_model_is_explained_like_the_unfrozen_one():
    """Decision 13: the flow makes its input require grad, so a model with ``requires_grad=False``
    on every parameter gets exactly the unfrozen model's maps, BPFMs, coefficients and scores,
    without a ``ZeroMapsWarning``, and stays frozen."""
    model = ResidualNet.pair(size=8, seed=2)[1]
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = _input((2, 3, 8, 8), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroMapsWarning)
        ref = compile_naflow(model, x[:1])(x)
        got = compile_naflow(frozen, x[:1])(x)
    assert torch.equal(got.scores, ref.scores)
    assert torch.equal(got.classes, ref.classes)
    assert got.layers == ref.layers
    assert bool(ref.coefficients[ref.layers[-1]].flatten(1).ne(0).any(1).all()), "Λ_N is zero for a sample"
    for layer in ref.layers:
        assert torch.equal(got.coefficients[layer], ref.coefficients[layer]), f"Λ differs at {layer}"
        assert torch.equal(got.bpfm[layer], ref.bpfm[layer]), f"BPFM differs at {layer}"
        assert torch.equal(got.maps[layer], ref.maps[layer]), f"map differs at {layer}"
    assert {k: r.damping for k, r in got.diagnostics.items()} == {k: r.damping for k, r in ref.diagnostics.items()}
    assert any(float(m.max()) > 0 for m in got.maps.values())
    assert not any(p.requires_grad for p in frozen.parameters()), "the flow unfroze the model"
    assert all(p.grad is None for p in frozen.parameters()), "the flow wrote parameter gradients"


# ------------------------------------------------------------------------ 4. σ_max cache per shape


class PlainConvNet(nn.Module):
    """Four lone 3×3 convs, each solved with λ = damping · σ_max (σ_max from Lanczos, cached); conv3 and
    conv4 have the same input shape, so only the layer tells their cache entries apart."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.1)
        x = F.leaky_relu(self.conv2(x), 0.1)
        x = F.leaky_relu(self.conv3(x), 0.1)
        x = F.leaky_relu(self.conv4(x), 0.1)
        return self.fc(x.mean((2, 3)))


def _assert_same_flow(got, ref, what: str) -> None:
    assert got.layers == ref.layers
    for layer in ref.layers:
        same_map, same_bpfm = (
            torch.equal(got.maps[layer], ref.maps[layer]),
            torch.equal(got.bpfm[layer], ref.bpfm[layer]),
        )
        assert same_map, f"{what}: map differs at {layer}"
        assert same_bpfm, f"{what}: BPFM differs at {layer}"
    assert got.diagnostics.keys() == ref.diagnostics.keys()
    for layer, rec in ref.diagnostics.items():
        assert got.diagnostics[layer].damping == rec.damping, f"{what}: λ differs at {layer}"


def test_the_sigma_max_cache_is_per_input_shape():
    """Decisions 6/14: σ_max (hence λ) is cached per layer and input shape, so a flow called at 16 px
    and then at 40 px gives exactly what a flow compiled at 40 px gives, and back at 16 px exactly
    what it gave the first time."""
    model = seeded(0, PlainConvNet).eval()
    x16, x40 = _input((2, 3, 16, 16), seed=1), _input((2, 3, 40, 40), seed=2)
    nf = compile_naflow(model, x16[:1], last_layer="conv4")
    first16 = nf(x16)
    solved = [r for r in first16.diagnostics.values() if r.damping > 0]
    assert {r.layer for r in solved} >= {"conv2", "conv3", "conv4"}, "the convs are no longer solved with a damping"
    lam = {r.layer: r.damping for r in solved}
    assert lam["conv3"] != lam["conv4"], "conv3 and conv4 have the same λ: a cache shared by them would not show"
    got40 = nf(x40)
    fresh40 = compile_naflow(model, x40[:1], last_layer="conv4")(x40)
    _assert_same_flow(got40, fresh40, "40 px after 16 px")
    # the two sizes really have different λ, so sharing one cached σ_max would show
    assert any(got40.diagnostics[r.layer].damping != r.damping for r in solved)
    _assert_same_flow(nf(x16), first16, "16 px again after 40 px")


# ------------------------------------------------------------------------ 5. decision 32: default damping


def test_the_default_damping_is_the_measured_one():
    """Decision 32 (docs/naflow.md) and docs/performance.md measured the default damping 1e-2 on
    the trained shapes model; it must not change without a new measurement."""
    why = "the default damping 1e-2 was measured (docs/naflow.md decision 32, docs/performance.md): re-measure first"
    assert SolverConfig().damping == 1e-2, why
    assert inspect.signature(compile_naflow).parameters["damping"].default == 1e-2, why
    assert inspect.signature(naflow_fx.compile_naflow).parameters["damping"].default == SolverConfig().damping, why

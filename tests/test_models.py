"""Model-level invariants (spec §3): real architectures, I1 (Grad-CAM), I2 (exact inversion),
I3 (consistency, minimality), dense ≡ iterative, I5 (batch equivariance), I6 (model untouched).

Everything runs on random weights with fixed seeds at small input sizes (no downloads).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from models import GapLinearNet, InvertibleNet, PReLUNet, ResidualNet, StridedNet, conv4, conv64f
from torch import Tensor, nn
from torch.func import jacrev

from naflow_fx import compile_naflow
from naflow_fx.result import normalize_maps

# ----------------------------------------------------------------------------------------- helpers


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(torchvision.models, name)(weights=None).eval()


def batch(shape, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def activations(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Eval-mode outputs of the named modules, by forward hooks on a deep copy of ``model``."""
    twin = copy.deepcopy(model).eval()
    modules = dict(twin.named_modules())
    out: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach().clone())) for n in names
    ]
    with torch.no_grad():
        twin(x)
    for h in handles:
        h.remove()
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a − b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def assert_batch_equals_samples(nf, x: Tensor, targets: list[int]) -> None:
    """I5: a flow of the batch ``x`` equals the flows of its samples (maps, BPFMs, coefficients)."""
    whole = nf(x, targets)
    torch.testing.assert_close(whole.classes, torch.tensor(targets))
    for i, t in enumerate(targets):
        one = nf(x[i : i + 1], t)
        for name in nf.layers:
            for field in ("maps", "bpfm", "coefficients"):
                ref, got = getattr(one, field)[name][0], getattr(whole, field)[name][i]
                scale = float(ref.abs().max())
                torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * scale, msg=f"{field}[{name}][{i}]")


def assert_finite_flow(nf, flow, x: Tensor) -> None:
    assert flow.layers == nf.layers and len(nf.layers) > 0
    for name in nf.layers:
        m, bp, lam = flow.maps[name], flow.bpfm[name], flow.coefficients[name]
        assert m.dim() == 3 and m.shape[0] == x.shape[0], (name, m.shape)
        assert bp.shape == lam.shape and bp.shape[0] == x.shape[0] and bp.shape[-2:] == m.shape[-2:], name
        assert torch.isfinite(m).all() and torch.isfinite(bp).all() and torch.isfinite(lam).all(), name
        assert (m >= 0).all(), name
    up = flow.upsample()
    assert up.shape == (x.shape[0], len(nf.layers), *x.shape[-2:])
    assert torch.isfinite(up).all() and up.min() >= 0 and up.max() <= 1


# ---------------------------------------------------------------- models compile and flow everywhere


@pytest.mark.parametrize(
    "name, size",
    [("alexnet", 64), ("vgg11_bn", 32), ("vgg16_bn", 32)],
)
def test_torchvision_models_give_finite_maps_for_all_layers(name, size):
    model = torchvision_model(name)
    x = batch((2, 3, size, size))
    nf = compile_naflow(model, x)
    flow = nf(x)
    assert_finite_flow(nf, flow, x)
    with torch.no_grad():
        torch.testing.assert_close(flow.output, model(x), rtol=1e-5, atol=1e-5)
    # B_N = a_N at the last layer; every solve of the default configuration converged
    acts = activations(model, x, [nf.last_layer])
    torch.testing.assert_close(flow.bpfm[nf.last_layer], acts[nf.last_layer], rtol=1e-5, atol=1e-6)
    assert all(r.converged for r in flow.diagnostics.values()), flow.format_diagnostics()
    assert sum(r.rule == "conv2d_inverse" for r in flow.diagnostics.values()) >= 4


@pytest.mark.parametrize(
    "build, last",
    [
        (lambda: conv4(num_classes=5), "features.14"),
        (lambda: conv64f(num_classes=5), "features.14"),
        (lambda: conv4(), "features.14"),  # the plain embedding encoder (output = features)
        (lambda: PReLUNet.build(), "act2"),
    ],
    ids=["conv4", "conv64f", "conv4-embedding", "prelu"],
)
def test_small_models_give_finite_maps_for_all_layers(build, last):
    model = build()
    x = batch((3, 3, 16, 16), seed=1)
    nf = compile_naflow(model, x)
    assert nf.last_layer == last
    flow = nf(x)
    assert_finite_flow(nf, flow, x)
    acts = activations(model, x, nf.layers)
    torch.testing.assert_close(flow.bpfm[last], acts[last])
    for name in nf.layers:
        assert flow.bpfm[name].shape == acts[name].shape, name


# ------------------------------------------------------------------------------ I1: = Grad-CAM at N


def test_i1_last_layer_equals_grad_cam_package():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = GapLinearNet.build(size=12)
    x = batch((3, 3, 12, 12), seed=2)
    classes = [1, 4, 0]
    nf = compile_naflow(model, x)
    assert nf.last_layer == "relu2"
    flow = nf(x, classes)
    ours = flow.maps["relu2"]
    assert ours.shape == (3, 12, 12)  # no downsampling: the package's resize is the identity
    assert (ours.flatten(1).amax(1) > ours.flatten(1).amin(1)).all()  # non-constant maps

    twin = copy.deepcopy(model)  # the package calls backward (fills .grad) and hooks the model
    with GradCAM(model=twin, target_layers=[twin.relu2]) as cam:
        reference = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(c) for c in classes])
    reference = torch.from_numpy(reference)
    assert reference.shape == (3, 12, 12)

    torch.testing.assert_close(normalize_maps(ours), reference, rtol=0, atol=1e-4)
    baseline = nf.gradcam(x, classes)
    assert baseline.method == "gradcam"
    torch.testing.assert_close(normalize_maps(baseline.maps["relu2"]), reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, baseline.maps["relu2"], rtol=1e-5, atol=1e-6)
    # ∂s/∂a_N is constant over space for a GAP + linear head
    lam = flow.coefficients["relu2"]
    torch.testing.assert_close(lam, lam[:, :, :1, :1].expand_as(lam))


# -------------------------------------------------------------------------------- I2: exact inversion


@pytest.mark.parametrize(
    "solver, channels, kwargs",
    [
        ("dense", (3, 6, 8, 12), {}),
        ("dense", (3, 4, 6, 6), {}),  # includes a square conv (q = p)
        ("iterative", (3, 6, 8, 12), dict(tol=1e-8, max_iter=5000)),
    ],
    ids=["dense", "dense-square", "iterative"],
)
def test_i2_injective_net_reconstructs_its_activations(solver, channels, kwargs):
    model = InvertibleNet.build(size=8, channels=channels)
    x = batch((2, 3, 8, 8), seed=3)
    nf = compile_naflow(model, x, solver=solver, damping=0.0, **kwargs)
    assert nf.layers == [f"{k}{i}" for i in (1, 2, 3) for k in ("conv", "bn", "act")]
    flow = nf(x)
    acts = activations(model, x, nf.layers)
    for name in nf.layers:
        assert (flow.coefficients[name] != 0).all(), f"premise: nothing is abandoned at {name}"
        assert rel_err(flow.bpfm[name], acts[name]) < 1e-3, (name, rel_err(flow.bpfm[name], acts[name]))
    assert torch.equal(flow.bpfm["act3"], acts["act3"])


# ------------------------------------------------------------------- I3: consistency and minimality


def test_i3_conv_solutions_are_consistent_on_the_injective_net():
    model = InvertibleNet.build(size=8)
    x = batch((2, 3, 8, 8), seed=4)
    flow = compile_naflow(model, x, solver="dense", damping=0.0)(x)
    for conv, below in [("conv2", "act1"), ("conv3", "act2")]:
        layer = getattr(model, conv)
        image = F.conv2d(flow.bpfm[below], layer.weight, layer.bias, padding=1)  # J B_u + θ
        assert rel_err(image, flow.bpfm[conv]) < 1e-5, conv
        assert flow.diagnostics[conv].residual < 1e-5


def _conv_jacobian(conv: nn.Conv2d, in_shape) -> Tensor:
    x0 = torch.zeros(1, *in_shape, dtype=torch.float64)
    w = conv.weight.detach().double()

    def fn(x):
        return F.conv2d(x, w, None, conv.stride, conv.padding)

    return jacrev(fn)(x0).reshape(-1, x0.numel())


@pytest.mark.parametrize("solver, kwargs", [("dense", {}), ("iterative", dict(tol=1e-9, max_iter=5000))])
def test_i3_strided_conv_solution_is_minimum_norm(solver, kwargs):
    model = StridedNet.build()
    x = batch((2, 3, 6, 6), seed=5)
    nf = compile_naflow(model, x, solver=solver, damping=0.0, **kwargs)
    assert nf.last_layer == "conv2"
    flow = nf(x)
    acts = activations(model, x, ["act", "conv2"])
    b_u = flow.bpfm["act"]
    assert (flow.coefficients["act"] != 0).all(), "premise: no abandoning at the solved layer"

    jac = _conv_jacobian(model.conv2, b_u.shape[1:])  # q × p = 36 × 144
    assert jac.shape[0] < jac.shape[1]
    pinv = torch.linalg.pinv(jac)
    flat = b_u.double().flatten(1).T
    rhs = (acts["conv2"] - model.conv2.bias.detach()[:, None, None]).double().flatten(1).T
    tol = 1e-6 if solver == "dense" else 1e-4
    # B_u ⟂ null(J): it equals its projection on the row space
    assert rel_err(pinv @ (jac @ flat), flat) < tol
    # J B_u + θ = B_w (the under-determined system is consistent) and B_u = J⁺(B_w − θ)
    assert rel_err(jac @ flat, rhs) < tol
    assert rel_err(flat, pinv @ rhs) < tol
    # minimal: no longer than the true activation, which is another solution
    assert (b_u.flatten(1).norm(dim=1) <= acts["act"].flatten(1).norm(dim=1) * (1 + 1e-6)).all()
    assert rel_err(b_u, acts["act"]) > 1e-2  # and a different one: the null-space part was dropped


# ------------------------------------------------------------------- dense and iterative agree (I4)


@pytest.mark.parametrize(
    "build, size, layers",
    [
        # Conv-4 needs 16×16 (four 2× pools). Its 8×8 conv (features.4) would need a dense SVD of a
        # 4096² Jacobian (~30 s), so the explained layers start at features.4: solves at 4×4 and 2×2
        (lambda: conv4(num_classes=5), 16, [f"features.{i}" for i in range(4, 15)]),
        # the dense Jacobian of a 512-channel conv is only affordable at 2×2: layers after features.21
        (lambda: torchvision_model("vgg11_bn"), 32, [f"features.{i}" for i in range(22, 28)]),
    ],
    ids=["conv4", "vgg11_bn"],
)
def test_dense_and_iterative_solvers_agree(build, size, layers):
    """Same damped problem, dense SVD vs CGLS at a tight tolerance: the maps agree (r ≥ 0.999)."""
    model = build()
    x = batch((2, 3, size, size), seed=6)
    dense = compile_naflow(model, x, solver="dense", layers=layers)(x)
    iterative = compile_naflow(model, x, solver="iterative", layers=layers, tol=1e-7, max_iter=3000)(x)
    methods = {r.method for r in dense.diagnostics.values()} | {r.method for r in iterative.diagnostics.values()}
    assert {"dense", "cgls"} <= methods
    for name in dense.layers:
        a, b = dense.maps[name], iterative.maps[name]
        assert a.abs().max() > 0, name
        assert pearson(a, b) >= 0.999, (name, pearson(a, b))
        assert pearson(dense.bpfm[name], iterative.bpfm[name]) >= 0.999, name
    for name, rec in iterative.diagnostics.items():
        if rec.method == "cgls":
            assert rec.damping == dense.diagnostics[name].damping > 0  # the same damped problem


@pytest.mark.parametrize(
    "build, size, layers",
    [
        (lambda: conv4(hidden=8, num_classes=4), 16, "all"),  # lone convs (linear_map), BN and ReLU
        (lambda: ResidualNet.pair()[1], 8, "all"),  # a residual region (its float64 stage copy)
    ],
    ids=["conv4", "residual"],
)
def test_dense_solver_with_float32_jacobians_as_on_mps(monkeypatch, build, size, layers):
    """MPS has no float64: dense Jacobians are built in float32 there and widened on the CPU.

    Emulated by building them in float32 on the CPU, which takes the same path.
    """
    from naflow_fx.rules import generic
    from naflow_fx.solvers import dense, operator

    model = build()
    x = batch((2, 3, size, size), seed=3)
    wide = compile_naflow(model, x, solver="dense", layers=layers)(x)
    built = []
    as_on_mps = lambda device: built.append(device) or torch.float32  # noqa: E731
    monkeypatch.setattr(operator, "widest_float", as_on_mps)
    monkeypatch.setattr(generic, "widest_float", as_on_mps)
    homes, solved = [], []
    monkeypatch.setattr(dense, "float64_device", lambda device: homes.append(device) or torch.device("cpu"))
    real_svd_solve = dense.svd_solve
    monkeypatch.setattr(
        dense, "svd_solve", lambda j, b, *a: solved.append((j.dtype, b.dtype)) or real_svd_solve(j, b, *a)
    )
    narrow = compile_naflow(model, x, solver="dense", layers=layers)(x)
    assert homes and set(solved) == {(torch.float64, torch.float64)}  # widened for the SVD, wherever it runs
    assert len(built) > 1 and "dense" in {r.method for r in narrow.diagnostics.values()}
    for name in wide.layers:
        assert narrow.maps[name].dtype == torch.float32
        scale = float(wide.maps[name].abs().max())
        torch.testing.assert_close(narrow.maps[name], wide.maps[name], rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------------------ I5: batch equivariance


@pytest.mark.parametrize(
    "build, solver, kwargs",
    [
        # CGLS stops each sample at its own tolerance; batched and single convs round differently,
        # so batch and single results agree to about the solver tolerance (1.2e-4 at the default 1e-4)
        (lambda: conv4(num_classes=5), "auto", dict(tol=1e-5)),
        (lambda: conv64f(num_classes=5), "iterative", dict(tol=1e-6, max_iter=2000)),
        (lambda: PReLUNet.build(), "dense", {}),
    ],
    ids=["conv4-auto", "conv64f-iterative", "prelu-dense"],
)
def test_i5_batch_equals_per_sample_results(build, solver, kwargs):
    model = build()
    x = batch((3, 3, 16, 16), seed=7)
    targets = [3, 0, 2]
    nf = compile_naflow(model, x[:1], solver=solver, **kwargs)
    assert_batch_equals_samples(nf, x, targets)


# ----------------------------------------------------------------------- I6: the model is untouched


class _Counter:
    def __init__(self):
        self.calls: list[str] = []

    def hook(self, tag):
        return lambda *args: self.calls.append(tag)


def test_i6_model_parameters_buffers_mode_and_hooks_untouched():
    encoder = conv4(size=16)
    model = nn.Sequential(encoder.features, nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        model[3].reset_parameters()
    model.train()  # left in train mode: BN would use batch stats, dropout would drop
    x = batch((3, 3, 16, 16), seed=8)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)

    counter = _Counter()
    hooked = {"root": model, "features": model[0], "conv": model[0][0], "bn": model[0][1], "fc": model[3]}
    handles = []
    for tag, mod in hooked.items():
        handles.append(mod.register_forward_hook(counter.hook(f"{tag}:fwd")))
        handles.append(mod.register_forward_pre_hook(counter.hook(f"{tag}:pre")))
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    hook_ids = {tag: (list(m._forward_hooks), list(m._forward_pre_hooks)) for tag, m in hooked.items()}

    nf = compile_naflow(model, x)
    counter.calls.clear()  # tracing may run container hooks on fx proxies; nf(x) must not call any
    flow = nf(x)
    again = nf(x)

    assert counter.calls == [], counter.calls
    torch.testing.assert_close(flow.output, expected, rtol=1e-6, atol=1e-6)  # eval semantics
    assert torch.equal(flow.output, again.output)  # no dropout randomness
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k  # incl. running stats, counters
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    assert {tag: (list(m._forward_hooks), list(m._forward_pre_hooks)) for tag, m in hooked.items()} == hook_ids
    # the user's hooks still work on the user's model
    with torch.no_grad():
        model.eval()(x)
    assert {"root:pre", "root:fwd", "conv:fwd", "bn:pre", "fc:fwd"} <= set(counter.calls)
    for h in handles:
        h.remove()


@pytest.mark.parametrize(
    "parametrization", ["weight_norm", "spectral_norm", "legacy weight_norm", "legacy spectral_norm"]
)
def test_i6_parametrized_weights_are_their_eval_value_and_leave_the_model_alone(parametrization):
    """torch.nn.utils.parametrizations, and the older hook-based torch.nn.utils.weight_norm / spectral_norm."""
    legacy = parametrization.startswith("legacy ")
    wrap = getattr(torch.nn.utils if legacy else torch.nn.utils.parametrizations, parametrization.split()[-1])
    plain = conv4(num_classes=5, size=16)
    model = copy.deepcopy(plain)
    model.features[4] = wrap(model.features[4])  # a conv inside the explained layers
    model.head = wrap(model.head)  # the classifier after the last layer
    model.train()  # a spectral norm in train mode advances its power iteration on every weight read
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch((2, 3, 16, 16), seed=10)
    nf = compile_naflow(model, x)  # before: UnsupportedOpError on the ParametrizedConv2d
    flow = nf(x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.training
    with torch.no_grad():  # the same network with the parametrized weights written out
        model.eval()
        model(x)  # a legacy hook sets .weight in its pre-forward (in eval mode without power iteration)
        plain.features[4].weight.copy_(model.features[4].weight)
        plain.head.weight.copy_(model.head.weight)
        model.train()
    ref = compile_naflow(plain.eval(), x)(x)
    torch.testing.assert_close(flow.output, ref.output)
    for name in ref.layers:
        torch.testing.assert_close(flow.maps[name], ref.maps[name])
    # the derived weights follow the parameters they come from, like any other weight
    original = "weight_v" if parametrization.endswith("weight_norm") else "weight_orig"
    if not legacy:
        original = "parametrizations.weight.original" + ("1" if original == "weight_v" else "")
    with torch.no_grad():
        weight = model.features[4].get_parameter(original)
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        model.eval()
        expected = model(x)
        model.train()
    assert not torch.allclose(flow.output, expected)
    torch.testing.assert_close(nf(x).output, expected)
    assert model.training


def test_i6_in_place_ops_cannot_corrupt_recorded_activations():
    inplace, plain = ResidualNet.pair(size=8)
    x = batch((2, 3, 8, 8), seed=9)
    with torch.no_grad():
        torch.testing.assert_close(inplace(x), plain(x), rtol=0, atol=0)
    nf_in, nf_out = compile_naflow(inplace, x), compile_naflow(plain, x)
    # functional layers are named after their fx nodes, so `out.relu_()` gives a layer 'relu_'
    assert len(nf_in.layers) == len(nf_out.layers) == 11
    a, b = nf_in(x), nf_out(x)
    for name_in, name_out in zip(nf_in.layers, nf_out.layers):
        for field in ("maps", "bpfm", "coefficients"):
            got, ref = getattr(a, field)[name_in], getattr(b, field)[name_out]
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{field}[{name_in}]")
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    # the in-place model's recorded activations are its true (pre-mutation) activations
    acts = activations(plain, x, ["stem_relu", "bn1", "bn2"])
    assert torch.equal(a.bpfm[nf_in.last_layer], b.bpfm[nf_out.last_layer])
    for name in ("bn1", "bn2"):
        assert (acts[name] < 0).any(), "premise: the in-place ReLU / add would have changed this value"
    torch.testing.assert_close(a.bpfm["stem_relu"], b.bpfm["stem_relu"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- generated code


def test_inverse_code_names_the_forward_nodes_it_inverts(capsys):
    model = torchvision_model("alexnet")
    nf = compile_naflow(model, (1, 3, 64, 64))
    print(nf.inverse.code)
    code = capsys.readouterr().out
    lines = code.splitlines()
    assert any("conv2d_inverse" in line and "layer = 'features.3'" in line for line in lines), code
    assert any("max_pool2d_inverse" in line and "layer = 'features.2'" in line for line in lines)
    assert "def forward(self, solver," in code
    for name in nf.layers[:-1]:
        assert f"bpfm_{name.replace('.', '_')} = " in code, name
    assert "return ({" in code and f"'{nf.last_layer}'" in code
    assert "lam_features_2 = chain_features_3[0]" in code  # Λ chained stage by stage from Λ_N


# ------------------------------------------------------------------------- reduction and abandoning


def test_reductions_match_their_definitions():
    model = conv4(num_classes=5)
    x = batch((2, 3, 16, 16), seed=10)
    sum_relu = compile_naflow(model, x, reduction="sum_relu")(x, [1, 2])
    relu_sum = compile_naflow(model, x, reduction="relu_sum")(x, [1, 2])
    differs = False
    for name in sum_relu.layers:
        torch.testing.assert_close(relu_sum.bpfm[name], sum_relu.bpfm[name], rtol=0, atol=0)
        prod = sum_relu.coefficients[name] * sum_relu.bpfm[name]
        torch.testing.assert_close(sum_relu.maps[name], torch.relu(prod.sum(1)))
        torch.testing.assert_close(relu_sum.maps[name], torch.relu(prod).sum(1))
        assert (relu_sum.maps[name] >= sum_relu.maps[name] - 1e-6).all()
        differs |= not torch.allclose(relu_sum.maps[name], sum_relu.maps[name])
    assert differs


def test_abandoned_neurons_have_zero_bpfm_except_at_the_last_layer():
    model = conv4(num_classes=5)
    x = batch((2, 3, 16, 16), seed=11)
    nf = compile_naflow(model, x)
    flow = nf(x)
    abandoned = 0
    for name in nf.layers:
        dead = flow.coefficients[name] == 0
        if name == nf.last_layer:
            # B_N = a_N: nothing is abandoned at N, even where Λ_N = 0 (unselected max-pool inputs)
            assert dead.any() and (flow.bpfm[name][dead] != 0).any()
            continue
        abandoned += int(dead.sum())
        assert (flow.bpfm[name][dead] == 0).all(), name
    assert abandoned > 0


# ----------------------------------------------- I3 / I5 / I6 on the torchvision models themselves


@pytest.mark.parametrize(
    "name, size, layers",
    [("alexnet", 64, ["features.6", "features.8", "features.11"]), ("vgg11_bn", 32, None), ("vgg16_bn", 32, None)],
)
def test_torchvision_models_keep_invariants(name, size, layers):
    model = torchvision_model(name)
    if layers is None:  # the deeper half of the layers, to keep the test short
        every = compile_naflow(model, (1, 3, size, size)).layers
        layers = every[len(every) // 2 :]
    model.train()  # I6: left in train mode
    calls = _Counter()
    model.features[0].register_forward_hook(calls.hook("fwd"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch((2, 3, size, size), seed=12)
    nf = compile_naflow(model, x, tol=1e-6, max_iter=2000, layers=[n for n in layers if n != "features.0"])
    whole = nf(x, [7, 3])
    # I3 (least-squares form): every solve reached its normal-equation tolerance
    assert all(r.converged for r in whole.diagnostics.values()), whole.format_diagnostics()
    assert all(r.normal_residual <= 1e-6 for r in whole.diagnostics.values() if r.method == "cgls")
    # I5: the batch equals its samples
    for i, t in enumerate([7, 3]):
        one = nf(x[i : i + 1], t)
        for layer in nf.layers:
            ref, got = one.maps[layer][0], whole.maps[layer][i]
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()), msg=layer)
    # I6: untouched
    assert model.training and all(m.training for m in model.modules())
    assert calls.calls == []
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

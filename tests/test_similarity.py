"""Similarity targets (spec §5, paper §III-C): channel contribution weights ω, Λ_N = ∂(Σ_d ω_d)/∂a_N,
the GAP + linear equivalence with class targets, batched references, errors, L2-normalised
embeddings, the embedding models of ``naflow_fx.models`` and custom metrics.

Random weights with fixed seeds, small inputs; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import GapLinearNet, seeded, warm_batchnorm
from test_models import assert_finite_flow, batch
from torch import Tensor, nn

from naflow_fx import ClassTarget, ConfigError, SimilarityTarget, TargetError, compile_naflow
from naflow_fx.models import L2Norm, conv4_encoder, ms_resnet50, npid_resnet, resnet12
from naflow_fx.similarity import METRICS, register_metric


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (the region solves of the ResNets make many small calls; see
    tests/test_attention_models.py), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- helpers


class TinyEmbed(nn.Module):
    """conv → ReLU → conv → ReLU (= N, ``features.3``) → GAP → fc (→ D) → optional L2 normalisation.

    ``norm``: ``"pow"`` (hand-written ``x / x.pow(2).sum(1, keepdim=True).pow(0.5)``), ``"F"``
    (``F.normalize``) or ``None`` (raw embedding). :meth:`tail` is the map ``a_N ↦ embedding``.
    """

    def __init__(self, dim: int = 5, norm: str | None = "pow") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(6, dim)
        self.norm = None if norm is None else L2Norm(functional=(norm == "F"))

    def tail(self, a: Tensor) -> Tensor:
        v = self.fc(a.mean((2, 3)))
        return self.norm(v) if self.norm is not None else v

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.features(x))

    @classmethod
    def build(cls, seed: int = 0, **kwargs) -> TinyEmbed:
        return seeded(seed, lambda: cls(**kwargs)).eval()


def same_weights(model: nn.Module, **kwargs) -> TinyEmbed:
    twin = TinyEmbed(**kwargs).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def assert_maps_close(a, b, layers, rtol: float = 1e-4, fields=("maps",)) -> None:
    for name in layers:
        for field in fields:
            got, ref = getattr(a, field)[name], getattr(b, field)[name]
            atol = 1e-5 * float(ref.abs().max()) + 1e-12
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=f"{field}[{name}]")


# --------------------------------------------------------------------- Σ_d ω_d = sign(v^Q · v^S)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_weights_sum_to_the_sign_of_the_similarity(metric):
    q = batch((64, 16), seed=1).double()
    s = batch((64, 16), seed=2).double()
    target = SimilarityTarget(s, metric=metric)
    omega = target.weights(q)
    assert omega.shape == q.shape and not omega.requires_grad
    dot = (q * s).sum(1)
    if metric == "euclidean":
        expected = -torch.ones(64, dtype=torch.float64)  # −||q − s||² < 0
    else:
        expected = torch.sign(dot)  # cosine and dot have the sign of v^Q · v^S
        assert (expected > 0).any() and (expected < 0).any(), "premise: both signs occur"
    torch.testing.assert_close(omega.sum(1), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(target(q), expected, rtol=0, atol=1e-12)
    if metric == "dot":  # Eq. 17 literally: ω_d = v^Q_d v^S_d / |Σ_d v^Q_d v^S_d|
        torch.testing.assert_close(omega, q * s / dot.abs()[:, None], rtol=1e-12, atol=0)
    if metric == "cosine":
        cos = F.cosine_similarity(q, s, dim=1)
        torch.testing.assert_close(target.similarity(q), cos, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(omega, F.normalize(q, dim=1) * F.normalize(s, dim=1) / cos.abs()[:, None])


# ------------------------------------------------------------------- Λ_N by finite differences


def _similarity(metric: str, q: Tensor, s: Tensor) -> Tensor:
    """The metrics written out independently of naflow_fx.similarity (per sample)."""
    if metric == "cosine":
        return (q / q.norm(dim=1, keepdim=True) * (s / s.norm(dim=1, keepdim=True))).sum(1)
    if metric == "dot":
        return (q * s).sum(1)
    return -((q - s) ** 2).sum(1)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_last_layer_coefficients_are_the_gradient_of_the_detached_denominator_score(metric):
    model = TinyEmbed.build(seed=3, norm="pow").double()
    x = batch((2, 3, 6, 6), seed=3).double()
    ref = batch((2, 5), seed=4).double()
    nf = compile_naflow(model, x)
    assert nf.last_layer == "features.3"
    flow = nf(x, SimilarityTarget(ref, metric=metric))
    lam = flow.coefficients[nf.last_layer]
    assert lam.dtype == torch.float64

    with torch.no_grad():
        a0 = model.features(x)  # a_N
        denom = _similarity(metric, model.tail(a0), ref).abs()  # |Σ_d c_d| at a_N, held constant

        def score(a: Tensor) -> Tensor:  # Σ_d ω_d as a function of a_N (denominator detached)
            return _similarity(metric, model.tail(a), ref) / denom

        torch.testing.assert_close(flow.scores, score(a0), rtol=0, atol=1e-12)  # ±1
        torch.testing.assert_close(flow.bpfm[nf.last_layer], a0, rtol=0, atol=0)  # B_N = a_N
        gen = torch.Generator().manual_seed(5)
        coords = [tuple(int(torch.randint(0, n, (), generator=gen)) for n in a0.shape) for _ in range(8)]
        h = 1e-6
        for coord in coords:
            plus, minus = a0.clone(), a0.clone()
            plus[coord] += h
            minus[coord] -= h
            b = coord[0]
            fd = (score(plus)[b] - score(minus)[b]) / (2 * h)
            torch.testing.assert_close(lam[coord], fd, rtol=1e-6, atol=1e-9, msg=f"Λ_N{coord}")


# ------------------------------------------------------- GAP + linear: dot target ≡ class target


class GapFeatures(GapLinearNet):
    """GapLinearNet without its linear layer: the output is the pooled features ``[B, 12]``."""

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return torch.flatten(self.gap(x), 1)


def test_dot_target_on_pooled_features_equals_class_target_up_to_a_positive_scale():
    """For ``logit_c = w_c · GAP(a_N) + b_c``, the class target's Λ_N is ``w_c / HW``. The dot
    target on the pooled features ``p = GAP(a_N)`` with reference ``w_c`` has score
    ``p · w_c / |p · w_c|`` (denominator constant), so its Λ_N is ``w_c / (HW |p · w_c|)``: the same
    up to the positive per-sample scale ``1/|p · w_c|``, whatever the sign of ``p · w_c``. Every Λ_v
    below is linear in Λ_N, the BPFMs only depend on where Λ vanishes, so every map scales by the
    same factor.

    Cosine does not give this: ``∂ cos(p, w)/∂p = (I − p̂p̂ᵀ) ŵ / ||p||`` projects out the component
    of ``w`` along ``p``, so its Λ_N is not parallel to ``w_c`` and the maps differ in shape (checked
    at the end).
    """
    full = GapLinearNet.build(size=12, seed=6)
    feats = GapFeatures().eval()
    feats.load_state_dict(full.state_dict())
    x = batch((3, 3, 12, 12), seed=6)
    classes = [2, 1, 2]  # p · w_1 < 0 < p · w_2 here: the scale is positive for either sign
    w = full.fc.weight[classes].detach()  # one reference per sample: the class's weight row
    kwargs = dict(solver="dense", last_layer="relu2")
    nf_class = compile_naflow(full, x, **kwargs)
    nf_sim = compile_naflow(feats, x, **kwargs)
    assert nf_class.layers == nf_sim.layers and nf_class.last_layer == nf_sim.last_layer == "relu2"

    by_class = nf_class(x, ClassTarget(classes))
    by_sim = nf_sim(x, SimilarityTarget(w, metric="dot"))
    with torch.no_grad():
        pw = (feats(x) * w).sum(1)
    assert (pw[1] < 0 < pw[0]) and pw[2] > 0, pw
    torch.testing.assert_close(by_sim.scores, torch.sign(pw))

    for name in nf_class.layers:
        ref, got = by_class.maps[name], by_sim.maps[name]
        scale = ref.flatten(1).norm(dim=1) / got.flatten(1).norm(dim=1)  # one scale per sample
        assert (scale > 0).all(), name
        torch.testing.assert_close(scale, pw.abs(), rtol=1e-4, atol=0, msg=f"scale at {name}")
        atol = 1e-6 * float(ref.abs().max())
        torch.testing.assert_close(got * scale[:, None, None], ref, rtol=1e-4, atol=atol, msg=f"maps[{name}]")
        torch.testing.assert_close(by_sim.bpfm[name], by_class.bpfm[name], rtol=1e-5, atol=1e-6)

    # cosine: Λ_N is not parallel to the class target's (the projection removes the p-component)
    by_cos = nf_sim(x, SimilarityTarget(w, metric="cosine"))
    lam_class = by_class.coefficients["relu2"].flatten(1)
    lam_cos = by_cos.coefficients["relu2"].flatten(1)
    alignment = F.cosine_similarity(lam_class, lam_cos, dim=1)
    assert (alignment.abs() < 0.999).all(), alignment
    ref, got = by_class.maps["relu2"], by_cos.maps["relu2"]
    scale = ref.flatten(1).norm(dim=1) / got.flatten(1).norm(dim=1)
    mismatch = (got * scale[:, None, None] - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert (mismatch > 1e-3).all(), mismatch


# --------------------------------------------------------------------------- batched references


def test_batched_references_equal_single_reference_runs_and_a_vector_broadcasts():
    model = TinyEmbed.build(seed=7, norm="pow")
    x = batch((3, 3, 8, 8), seed=7)
    refs = batch((3, 5), seed=8)
    nf = compile_naflow(model, x, solver="dense")
    whole = nf(x, SimilarityTarget(refs))
    for i in range(3):
        one = nf(x[i : i + 1], SimilarityTarget(refs[i]))
        for name in nf.layers:
            for field in ("maps", "bpfm", "coefficients"):
                ref, got = getattr(one, field)[name][0], getattr(whole, field)[name][i]
                atol = 1e-5 * float(ref.abs().max()) + 1e-12
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=atol, msg=f"{field}[{name}][{i}]")
        torch.testing.assert_close(whole.scores[i], one.scores[0])

    # a [D] reference is used for every sample: the same as the [B, D] repetition (and [1, D])
    vector = refs[1]
    by_vector = nf(x, SimilarityTarget(vector))
    for repeated in (vector.expand(3, 5).clone(), vector[None]):
        assert_maps_close(by_vector, nf(x, SimilarityTarget(repeated)), nf.layers, fields=("maps", "coefficients"))


# ------------------------------------------------------------------------------------------ errors


def test_similarity_target_errors():
    model = TinyEmbed.build(seed=9, norm=None)
    x = batch((2, 3, 6, 6), seed=9)
    nf = compile_naflow(model, x)

    with pytest.raises(TargetError, match=r"reference has 7 dimensions.*embedding has 5"):
        nf(x, SimilarityTarget(torch.randn(7)))
    with pytest.raises(TargetError, match=r"got 3 references for a batch of 2"):
        nf(x, SimilarityTarget(torch.randn(3, 5)))
    with pytest.raises(TargetError, match=r"\[B, D\]; got \(2, 6, 6, 6\)"):
        SimilarityTarget(torch.randn(6))(torch.randn(2, 6, 6, 6))
    conv_net = model.features  # outputs a 4-D feature map
    nf_conv = compile_naflow(conv_net, x, last_layer="2")
    with pytest.raises(TargetError, match=r"embeddings of shape \[B, D\]"):
        nf_conv(x, SimilarityTarget(torch.randn(6)))

    # zero similarity: ω = c / |Σ c| is undefined
    with torch.no_grad():
        q = model(x[:1])[0].double()
    r = batch((5,), seed=10).double()
    orthogonal = (r - (r @ q) / (q @ q) * q).float()  # v^Q · v^S = 0
    for metric in ("cosine", "dot"):
        with pytest.raises(TargetError, match=r"is 0"):
            nf(x[:1], SimilarityTarget(orthogonal, metric=metric))
    with pytest.raises(TargetError, match=r"sample 1 .* is 0"):
        SimilarityTarget(torch.tensor([1.0, 0.0]), metric="dot").weights(torch.tensor([[1.0, 1.0], [0.0, 3.0]]))

    with pytest.raises(ConfigError, match=r"unknown similarity metric 'manhattan'.*cosine"):
        SimilarityTarget(torch.randn(5), metric="manhattan")
    with pytest.raises(TargetError, match=r"got list"):
        SimilarityTarget([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(TargetError, match=r"floating-point"):
        SimilarityTarget(torch.arange(5))
    with pytest.raises(TargetError, match=r"NaN or Inf"):
        SimilarityTarget(torch.tensor([float("nan"), 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(TargetError, match=r"got shape \(1, 1, 5\)"):
        SimilarityTarget(torch.randn(1, 1, 5))


# ------------------------------------------------------------------------ L2-normalised embeddings


def test_cosine_is_unchanged_by_normalising_the_embedding_again():
    """The hand-written ``pow(0.5)`` head and ``F.normalize`` give identical maps; cosine on the
    normalised embedding equals cosine on the raw one (normalising again changes nothing), and for
    a normalised embedding the dot target is the cosine target."""
    raw = TinyEmbed.build(seed=11, norm=None)
    pow_head, f_head = same_weights(raw, norm="pow"), same_weights(raw, norm="F")
    x = batch((3, 3, 8, 8), seed=11)
    ref = batch((5,), seed=12)
    with torch.no_grad():
        torch.testing.assert_close(pow_head(x), F.normalize(raw(x), dim=1))
        torch.testing.assert_close(f_head(x), pow_head(x))

    flows = {}
    for name, model in (("raw", raw), ("pow", pow_head), ("F", f_head)):
        nf = compile_naflow(model, x, solver="dense")
        flows[name] = nf(x, SimilarityTarget(ref))
        layers = nf.layers
    flows["pow-dot"] = compile_naflow(pow_head, x, solver="dense")(x, SimilarityTarget(ref, metric="dot"))
    for name in ("pow", "F", "pow-dot"):
        torch.testing.assert_close(flows[name].scores, flows["raw"].scores)
        assert_maps_close(flows[name], flows["raw"], layers, fields=("maps", "coefficients"))
    torch.testing.assert_close(SimilarityTarget(ref).similarity(pow_head(x)), SimilarityTarget(ref).similarity(raw(x)))


# --------------------------------------------------------------------- the embedding model zoo


EMBEDDING_MODELS = {
    # name: (builder, input size, explained layers (None = all), expected last layer N)
    "conv4": (lambda: conv4_encoder(hidden=16), 32, None, "encoder.15"),
    "resnet12": (lambda: resnet12(channels=(8, 16, 16, 32)), 32, None, "layer4.maxpool"),
    "npid_resnet18": (lambda: npid_resnet(18), 32, ["layer4.0.relu#2", "layer4.1.relu#2"], "layer4.1.relu#2"),
    "npid_resnet50": (lambda: npid_resnet(50), 32, ["layer4.1.relu#3", "layer4.2.relu#3"], "layer4.2.relu#3"),
    "ms_resnet50": (lambda: ms_resnet50(), 32, ["layer4.1.relu#3", "layer4.2.relu#3"], "layer4.2.relu#3"),
}


@pytest.mark.parametrize("name", list(EMBEDDING_MODELS))
def test_embedding_models_compile_and_give_finite_maps(name):
    build, size, layers, last = EMBEDDING_MODELS[name]
    model = warm_batchnorm(seeded(13, build), (4, 3, size, size), seed=14)
    x = batch((2, 3, size, size), seed=15)
    support = batch((2, 3, size, size), seed=16)
    nf = compile_naflow(model, x, layers=layers if layers is not None else "all")
    assert nf.last_layer == last
    with torch.no_grad():
        reference = model(support)  # one support embedding per query
    target = SimilarityTarget(reference)
    flow = nf(x, target)
    assert_finite_flow(nf, flow, x)
    torch.testing.assert_close(flow.scores, torch.sign(target.similarity(flow.output)), rtol=0, atol=1e-5)
    if layers is None:
        assert len(nf.layers) > 10, nf.layers
    if name in ("npid_resnet18", "npid_resnet50", "ms_resnet50"):
        torch.testing.assert_close(flow.output.norm(dim=1), torch.ones(2))  # L2-normalised embeddings


# ----------------------------------------------------------------------------------- custom metric


def test_register_metric_custom_metric_works_and_duplicates_raise():
    name = "neg_l1_test"
    assert name not in METRICS
    try:
        register_metric(name, lambda q, s: -(q - s).abs())
        assert name in METRICS
        with pytest.raises(ConfigError, match=r"already registered"):
            register_metric(name, lambda q, s: q * s)
        with pytest.raises(ConfigError, match=r"'cosine' is already registered"):
            register_metric("cosine", lambda q, s: q * s)

        model = TinyEmbed.build(seed=17, norm=None)
        x = batch((2, 3, 6, 6), seed=17)
        ref = batch((5,), seed=18)
        nf = compile_naflow(model, x)
        target = SimilarityTarget(ref, metric=name)
        flow = nf(x, target)
        torch.testing.assert_close(flow.scores, -torch.ones(2))
        assert_finite_flow(nf, flow, x)
        # Λ_N = ∂/∂a_N of −Σ_d |v_d − s_d| / ||v − s||₁ (denominator constant), by autograd on the tail
        a0 = model.features(x).detach().requires_grad_(True)
        v = model.tail(a0)
        l1 = (v - ref).abs().sum(1)
        (grad,) = torch.autograd.grad((-l1 / l1.detach()).sum(), a0)
        torch.testing.assert_close(flow.coefficients[nf.last_layer], grad, rtol=1e-5, atol=1e-7)
    finally:
        METRICS.pop(name, None)
    assert name not in METRICS and {"cosine", "dot", "euclidean"} <= set(METRICS)

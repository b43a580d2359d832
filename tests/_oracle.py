"""Shared helpers of the rule and solver tests: seeded tensors and the independent dense oracle.

The oracle is the spec's definition (§2) written out with nothing from ``naflow_fx``: the
float64 Jacobian ``J`` of the forward op at the forward point (``torch.func.jacrev``, one sample
at a time), ``θ = g(a) − J a`` and ``B_u = pinv(J)(B_w − θ)`` with ``torch.linalg.pinv``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacrev

__all__ = [
    "SEEDS",
    "SETTINGS",
    "AffinePiece",
    "Sample",
    "conv2d_samples",
    "one_torch_thread",
    "affine_piece_of",
    "assert_rel_close",
    "oracle_inverse",
    "rand",
    "rel_err",
    "spell_pair",
]

F64 = torch.float64

# Deterministic hypothesis runs: derandomized, no example database, no deadline (torch is slow to
# warm up), and sizes small enough that each test runs in a few seconds on 2 cores.
SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def one_torch_thread() -> Iterator[None]:
    """Fixture body: run with one intra-op thread, then restore the previous count.

    These tests run thousands of tiny ops; with pytest-xdist on 2 cores, torch's default thread
    pool oversubscribes the machine and a 4×4 conv under ``jvp`` takes ~50 ms instead of ~1 ms.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rand(shape, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """A standard normal tensor from its own generator (deterministic for a given seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.randn(tuple(shape), generator=gen, dtype=F64) * scale).to(dtype)


@dataclass(frozen=True)
class AffinePiece:
    """The affine piece ``y ≈ J x + θ`` of one sample, flattened: ``J`` is ``[q, p]``."""

    jac: Tensor
    theta: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def pinv(self) -> Tensor:
        return torch.linalg.pinv(self.jac)

    @property
    def rank(self) -> int:
        return int(torch.linalg.matrix_rank(self.jac))

    def apply(self, x: Tensor) -> Tensor:
        """``J x + θ`` for one sample ``x`` of shape ``in_shape`` (float64)."""
        return (self.jac @ x.reshape(-1).to(F64) + self.theta).reshape(self.out_shape)


def affine_piece_of(fn: Callable[[Tensor], Tensor], sample: Tensor, dtype: torch.dtype = F64) -> AffinePiece:
    """``(J, θ)`` of ``fn`` at one sample ``sample`` (shape ``[1, ...]``), returned in float64.

    ``dtype`` is the precision the forward and its Jacobian are evaluated in (float64 by default;
    float32 to follow a float32 forward's own decisions at kinks).
    """
    x = sample.detach().to(dtype)
    out = fn(x).to(F64)
    jac = jacrev(fn)(x).to(F64).reshape(out.numel(), x.numel())
    theta = out.reshape(-1) - jac @ x.to(F64).reshape(-1)
    return AffinePiece(jac, theta, tuple(x.shape), tuple(out.shape))


def oracle_inverse(
    fns: Callable[[int], Callable[[Tensor], Tensor]], input: Tensor, bpfm_out: Tensor, dtype: torch.dtype = F64
) -> Tensor:
    """``B_u = pinv(J_b)(B_w,b − θ_b)`` per sample ``b``; ``fns(b)`` is sample ``b``'s forward map."""
    out = []
    for b in range(input.shape[0]):
        piece = affine_piece_of(fns(b), input[b : b + 1], dtype)
        rhs = bpfm_out[b].reshape(-1).to(F64) - piece.theta
        out.append((piece.pinv @ rhs).reshape(input.shape[1:]))
    return torch.stack(out)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Largest per-sample ``||actual − expected|| / max(||expected||, 1e-6)``.

    The floor makes the check absolute (at ``tol · 1e-6``) for samples whose expected value is 0.
    """
    a = actual.detach().to(F64).reshape(actual.shape[0], -1)
    e = expected.detach().to(F64).reshape(expected.shape[0], -1)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    num = (a - e).norm(dim=1)
    den = e.norm(dim=1).clamp_min(1e-6)
    return float((num / den).max()) if num.numel() else 0.0


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str = "") -> None:
    """Per-sample relative agreement; exact zeros must come out as (near) zeros."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# ---------------------------------------------------------------------------------------------
# Samples: a recorded forward input plus the canonical kwargs of the op (what a rule receives).

SEEDS = st.integers(0, 2**31 - 1)


@dataclass(frozen=True)
class Sample:
    """One rule call's forward point: ``input`` (a_u, ``[B, ...]``) and the canonical kwargs."""

    input: Tensor
    kwargs: dict
    seed: int

    def __repr__(self) -> str:  # hypothesis prints this on failure: keep tensors out of it
        kw = {k: (f"Tensor{tuple(v.shape)}" if isinstance(v, Tensor) else v) for k, v in self.kwargs.items()}
        return f"Sample(input={tuple(self.input.shape)}, seed={self.seed}, kwargs={kw})"


def spell_pair(draw, pair: tuple[int, int]):
    """Spell a 2-D hyper-parameter as an int when both entries agree (half the time), else a tuple."""
    return pair[0] if pair[0] == pair[1] and draw(st.booleans()) else tuple(pair)


@st.composite
def conv2d_samples(draw, kind: str = "any", max_batch: int = 3) -> Sample:
    """``torch.conv2d`` forward points with canonical kwargs.

    ``kind``: ``"any"``; ``"injective"`` (stride 1, 'same' or full padding, at least as many output
    as input channels per group: q ≥ p, full column rank for random weights); ``"underdetermined"``
    (stride ≥ 2 along H and no more output than input channels per group: usually q < p).
    """
    groups = draw(st.integers(1, 3))
    cin_g = draw(st.integers(1, 2))
    if kind == "injective":
        cout_g = draw(st.integers(cin_g, 3))
    elif kind == "underdetermined":
        cout_g = draw(st.integers(1, cin_g))
    else:
        cout_g = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if kind == "injective":
        stride = (1, 1)
        padding = draw(st.sampled_from(["same", "full"]))
        if padding == "full":
            padding = tuple(d * (k - 1) for d, k in zip(dilation, kernel))
    elif kind == "underdetermined":
        stride = (draw(st.integers(2, 3)), draw(st.integers(1, 3)))
        padding = draw(st.one_of(st.integers(0, 1), st.tuples(st.integers(0, 1), st.integers(0, 1)), st.just("valid")))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = draw(
            st.one_of(
                st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["valid", "same"])
            )
        )
        if padding == "same":  # PyTorch allows padding='same' only with stride 1
            stride = (1, 1)
    if isinstance(padding, str):
        pads = (0, 0)
    else:
        pads = (padding, padding) if isinstance(padding, int) else padding
        padding = spell_pair(draw, pads)
    size = []
    for d, k, p in zip(dilation, kernel, pads):
        size.append(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 2)))
    batch = draw(st.integers(1, max_batch))
    seed = draw(SEEDS)
    cin, cout = cin_g * groups, cout_g * groups
    x = rand((batch, cin, *size), seed)
    weight = rand((cout, cin_g, *kernel), seed + 1) / (cin_g * kernel[0] * kernel[1]) ** 0.5
    bias = rand((cout,), seed + 2) if draw(st.booleans()) else None
    kwargs = dict(
        weight=weight,
        bias=bias,
        stride=spell_pair(draw, stride),
        padding=padding,
        dilation=spell_pair(draw, dilation),
        groups=groups,
    )
    return Sample(x, kwargs, seed)

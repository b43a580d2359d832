"""The inverse-rule table, checked op by op against the spec's generic definition (§2, §3).

One spec table lists every registered rule with a generator of forward points (input and
canonical kwargs); parametrize + hypothesis expand it over shapes and hyper-parameters. The
oracle (``_oracle.py``) is written independently of ``naflow_fx``: float64 ``jacrev`` Jacobian per
sample, ``θ = g(a) − J a``, ``B_u = pinv(J)(B_w − θ)``.

- I4: every rule equals that oracle for a random ``B_w`` with ``damping=0``.
- I2/I3: on consistent right-hand sides ``B_w = J z + θ`` the rule solves the system
  (``J B_u + θ = B_w``), returns the row-space (minimum-norm) solution ``pinv(J) J z``, and
  reconstructs its own input (``rule(g(a)) = a``) whenever ``J`` has full column rank.
- I5: a batch gives the per-sample results.
- Dedicated checks: conv/linear left and right inverses with the dense and the iterative solver,
  max-pool selection round trips and max-unpool, closed forms of the spec's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from _oracle import (
    SEEDS,
    SETTINGS,
    Sample,
    affine_piece_of,
    assert_rel_close,
    conv2d_samples,
    one_torch_thread,
    oracle_inverse,
    rand,
    rel_err,
    spell_pair,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

import naflow_fx.rules.linear as linear_rules
import naflow_fx.solvers.context as solver_context
from naflow_fx.canonical import CANONICAL_SIGNATURES
from naflow_fx.rules import INVERSE_RULES, abandon, get_inverse_rule, register_inverse
from naflow_fx.rules.generic import affine_piece, linearized_inverse, region_inverse
from naflow_fx.solvers import SolverConfig, SolverContext
from naflow_fx.solvers.dense import svd_solve
from naflow_fx.solvers.iterative import cgls

F64 = torch.float64

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    # the oracle's vmapped jacrev of the nearest-exact upsampling backward, which functorch loops over
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented:UserWarning"),
]

# Tolerances (float64 throughout): dense rules vs the pinv oracle, and CGLS run to a tight tolerance.
TOL = 1e-8
ITER_TOL = 1e-6
COND_MAX = 1e2  # the iterative checks skip operators worse conditioned than this (CGLS would need ~cond steps)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def exact_ctx(solver: str = "dense", **kw) -> SolverContext:
    """A context solving the exact (undamped) min-norm problem."""
    return SolverContext(SolverConfig(solver=solver, damping=0.0, **kw))


# ---------------------------------------------------------------------------------------------
# Forward-point generators, one per op family.


@st.composite
def feature_maps(draw, kinks: tuple[float, ...] = (), ndims=(2, 3, 4), scale: float = 2.5) -> tuple[Tensor, int]:
    """A random ``[B, C, ...]`` map in [−6, 6]; with ``kinks``, a third of it sits exactly on them."""
    ndim = draw(st.sampled_from(ndims))
    shape = (draw(st.integers(1, 3)), *(draw(st.integers(1, 4)) for _ in range(ndim - 1)))
    seed = draw(SEEDS)
    x = rand(shape, seed, scale).clamp(-6.0, 6.0)
    if kinks and draw(st.booleans()):
        gen = torch.Generator().manual_seed(seed + 7)
        idx = torch.randperm(x.numel(), generator=gen)[: max(1, x.numel() // 3)]
        x.view(-1)[idx] = torch.tensor(kinks, dtype=F64)[torch.arange(len(idx)) % len(kinks)]
    return x, seed


def unary(kinks: tuple[float, ...] = ()):
    return feature_maps(kinks).map(lambda xs: Sample(xs[0], {}, xs[1]))


@st.composite
def hardtanh_samples(draw) -> Sample:
    bounds = draw(
        st.one_of(
            st.sampled_from([(-1.0, 1.0), (0.0, 6.0), (0.0, math.inf), (-math.inf, 0.5), (-math.inf, math.inf)]),
            st.tuples(st.floats(-3, 0), st.floats(0.1, 3)),
        )
    )
    kinks = tuple(b for b in bounds if math.isfinite(b))
    x, seed = draw(feature_maps(kinks))
    return Sample(x, dict(min_val=bounds[0], max_val=bounds[1]), seed)


@st.composite
def leaky_relu_samples(draw) -> Sample:
    # |slope| ≥ 1e-3 or exactly 0: the rule divides by any non-zero slope (docs/naflow.md, decision 11)
    # while pinv cuts singular values below max(q, p)·eps·σ_max, so denormal slopes are out of scope
    magnitude = st.floats(1e-3, 2)
    slope = draw(st.one_of(st.sampled_from([0.0, 0.01, 0.2, 1.0]), magnitude, magnitude.map(lambda m: -m)))
    x, seed = draw(feature_maps((0.0,)))
    return Sample(x, dict(negative_slope=slope), seed)


@st.composite
def prelu_samples(draw) -> Sample:
    x, seed = draw(feature_maps((0.0,)))
    n = draw(st.sampled_from([1, x.shape[1]]))
    weight = rand((n,), seed + 1) * 0.5
    if draw(st.booleans()):
        weight[0] = 0.0
    return Sample(x, dict(weight=weight), seed)


@st.composite
def elu_samples(draw) -> Sample:
    alpha = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 2)))
    x, seed = draw(feature_maps((0.0,)))
    return Sample(x, dict(alpha=alpha), seed)


@st.composite
def celu_samples(draw) -> Sample:
    # CELU's slope below 0 is exp(a/α): α ≥ 0.5 keeps it above pinv's cut-off on a ≥ −6 (as for ELU)
    alpha = draw(st.one_of(st.sampled_from([1.0]), st.floats(0.5, 2)))
    x, seed = draw(feature_maps((0.0,)))
    return Sample(x, dict(alpha=alpha), seed)


@st.composite
def shrink_samples(draw) -> Sample:
    lambd = draw(st.one_of(st.sampled_from([0.0, 0.5]), st.floats(0.0, 1.5)))
    x, seed = draw(feature_maps((lambd, -lambd)))
    return Sample(x, dict(lambd=lambd), seed)


@st.composite
def threshold_samples(draw) -> Sample:
    threshold, value = draw(st.floats(-2, 2)), draw(st.floats(-3, 3))
    x, seed = draw(feature_maps((threshold,)))
    return Sample(x, dict(threshold=threshold, value=value), seed)


@st.composite
def binary_samples(draw) -> Sample:
    """``torch.maximum`` / ``minimum`` of a map and a constant: a learnt per-channel τ (FRN's TLU) or a scalar."""
    x, seed = draw(feature_maps(ndims=(3, 4)))
    shape = draw(st.sampled_from([(1, x.shape[1], *([1] * (x.dim() - 2))), ()]))
    return Sample(x, dict(other=rand(shape, seed + 5)), seed)


@st.composite
def glu_samples(draw) -> Sample:
    x, seed = draw(feature_maps())
    dim = draw(st.sampled_from([*range(1, x.dim()), *range(-x.dim() + 1, 0)]))  # not the batch dim
    x = torch.cat([x, rand(x.shape, seed + 3)], dim=dim)  # an even size along dim
    return Sample(x, dict(dim=dim), seed)


@st.composite
def softmax_samples(draw) -> Sample:
    """Logits of moderate size. The Jacobian ``diag(p) − ppᵀ`` has an exact null space (a shift along
    ``dim``), which float64 holds only to rounding; with a probability near 0 that rounding is above
    pinv's cut-off, and the undamped oracle (and rule) would invert it."""
    x, seed = draw(feature_maps(scale=0.5))
    dim = draw(st.sampled_from([*range(1, x.dim()), *range(-x.dim() + 1, 0)]))  # not the batch dim
    return Sample(x, dict(dim=dim, dtype=None), seed)


@st.composite
def lp_pool2d_samples(draw) -> Sample:
    """Positive maps (LPPool follows a ReLU in practice; odd powers of negatives have no real root)."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    seed = draw(SEEDS)
    size = tuple(k + draw(st.integers(0, 3)) for k in kernel)
    x = rand((draw(st.integers(1, 3)), draw(st.integers(1, 3)), *size), seed).abs() + 0.1
    kwargs = dict(
        norm_type=draw(st.sampled_from([1.0, 2.0, 3.0])),
        kernel_size=spell_pair(draw, kernel),
        stride=None if stride is None else spell_pair(draw, stride),
        ceil_mode=False,
    )
    return Sample(x, kwargs, seed)


@st.composite
def gelu_samples(draw) -> Sample:
    x, seed = draw(feature_maps((0.0,)))
    return Sample(x, dict(approximate=draw(st.sampled_from(["none", "tanh"]))), seed)


@st.composite
def softplus_samples(draw) -> Sample:
    beta = draw(st.floats(0.5, 3))
    threshold = draw(st.floats(0.5, 20))
    x, seed = draw(feature_maps((threshold / beta, 0.0)))
    return Sample(x, dict(beta=beta, threshold=threshold), seed)


@st.composite
def batch_norm_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(2, 4)))
    c = x.shape[1]
    weight = None
    if draw(st.booleans()):
        weight = rand((c,), seed + 1)
        if draw(st.booleans()):
            weight[draw(st.integers(0, c - 1))] = 0.0  # γ = 0: the channel carries nothing
    bias = rand((c,), seed + 2) if draw(st.booleans()) else None
    kwargs = dict(
        running_mean=rand((c,), seed + 3),
        running_var=rand((c,), seed + 4).square() + 0.1,
        weight=weight,
        bias=bias,
        training=False,
        momentum=0.1,
        eps=draw(st.sampled_from([1e-5, 1e-3])),
    )
    return Sample(x, kwargs, seed)


@st.composite
def layer_norm_samples(draw) -> Sample:
    """Channels-last LayerNorm over the last one or two dims (with ≥ 3 normalised elements)."""
    x, seed = draw(feature_maps(ndims=(3, 4)))
    dims = draw(st.sampled_from([1, 2]))
    # ≥ 3 elements per normalised row: J has rank n − 2 (the row mean and x̂ are its null space)
    x = torch.cat([x, rand(x.shape, seed + 5), rand(x.shape, seed + 6)], dim=-1)
    shape = tuple(x.shape[-dims:])
    weight = rand(shape, seed + 1) if draw(st.booleans()) else None
    bias = rand(shape, seed + 2) if draw(st.booleans()) else None
    return Sample(x, dict(normalized_shape=shape, weight=weight, bias=bias, eps=1e-5), seed)


@st.composite
def group_norm_samples(draw) -> Sample:
    """``[B, C, H, W]`` with C = groups · channels per group, at least 4 elements per group."""
    groups, per_group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    shape = (draw(st.integers(1, 2)), groups * per_group, draw(st.integers(2, 3)), draw(st.integers(2, 3)))
    seed = draw(SEEDS)
    c = shape[1]
    weight = rand((c,), seed + 1) if draw(st.booleans()) else None
    bias = rand((c,), seed + 2) if draw(st.booleans()) else None
    return Sample(rand(shape, seed), dict(num_groups=groups, weight=weight, bias=bias, eps=1e-5), seed)


@st.composite
def instance_norm_samples(draw) -> Sample:
    """``[B, C, H, W]`` normalised with each sample's own statistics (at least 4 pixels per channel)."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 3)), draw(st.integers(2, 3)))
    seed = draw(SEEDS)
    c = shape[1]
    weight = rand((c,), seed + 1) if draw(st.booleans()) else None
    bias = rand((c,), seed + 2) if draw(st.booleans()) else None
    kwargs = dict(
        running_mean=None, running_var=None, weight=weight, bias=bias, use_input_stats=True, momentum=0.1, eps=1e-5
    )
    return Sample(rand(shape, seed), kwargs, seed)


@st.composite
def local_response_norm_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(4,)))
    size = draw(st.integers(1, x.shape[1] + 1))
    kwargs = dict(
        size=size, alpha=draw(st.floats(1e-4, 1.0)), beta=draw(st.floats(0.5, 1.0)), k=draw(st.floats(0.5, 2))
    )
    return Sample(x, kwargs, seed)


@st.composite
def linear_samples(draw, kind: str = "any") -> Sample:
    """``F.linear`` forward points; ``kind`` ``"tall"`` (out ≥ in) or ``"wide"`` (out < in) or ``"any"``."""
    n_in = draw(st.integers(1 if kind != "wide" else 2, 8))
    n_out = {
        "any": st.integers(1, 8),
        "tall": st.integers(n_in, n_in + 4),
        "wide": st.integers(1, n_in - 1 if n_in > 1 else 1),
    }[kind]
    n_out = draw(n_out)
    lead = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    seed = draw(SEEDS)
    x = rand((draw(st.integers(1, 3)), *lead, n_in), seed)
    weight = rand((n_out, n_in), seed + 1) / n_in**0.5
    bias = rand((n_out,), seed + 2) if draw(st.booleans()) else None
    return Sample(x, dict(weight=weight, bias=bias), seed)


def _pool_size(draw, kernel, padding, dilation=(1, 1)) -> list[int]:
    return [max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 3)) for k, p, d in zip(kernel, padding, dilation)]


@st.composite
def max_pool2d_samples(draw, overlapping: bool | None = None) -> Sample:
    """``F.max_pool2d`` points; ``overlapping=False`` forces stride ≥ dilated kernel (distinct windows)."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    if overlapping is False:
        dilation = (1, 1)
        stride = tuple(k + draw(st.integers(0, 1)) for k in kernel)
    else:
        stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    size = _pool_size(draw, kernel, padding, dilation)
    seed = draw(SEEDS)
    x = rand((draw(st.integers(1, 3)), draw(st.integers(1, 3)), *size), seed)
    if draw(st.booleans()):  # ties: integer values after a ReLU, as in real feature maps
        x = x.mul(1.5).round().clamp_min(0.0)
    kwargs = dict(
        kernel_size=spell_pair(draw, kernel),
        stride=None if stride is None else spell_pair(draw, stride),
        padding=spell_pair(draw, padding),
        dilation=spell_pair(draw, dilation),
        ceil_mode=draw(st.booleans()),
    )
    # PyTorch accepts dilated windows that read only padding; they output −inf and an index outside
    # the plane, which no finite network produces: leave them out
    assume(bool(torch.isfinite(F.max_pool2d(x, **kwargs)).all()))
    return Sample(x, kwargs, seed)


@st.composite
def avg_pool2d_samples(draw) -> Sample:
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    size = _pool_size(draw, kernel, padding)
    seed = draw(SEEDS)
    x = rand((draw(st.integers(1, 3)), draw(st.integers(1, 3)), *size), seed)
    kwargs = dict(
        kernel_size=spell_pair(draw, kernel),
        stride=None if stride is None else spell_pair(draw, stride),
        padding=spell_pair(draw, padding),
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.one_of(st.none(), st.integers(1, 5))),
    )
    return Sample(x, kwargs, seed)


@st.composite
def adaptive_samples(draw) -> Sample:
    seed = draw(SEEDS)
    x = rand((draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))), seed)
    side = st.integers(1, 4)
    output_size = draw(st.one_of(side, st.tuples(side, side), st.tuples(st.none() | side, st.none() | side)))
    return Sample(x, dict(output_size=output_size), seed)


@st.composite
def flatten_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(2, 3, 4)))
    n = x.dim()
    start = draw(st.integers(1, n - 1))
    end = draw(st.integers(start, n - 1))
    start = start - n if draw(st.booleans()) else start
    end = end - n if draw(st.booleans()) else end
    return Sample(x, dict(start_dim=start, end_dim=end), seed)


@st.composite
def reshape_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(4,)))
    b, c, h, w = x.shape
    rest = draw(st.sampled_from([(-1,), (c * h * w,), (c, h * w), (c * h, w), (w, h, c), (h * w, -1), (c, h, w, 1)]))
    lead = b if -1 in rest else draw(st.sampled_from([b, -1]))
    return Sample(x, dict(shape=(lead, *rest)), seed)


@st.composite
def permute_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(2, 3, 4)))
    n = x.dim()
    perm = draw(st.permutations(list(range(1, n))))
    dims = [0, *(d - n if draw(st.booleans()) else d for d in perm)]
    return Sample(x, dict(dims=dims), seed)


@st.composite
def transpose_samples(draw) -> Sample:
    x, seed = draw(feature_maps(ndims=(2, 3, 4)))
    n = x.dim()
    d0, d1 = draw(st.integers(1, n - 1)), draw(st.integers(1, n - 1))
    d0 = d0 - n if draw(st.booleans()) else d0
    return Sample(x, dict(dim0=d0, dim1=d1), seed)


@st.composite
def pad_samples(draw) -> Sample:
    """``F.pad`` in every mode; constant pads may be negative (crops) and pad up to 3 dims."""
    mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
    if mode == "constant":
        ndim = draw(st.integers(2, 4))
        k = draw(st.integers(1, min(3, ndim - 1)))
    else:  # the layouts PyTorch accepts: (N, C, W) + 1 dim, (N, C, H, W) + 2, (C, D, H, W) + 3
        ndim, k = draw(st.sampled_from([(3, 1), (4, 2), (4, 3)]))
    seed = draw(SEEDS)
    shape = (draw(st.integers(1, 3)), *(draw(st.integers(1, 4)) for _ in range(ndim - 1)))
    x = rand(shape, seed)
    pad = []
    for size in reversed(shape[-k:]):  # F.pad lists the last dim first
        hi = {"constant": 2, "reflect": size - 1, "replicate": 2, "circular": size}[mode]
        lo = -(size - 1) // 2 if mode == "constant" else 0
        left, right = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
        if left + right < -(size - 1):
            right = -(size - 1) - left
        pad += [left, right]
    value = draw(st.one_of(st.none(), st.floats(-2, 2))) if mode == "constant" else None
    return Sample(x, dict(pad=tuple(pad), mode=mode, value=value), seed)


@st.composite
def interpolate_samples(draw) -> Sample:
    """``F.interpolate`` over 1, 2 or 3 spatial dims, in every mode that dimension has."""
    spatial = draw(st.integers(1, 3))
    modes = ["nearest", "nearest-exact", "area", {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]]
    mode = draw(st.sampled_from(modes + (["bicubic"] if spatial == 2 else [])))
    seed = draw(SEEDS)
    plane = tuple(draw(st.integers(1, 4)) for _ in range(spatial))
    x = rand((draw(st.integers(1, 3)), draw(st.integers(1, 2)), *plane), seed)
    size = scale = recompute = None
    if draw(st.booleans()):
        size = tuple(draw(st.integers(1, 6)) for _ in range(spatial))
        size = size[0] if spatial == 1 or draw(st.booleans()) and len(set(size)) == 1 else size
    else:
        scale = draw(st.sampled_from([0.5, 1.5, 2.0, 3.0]))
        assume(all(int(n * scale) >= 1 for n in plane))
        recompute = draw(st.sampled_from([None, True]))
    linear = mode in ("linear", "bilinear", "bicubic", "trilinear")
    antialias = draw(st.booleans()) if mode in ("bilinear", "bicubic") else False
    if antialias:  # torch 2.14's antialiased forward is wrong when exactly one output side is 1
        out = F.interpolate(x, size, scale, mode, False, recompute, antialias).shape[2:]
        assume(min(out) > 1 or max(out) == 1)
    kwargs = dict(
        size=size,
        scale_factor=scale,
        mode=mode,
        align_corners=draw(st.booleans()) if linear else None,
        recompute_scale_factor=recompute,
        antialias=antialias,
    )
    return Sample(x, kwargs, seed)


@st.composite
def conv_transpose2d_samples(draw) -> Sample:
    groups = draw(st.integers(1, 2))
    cin_g, cout_g = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, d * (k - 1) // 2)) for d, k in zip(dilation, kernel))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    seed = draw(SEEDS)
    x = rand((draw(st.integers(1, 3)), cin_g * groups, draw(st.integers(1, 4)), draw(st.integers(1, 4))), seed)
    weight = rand((cin_g * groups, cout_g, *kernel), seed + 1) / (cin_g * kernel[0] * kernel[1]) ** 0.5
    kwargs = dict(
        weight=weight,
        bias=rand((cout_g * groups,), seed + 2) if draw(st.booleans()) else None,
        stride=spell_pair(draw, stride),
        padding=spell_pair(draw, padding),
        output_padding=spell_pair(draw, output_padding),
        groups=groups,
        dilation=spell_pair(draw, dilation),
    )
    return Sample(x, kwargs, seed)


@st.composite
def shuffle_samples(draw, op: str) -> Sample:
    """``pixel_shuffle`` / ``pixel_unshuffle`` / ``channel_shuffle`` inputs with a valid factor."""
    seed = draw(SEEDS)
    factor = draw(st.integers(1, 3))
    batch, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if op == "pixel_shuffle":
        return Sample(rand((batch, c * factor**2, h, w), seed), dict(upscale_factor=factor), seed)
    if op == "pixel_unshuffle":
        return Sample(rand((batch, c, h * factor, w * factor), seed), dict(downscale_factor=factor), seed)
    extra = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2))))
    return Sample(rand((batch, c * factor, *extra), seed), dict(groups=factor), seed)


# ---------------------------------------------------------------------------------------------
# The spec table.


def _same(kwargs: dict, b: int) -> dict:
    return kwargs


def _reshape_one(kwargs: dict, b: int) -> dict:
    lead, *rest = kwargs["shape"]
    return {**kwargs, "shape": (lead if lead == -1 else 1, *rest)}


@dataclass(frozen=True)
class OpSpec:
    """A registered op, a generator of its forward points, and its forward on one sample."""

    name: str
    op: Callable
    samples: st.SearchStrategy
    per_sample: Callable[[dict, int], dict] = field(default=_same)  # kwargs of the forward on sample b alone

    def sample_fn(self, kwargs: dict) -> Callable[[int], Callable[[Tensor], Tensor]]:
        return lambda b: lambda x: self.op(x, **self.per_sample(kwargs, b))

    def forward(self, sample: Sample) -> Tensor:
        return self.op(sample.input, **sample.kwargs)


SPECS = [
    OpSpec("conv2d", torch.conv2d, conv2d_samples()),
    OpSpec("conv_transpose2d", torch.conv_transpose2d, conv_transpose2d_samples()),
    OpSpec("linear", F.linear, linear_samples()),
    OpSpec("batch_norm", F.batch_norm, batch_norm_samples()),
    OpSpec("layer_norm", F.layer_norm, layer_norm_samples()),
    OpSpec("group_norm", F.group_norm, group_norm_samples()),
    OpSpec("instance_norm", F.instance_norm, instance_norm_samples()),
    OpSpec("local_response_norm", F.local_response_norm, local_response_norm_samples()),
    OpSpec("relu", torch.relu, unary((0.0,))),
    OpSpec("hardtanh", F.hardtanh, hardtanh_samples()),
    OpSpec("leaky_relu", F.leaky_relu, leaky_relu_samples()),
    OpSpec("prelu", F.prelu, prelu_samples()),
    OpSpec("elu", F.elu, elu_samples()),
    OpSpec("sigmoid", torch.sigmoid, unary((0.0,))),
    OpSpec("tanh", torch.tanh, unary((0.0,))),
    OpSpec("silu", F.silu, unary((0.0,))),
    OpSpec("gelu", F.gelu, gelu_samples()),
    OpSpec("hardswish", F.hardswish, unary((-3.0, 3.0, 0.0))),
    OpSpec("hardsigmoid", F.hardsigmoid, unary((-3.0, 3.0))),
    OpSpec("mish", F.mish, unary((0.0,))),
    OpSpec("softplus", F.softplus, softplus_samples()),
    OpSpec("selu", F.selu, unary((0.0,))),
    OpSpec("celu", F.celu, celu_samples()),
    OpSpec("logsigmoid", F.logsigmoid, unary((0.0,))),
    OpSpec("softsign", F.softsign, unary((0.0,))),
    OpSpec("tanhshrink", F.tanhshrink, unary((0.0,))),
    OpSpec("hardshrink", F.hardshrink, shrink_samples()),
    OpSpec("softshrink", F.softshrink, shrink_samples()),
    OpSpec("threshold", F.threshold, threshold_samples()),
    OpSpec("maximum", torch.maximum, binary_samples()),
    OpSpec("minimum", torch.minimum, binary_samples()),
    OpSpec("glu", F.glu, glu_samples()),
    OpSpec("softmax", F.softmax, softmax_samples()),
    OpSpec("log_softmax", F.log_softmax, softmax_samples()),
    OpSpec("lp_pool2d", F.lp_pool2d, lp_pool2d_samples()),
    OpSpec("max_pool2d", F.max_pool2d, max_pool2d_samples()),
    OpSpec("avg_pool2d", F.avg_pool2d, avg_pool2d_samples()),
    OpSpec("adaptive_avg_pool2d", F.adaptive_avg_pool2d, adaptive_samples()),
    OpSpec("adaptive_max_pool2d", F.adaptive_max_pool2d, adaptive_samples()),
    OpSpec("flatten", torch.flatten, flatten_samples()),
    OpSpec("reshape", torch.reshape, reshape_samples(), per_sample=_reshape_one),
    OpSpec("permute", torch.permute, permute_samples()),
    OpSpec("transpose", torch.transpose, transpose_samples()),
    OpSpec("pad", F.pad, pad_samples()),
    OpSpec("interpolate", F.interpolate, interpolate_samples()),
    OpSpec("pixel_shuffle", torch.pixel_shuffle, shuffle_samples("pixel_shuffle")),
    OpSpec("pixel_unshuffle", torch.pixel_unshuffle, shuffle_samples("pixel_unshuffle")),
    OpSpec("channel_shuffle", torch.channel_shuffle, shuffle_samples("channel_shuffle")),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}
parametrize_specs = pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
# solved through their Jacobian at the forward point, damped (decisions 16 and 36)
LINEARIZED = (
    "layer_norm",
    "group_norm",
    "instance_norm",
    "local_response_norm",
    "glu",
    "softmax",
    "log_softmax",
    "lp_pool2d",
)
SMOOTH = (
    "elu",
    "sigmoid",
    "tanh",
    "silu",
    "gelu",
    "hardswish",
    "mish",
    "softplus",
    "selu",
    "celu",
    "logsigmoid",
    "softsign",
    "tanhshrink",
)  # damped (decision 11)


def call_rule(spec: OpSpec, ctx: SolverContext, bpfm_out: Tensor, sample: Sample, layer: str = "layer") -> Tensor:
    rule = get_inverse_rule(spec.op)
    assert rule is not None, f"no inverse rule registered for {spec.name}"
    return rule(ctx, bpfm_out, sample.input, layer=layer, **sample.kwargs)


def pieces(spec: OpSpec, sample: Sample):
    fns = spec.sample_fn(sample.kwargs)
    return [affine_piece_of(fns(b), sample.input[b : b + 1]) for b in range(sample.input.shape[0])]


def test_spec_table_covers_every_registered_rule_with_canonical_kwargs():
    assert {s.op for s in SPECS} == set(INVERSE_RULES), "the spec table and the rule table disagree"
    assert set(INVERSE_RULES) <= set(CANONICAL_SIGNATURES), "a rule is registered for a non-canonical op"


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_generators_produce_canonical_kwargs(spec: OpSpec, data):
    sample = data.draw(spec.samples)
    params = set(CANONICAL_SIGNATURES[spec.op].parameters) - {"input"}
    assert set(sample.kwargs) == params
    spec.forward(sample)  # a valid forward point


# ---------------------------------------------------------------------------------------------
# I4: rule == pinv oracle, for a random B_w.


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_equals_dense_pseudo_inverse(spec: OpSpec, data):
    sample = data.draw(spec.samples)
    out = spec.forward(sample)
    bpfm_out = rand(out.shape, data.draw(SEEDS), scale=2.0)
    ctx = exact_ctx()
    got = call_rule(spec, ctx, bpfm_out, sample, layer="the.layer")
    expected = oracle_inverse(spec.sample_fn(sample.kwargs), sample.input, bpfm_out)
    assert got.dtype == sample.input.dtype
    assert_rel_close(got, expected, TOL, spec.name)
    assert len(ctx.records) == 1 and ctx.records[0].layer == "the.layer"


# ---------------------------------------------------------------------------------------------
# I2 / I3: consistent systems, minimum norm, reconstruction of the forward input.


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_solves_consistent_systems_with_minimum_norm(spec: OpSpec, data):
    sample = data.draw(spec.samples)
    ps = pieces(spec, sample)
    z = rand(sample.input.shape, data.draw(SEEDS))
    bpfm_out = torch.stack([pc.apply(z[b]).reshape(pc.out_shape[1:]) for b, pc in enumerate(ps)])
    got = call_rule(spec, exact_ctx(), bpfm_out, sample)
    for b, pc in enumerate(ps):
        jz = pc.jac @ z[b].reshape(-1)
        jx = pc.jac @ got[b].reshape(-1)
        # I3 consistency: J B_u + θ = B_w (compare the part J acts on, i.e. J B_u against J z)
        assert rel_err(jx[None], jz[None]) <= TOL, f"{spec.name}: J B_u + θ != B_w"
        # I3 minimality: B_u is the row-space part of z, so B_u ⟂ null(J)
        row_part = pc.pinv @ jz
        assert rel_err(got[b].reshape(1, -1), row_part[None]) <= TOL, f"{spec.name}: not the min-norm solution"
        assert rel_err((pc.pinv @ jx)[None], got[b].reshape(1, -1)) <= TOL, f"{spec.name}: B_u not in row(J)"


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_reconstructs_its_input_on_the_row_space(spec: OpSpec, data):
    """``rule(g(a)) = pinv(J) J a``, which is ``a`` itself when ``J`` has full column rank (I2)."""
    sample = data.draw(spec.samples)
    got = call_rule(spec, exact_ctx(), spec.forward(sample), sample)
    for b, pc in enumerate(ps := pieces(spec, sample)):
        a = sample.input[b].reshape(-1)
        assert rel_err(got[b].reshape(1, -1), (pc.pinv @ (pc.jac @ a))[None]) <= TOL, spec.name
    if all(pc.rank == pc.jac.shape[1] for pc in ps):
        assert_rel_close(got, sample.input, TOL, f"{spec.name}: injective stage must reconstruct a_u")


@pytest.mark.parametrize(
    "name", ["flatten", "reshape", "permute", "transpose", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle"]
)
@SETTINGS
@given(data=st.data())
def test_structural_rules_are_exact_inverses(name: str, data):
    spec = SPEC_BY_NAME[name]
    sample = data.draw(spec.samples)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    got = call_rule(spec, exact_ctx(), bpfm_out, sample)
    assert torch.equal(spec.op(got, **sample.kwargs), bpfm_out), "g(rule(y)) must be y exactly"
    assert torch.equal(call_rule(spec, exact_ctx(), spec.forward(sample), sample), sample.input)


# ---------------------------------------------------------------------------------------------
# Solved rules (conv, linear): left inverse when q ≥ p, right inverse and min norm when q < p,
# with the dense and the iterative solver.

SOLVED = {
    "conv2d_injective": (torch.conv2d, conv2d_samples("injective")),
    "conv2d_underdetermined": (torch.conv2d, conv2d_samples("underdetermined")),
    "linear_tall": (F.linear, linear_samples("tall")),
    "linear_wide": (F.linear, linear_samples("wide")),
}


def _pointwise(spec: OpSpec, sample: Sample) -> bool:
    """A 1×1 convolution without padding: solved in closed form (NOTE [1×1 convolutions])."""
    if spec.op is not torch.conv2d:
        return False
    pad = sample.kwargs["padding"]
    return sample.kwargs["weight"].shape[-2:] == (1, 1) and (isinstance(pad, str) or pad in (0, (0, 0)))


def _solver_ctx(solver: str) -> SolverContext:
    if solver == "dense":
        return exact_ctx("dense")
    return exact_ctx("iterative", tol=1e-12, max_iter=5000)


@pytest.mark.parametrize("solver", ["dense", "iterative"])
@pytest.mark.parametrize("case", list(SOLVED))
@SETTINGS
@given(data=st.data())
def test_solved_rules_left_and_right_inverse(case: str, solver: str, data):
    op, strategy = SOLVED[case]
    spec = OpSpec(case, op, strategy)
    sample = data.draw(strategy)
    ps = pieces(spec, sample)
    q, p = ps[0].jac.shape
    sv = torch.linalg.svdvals(ps[0].jac)
    tall = case in ("conv2d_injective", "linear_tall")
    if tall:
        assume(q >= p and ps[0].rank == p)
    else:
        assume(q < p and ps[0].rank == q)  # full row rank: every B_w is consistent
    if solver == "iterative":
        assume(float(sv[0] / sv[-1]) < COND_MAX)  # CGLS converges in reasonable time
    tol = TOL if solver == "dense" else ITER_TOL
    ctx = _solver_ctx(solver)
    if tall:  # left inverse: rule(g(a)) = a
        got = call_rule(spec, ctx, spec.forward(sample), sample)
        assert_rel_close(got, sample.input, tol, f"{case}/{solver}: left inverse")
    else:  # right inverse: g(rule(y)) = y for any y, and the solution is pinv(J)(y − θ)
        y = rand(spec.forward(sample).shape, data.draw(SEEDS))
        got = call_rule(spec, ctx, y, sample)
        assert_rel_close(spec.op(got, **sample.kwargs), y, tol, f"{case}/{solver}: right inverse")
        expected = oracle_inverse(spec.sample_fn(sample.kwargs), sample.input, y)
        assert_rel_close(got, expected, tol, f"{case}/{solver}: minimum norm")
    rec = ctx.records[-1]
    assert rec.method == ("closed form" if _pointwise(spec, sample) else "dense" if solver == "dense" else "cgls")
    assert rec.residual <= tol and rec.converged


@pytest.mark.parametrize("solver", ["dense", "iterative"])
@pytest.mark.parametrize("case", ["conv2d", "conv2d_underdetermined", "linear"])
@SETTINGS
@given(data=st.data())
def test_solved_rules_residual_on_consistent_systems(case: str, solver: str, data):
    """I3 for conv (including strided q < p) and linear: ``J B_u + θ ≈ B_w`` when ``B_w = J z + θ``."""
    op = torch.conv2d if case.startswith("conv2d") else F.linear
    strategy = conv2d_samples("underdetermined") if case == "conv2d_underdetermined" else SPEC_BY_NAME[case].samples
    spec = OpSpec(case, op, strategy)
    sample = data.draw(strategy)
    ps = pieces(spec, sample)
    if solver == "iterative":
        sv = torch.linalg.svdvals(ps[0].jac)
        assume(float(sv[0] / sv[ps[0].rank - 1]) < COND_MAX)
    z = rand(sample.input.shape, data.draw(SEEDS))
    bpfm_out = spec.op(z, **sample.kwargs)
    ctx = _solver_ctx(solver)
    got = call_rule(spec, ctx, bpfm_out, sample)
    tol = TOL if solver == "dense" else ITER_TOL
    assert_rel_close(spec.op(got, **sample.kwargs), bpfm_out, tol, f"{case}/{solver}: J B_u + θ != B_w")
    assert ctx.records[-1].residual <= tol
    # minimum norm: B_u = pinv(J) J z, the component of z that J sees
    expected = torch.stack([(pc.pinv @ (pc.jac @ z[b].reshape(-1))).reshape(z.shape[1:]) for b, pc in enumerate(ps)])
    assert_rel_close(got, expected, tol, f"{case}/{solver}: B_u not ⟂ null(J)")


@pytest.mark.parametrize("case", ["conv2d_injective", "conv2d_underdetermined"])
@SETTINGS
@given(data=st.data())
def test_conv_iterative_equals_dense_oracle_for_random_rhs(case: str, data):
    """Iterative CGLS with damping 0 and a tight tolerance reaches pinv(J)(B_w − b), even when inconsistent."""
    spec = OpSpec(case, torch.conv2d, SOLVED[case][1])
    sample = data.draw(spec.samples)
    ps = pieces(spec, sample)
    sv = torch.linalg.svdvals(ps[0].jac)
    assume(float(sv[0] / sv[ps[0].rank - 1]) < COND_MAX)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    got = call_rule(spec, _solver_ctx("iterative"), bpfm_out, sample)
    expected = oracle_inverse(spec.sample_fn(sample.kwargs), sample.input, bpfm_out)
    assert_rel_close(got, expected, ITER_TOL, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("cin", "cout", "groups", "stride", "padding", "damping"),
    [
        (6, 4, 1, 1, 0, 1e-2),  # wide: minimum norm
        (3, 7, 1, 2, "valid", 1e-2),  # tall and strided: the unread pixels get 0
        (6, 6, 3, (2, 3), (0, 0), 1e-1),  # grouped: a block-diagonal channel matrix
        (4, 4, 1, 1, "same", 0.0),  # undamped: the pseudo-inverse
    ],
)
def test_pointwise_conv_is_solved_exactly_in_closed_form(cin, cout, groups, stride, padding, damping, dtype):
    """NOTE [1×1 convolutions]: the per-pixel filter is the damped solution of the whole J, with λ exact."""
    w = rand((cout, cin // groups, 1, 1), 1, dtype=dtype)
    bias = rand((cout,), 2, dtype=dtype)
    x = rand((2, cin, 7, 8), 3, dtype=dtype)

    def conv(t: Tensor) -> Tensor:
        return torch.conv2d(t, w.to(t.dtype), None, stride, padding, 1, groups)

    y = rand(conv(x).shape, 4, dtype=dtype)
    ctx = SolverContext(SolverConfig(solver="iterative", damping=damping))
    kwargs = dict(weight=w, bias=bias, stride=stride, padding=padding, dilation=2, groups=groups)
    rule = get_inverse_rule(torch.conv2d)
    got = rule(ctx, y, x, layer="conv", **kwargs)
    jac = torch.func.jacrev(conv)(x[:1].to(F64)).reshape(y[0].numel(), x[0].numel())
    lam = damping * float(torch.linalg.matrix_norm(jac, ord=2))
    rhs = (y - bias.reshape(1, -1, 1, 1)).to(F64).reshape(2, -1)
    expected = svd_solve(jac, rhs.T, lam).T.reshape(x.shape)
    assert_rel_close(got, expected, 1e-10 if dtype == F64 else 1e-5, "closed form against the dense solve")
    (rec,) = ctx.records
    assert (rec.method, rec.iterations) == ("closed form", 0)
    assert rec.damping == pytest.approx(lam, rel=1e-12)
    again = rule(ctx, y, x, layer="conv", **kwargs)  # the filter is cached per layer
    assert torch.equal(again, got) and len([k for k in ctx.sigma_cache if k[0] == "filter"]) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_depthwise_conv_is_solved_in_channels_last(dtype, monkeypatch):
    """NOTE [depthwise layout]: the dense solution, the NCHW solve's iterations, the usual layout back."""
    c = 5
    w = rand((c, 1, 3, 3), 1, dtype=dtype)
    x = rand((2, c, 9, 8), 3, dtype=dtype)
    kwargs = dict(weight=w, bias=None, stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=c)

    def conv(t: Tensor) -> Tensor:
        return torch.conv2d(t, w.to(t.dtype), None, (2, 1), 1, 1, c)

    y = rand(conv(x).shape, 4, dtype=dtype)
    rule = get_inverse_rule(torch.conv2d)
    config = SolverConfig(solver="iterative", damping=1e-2, tol=1e-10 if dtype == F64 else 1e-5, max_iter=2000)
    layouts = []

    def spy(op, b, *args, **kw):  # the layout CGLS works in: its right-hand side and Jᵀ's results
        cl = torch.channels_last
        layouts.append((b.is_contiguous(memory_format=cl), op.rmatvec(b).is_contiguous(memory_format=cl)))
        return cgls(op, b, *args, **kw)

    monkeypatch.setattr(solver_context, "cgls", spy)
    ctx = SolverContext(config)
    got = rule(ctx, y, x, layer="dw", **kwargs)
    assert layouts == [(True, True)]
    assert got.is_contiguous() and ctx.records[0].method == "cgls"
    jac = torch.func.jacrev(conv)(x[:1].to(F64)).reshape(y[0].numel(), x[0].numel())
    lam = ctx.records[0].damping  # the Lanczos estimate of 1e-2·σ_max, which both solves use
    expected = svd_solve(jac, y.to(F64).reshape(2, -1).T, lam).T.reshape(x.shape)
    assert_rel_close(got, expected, 1e-8 if dtype == F64 else 1e-3, "channels-last CGLS against the dense solve")
    monkeypatch.setattr(linear_rules, "_depthwise", lambda weight, groups: False)
    ctx_nchw = SolverContext(config)
    nchw = rule(ctx_nchw, y, x, layer="dw", **kwargs)
    assert abs(ctx_nchw.records[0].iterations - ctx.records[0].iterations) <= 2
    assert_rel_close(got, nchw, 1e-8 if dtype == F64 else 1e-4, "channels-last against NCHW")


# ---------------------------------------------------------------------------------------------
# Max pool: pool(unpool(y)) = y by selecting at the forward argmax indices.


def _select(x: Tensor, index: Tensor) -> Tensor:
    """The forward selection at recorded indices: ``y[..., o] = x[..., index[o]]`` per plane."""
    flat = x.reshape(*x.shape[:2], -1)
    return torch.gather(flat, 2, index.reshape(*index.shape[:2], -1)).reshape(index.shape)


@pytest.mark.parametrize("overlapping", [None, False], ids=["any", "distinct_windows"])
@SETTINGS
@given(data=st.data())
def test_max_pool_unpool_round_trip(overlapping, data):
    sample = data.draw(max_pool2d_samples(overlapping))
    kw = sample.kwargs
    pooled, index = F.max_pool2d(sample.input, **kw, return_indices=True)
    rule = get_inverse_rule(F.max_pool2d)
    # y in the range of the selection: pool(unpool(y)) = y
    y = _select(rand(sample.input.shape, data.draw(SEEDS)), index)
    assert torch.equal(_select(rule(exact_ctx(), y, sample.input, layer="p", **kw), index), y)
    # the pooled input itself: rule(pool(a)) keeps exactly the selected inputs and zeroes the rest
    back = rule(exact_ctx(), pooled, sample.input, layer="p", **kw)
    assert torch.equal(_select(back, index), pooled)
    selected = torch.zeros(sample.input.shape, dtype=torch.bool).reshape(*index.shape[:2], -1)
    selected.scatter_(2, index.reshape(*index.shape[:2], -1), True)
    assert torch.equal(back.reshape(selected.shape)[~selected], torch.zeros(int((~selected).sum()), dtype=F64))
    unique = all(len(set(r.tolist())) == r.numel() for r in index.reshape(-1, index[0, 0].numel()))
    if overlapping is False:
        assert unique
    if unique:  # every input read at most once: any y round-trips, and the rule is max-unpool
        y = rand(pooled.shape, data.draw(SEEDS))
        got = rule(exact_ctx(), y, sample.input, layer="p", **kw)
        assert torch.equal(_select(got, index), y)
        flat = index.reshape(*index.shape[:2], -1)
        unpooled = torch.zeros_like(sample.input).reshape(*index.shape[:2], -1).scatter(2, flat, y.reshape(flat.shape))
        assert torch.equal(got, unpooled.reshape(sample.input.shape))  # max-unpool


# ---------------------------------------------------------------------------------------------
# Closed forms from the spec's table.


@SETTINGS
@given(data=st.data())
def test_closed_forms_of_piecewise_linear_activations(data):
    x, seed = data.draw(feature_maps((0.0,), ndims=(4,)))
    y = rand(x.shape, seed + 11)
    ctx = exact_ctx()
    relu = get_inverse_rule(torch.relu)(ctx, y, x, layer="r")
    assert torch.equal(relu, y * (x > 0))
    relu6 = get_inverse_rule(F.hardtanh)(ctx, y, x, layer="r6", min_val=0.0, max_val=6.0)
    assert torch.equal(relu6, torch.where((x > 0) & (x < 6), y, 0))  # θ is 0 or 6 where J is 0
    slope = data.draw(st.floats(0.01, 0.9))
    leaky = get_inverse_rule(F.leaky_relu)(ctx, y, x, layer="l", negative_slope=slope)
    assert_rel_close(leaky, torch.where(x > 0, y, y / slope), 1e-14, "leaky_relu divides by the forward slope")
    w = rand((x.shape[1],), seed + 12).abs() + 0.1
    prelu = get_inverse_rule(F.prelu)(ctx, y, x, layer="p", weight=w)
    assert_rel_close(prelu, torch.where(x > 0, y, y / w.reshape(1, -1, 1, 1)), 1e-14, "prelu per-channel slope")


@SETTINGS
@given(data=st.data())
def test_batch_norm_closed_form_and_dead_channels(data):
    sample = data.draw(batch_norm_samples())
    kw = sample.kwargs
    y = rand(F.batch_norm(sample.input, **kw).shape, sample.seed + 9)
    got = get_inverse_rule(F.batch_norm)(exact_ctx(), y, sample.input, layer="bn", **kw)
    shape = [1, -1] + [1] * (y.dim() - 2)
    gamma = kw["weight"] if kw["weight"] is not None else torch.ones(y.shape[1], dtype=F64)
    beta = kw["bias"] if kw["bias"] is not None else torch.zeros(y.shape[1], dtype=F64)
    std = (kw["running_var"] + kw["eps"]).sqrt()
    expected = (y - beta.reshape(shape)) * std.reshape(shape) / gamma.reshape(shape) + kw["running_mean"].reshape(shape)
    expected = torch.where(gamma.reshape(shape) != 0, expected, 0)
    assert_rel_close(got, expected, 1e-12, "batch norm")


@SETTINGS
@given(data=st.data())
def test_avg_pool_spreads_each_output_over_its_window(data):
    """Non-overlapping windows without padding: pinv of the mean is the nearest upsampling."""
    k = data.draw(st.integers(1, 3))
    h, w = k * data.draw(st.integers(1, 3)), k * data.draw(st.integers(1, 3))
    x = rand((data.draw(st.integers(1, 3)), 2, h, w), data.draw(SEEDS))
    y = rand((x.shape[0], 2, h // k, w // k), data.draw(SEEDS))
    kw = dict(kernel_size=k, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None)
    got = get_inverse_rule(F.avg_pool2d)(exact_ctx(), y, x, layer="a", **kw)
    assert_rel_close(got, y.repeat_interleave(k, 2).repeat_interleave(k, 3), 1e-12, "avg pool spread")
    got = get_inverse_rule(F.adaptive_avg_pool2d)(exact_ctx(), y, x, layer="a", output_size=(h // k, w // k))
    assert_rel_close(got, y.repeat_interleave(k, 2).repeat_interleave(k, 3), 1e-12, "adaptive avg pool spread")


@SETTINGS
@given(data=st.data())
def test_constant_pad_inverse_crops(data):
    x = rand((2, 3, data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))), data.draw(SEEDS))
    pad = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    value = data.draw(st.floats(-2, 2))
    y = rand(F.pad(x, pad, value=value).shape, data.draw(SEEDS))
    got = get_inverse_rule(F.pad)(exact_ctx(), y, x, layer="pad", pad=pad, mode="constant", value=value)
    h, w = y.shape[-2:]
    assert torch.equal(got, y[..., pad[2] : h - pad[3], pad[0] : w - pad[1]])


# ---------------------------------------------------------------------------------------------
# I5: batch = per sample (with damping, so the damped path is covered too).


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_batch_equals_per_sample(spec: OpSpec, data):
    sample = data.draw(spec.samples)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    config = SolverConfig(solver="dense", damping=1e-2)
    batch = call_rule(spec, SolverContext(config), bpfm_out, sample)
    singles = []
    for b in range(sample.input.shape[0]):
        one = Sample(sample.input[b : b + 1], spec.per_sample(sample.kwargs, b), sample.seed)
        singles.append(call_rule(spec, SolverContext(config), bpfm_out[b : b + 1], one))
    assert_rel_close(batch, torch.cat(singles), 1e-12, f"{spec.name}: batch != per sample")


@pytest.mark.parametrize("case", ["conv2d", "linear"])
@SETTINGS
@given(data=st.data())
def test_iterative_rule_batch_equals_per_sample(case: str, data):
    spec = SPEC_BY_NAME[case]
    sample = data.draw(spec.samples)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    config = SolverConfig(solver="iterative", damping=1e-2, tol=1e-10, max_iter=5000)
    batch = call_rule(spec, SolverContext(config), bpfm_out, sample)
    singles = [
        call_rule(spec, SolverContext(config), bpfm_out[b : b + 1], Sample(sample.input[b : b + 1], sample.kwargs, 0))
        for b in range(sample.input.shape[0])
    ]
    assert_rel_close(batch, torch.cat(singles), 1e-8, f"{case}: batch != per sample")


# ---------------------------------------------------------------------------------------------
# Dtypes and diagnostics.


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_keeps_float32_and_agrees_with_the_oracle(spec: OpSpec, data):
    """A float32 forward point gives a float32 B_u, equal to the oracle up to float32 accuracy.

    The oracle follows the float32 forward (its Jacobian is taken in float32, so kinks are decided
    as the float32 forward decides them) and solves in float64. Inputs are clamped to [−3, 3]:
    beyond, float32 derivatives of saturating ops (1 − tanh², σ(1 − σ)) lose digits in PyTorch
    itself.
    """
    sample = data.draw(spec.samples)
    as32 = {k: (v.float() if isinstance(v, Tensor) else v) for k, v in sample.kwargs.items()}
    sample32 = Sample(sample.input.clamp(-3, 3).float(), as32, sample.seed)
    bpfm_out = rand(spec.forward(sample32).shape, data.draw(SEEDS)).float()
    got = call_rule(spec, exact_ctx(), bpfm_out, sample32)
    assert got.dtype == torch.float32 and got.shape == sample32.input.shape
    # Normalisations have no kinks to follow, and an exact null space (each group's mean) that a
    # float32 Jacobian holds only to float32 accuracy, which pinv would then invert: their oracle
    # Jacobian is taken in float64 at the float32 point.
    if spec.name in LINEARIZED:
        up = {k: (v.to(F64) if isinstance(v, Tensor) else v) for k, v in as32.items()}  # the float32 values
        expected = oracle_inverse(spec.sample_fn(up), sample32.input, bpfm_out, dtype=F64)
    else:
        expected = oracle_inverse(spec.sample_fn(as32), sample32.input, bpfm_out, dtype=torch.float32)
    # error ~ cond(J) · eps32: solved ops, and pointwise ops whose derivative is near 0 (GELU's minimum)
    cond = 1.0
    for pc in pieces(spec, sample):
        rank = int(torch.linalg.matrix_rank(pc.jac))
        sv = torch.linalg.svdvals(pc.jac)
        cond = max(cond, float(sv[0] / sv[rank - 1]) if rank else 1.0)
    assert rel_err(got, expected) <= 1e-5 * cond, spec.name


@parametrize_specs
@SETTINGS
@given(data=st.data())
def test_rule_records_one_diagnostics_row(spec: OpSpec, data):
    sample = data.draw(spec.samples)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    ctx = SolverContext(SolverConfig(solver="dense", damping=1e-2))
    got = call_rule(spec, ctx, bpfm_out, sample, layer=f"features.{spec.name}")
    (rec,) = ctx.records
    assert rec.layer == f"features.{spec.name}"
    assert rec.rule == f"{spec.name}_inverse"
    assert rec.seconds >= 0 and rec.converged
    solved = spec.name in ("conv2d", "conv_transpose2d", "linear", *LINEARIZED, "avg_pool2d", "adaptive_avg_pool2d")
    solved |= spec.name == "interpolate" and not sample.kwargs["mode"].startswith("nearest")
    assert rec.method == ("dense" if solved and not _pointwise(spec, sample) else "closed form")
    assert rec.iterations == 0
    ps = pieces(spec, sample)
    # solver-based rules and smooth activations are damped, with λ = damping · σ_max(J) (0 when J
    # is 0, e.g. a conv reading padding only); the ReLU family, BN and selections are exact
    damped = spec.name in ("conv2d", "conv_transpose2d", "linear", *LINEARIZED, *SMOOTH)
    # (λ is recorded as the largest over the batch: any sample with a non-zero J makes it positive)
    assert (rec.damping > 0) == (damped and any(bool(pc.jac.abs().max() > 0) for pc in ps))
    # the recorded residual is ||J B_u − (B_w − θ)|| / ||B_w − θ||, largest over the batch
    worst = 0.0
    for b, pc in enumerate(ps):
        rhs = bpfm_out[b].reshape(-1) - pc.theta
        res = (pc.jac @ got[b].reshape(-1) - rhs).norm()
        worst = max(worst, float(res / rhs.norm()) if rhs.norm() > 0 else float(res))
    assert rec.residual == pytest.approx(worst, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("damping", [1e-2, 0.3])
@pytest.mark.parametrize("spec", [SPEC_BY_NAME[n] for n in SMOOTH], ids=SMOOTH)
@SETTINGS
@given(data=st.data())
def test_smooth_activations_are_the_damped_pseudo_inverse(spec: OpSpec, damping: float, data):
    """Decision 11: ``(JᵀJ + λ²I)⁻¹Jᵀ (B_w − θ)`` with ``λ = damping · σ_max(J)`` per sample (float64 oracle)."""
    sample = data.draw(spec.samples)
    bpfm_out = rand(spec.forward(sample).shape, data.draw(SEEDS))
    got = call_rule(spec, SolverContext(SolverConfig(damping=damping)), bpfm_out, sample)
    for b, pc in enumerate(pieces(spec, sample)):
        lam = damping * torch.linalg.matrix_norm(pc.jac, 2)
        normal = pc.jac.T @ pc.jac + lam**2 * torch.eye(pc.jac.shape[1], dtype=pc.jac.dtype)
        rhs = bpfm_out[b].reshape(-1).to(pc.jac.dtype) - pc.theta
        expected = torch.linalg.lstsq(normal, pc.jac.T @ rhs).solution if lam > 0 else torch.zeros_like(rhs)
        assert rel_err(got[b : b + 1], expected.reshape(1, *got.shape[1:])) <= TOL, spec.name


def test_a_smooth_activation_near_its_zero_slope_stays_bounded():
    """SiLU' vanishes at a ≈ −1.2785: undamped, B_u = 1/g'(a) blew up (1e26, then NaN, in a deep
    EfficientNet); damped, |B_u| ≤ |B_w − θ| / (2λ)."""
    a = torch.tensor([[[[-1.2785]], [[2.0]]]])
    silu = get_inverse_rule(F.silu)
    exact = silu(SolverContext(SolverConfig(damping=0.0)), F.silu(a) + 1.0, a, layer="silu")
    damped = silu(SolverContext(SolverConfig(damping=1e-2)), F.silu(a) + 1.0, a, layer="silu")
    assert exact[0, 0].abs() > 1e3
    lam = 1e-2 * float(torch.autograd.functional.jacobian(F.silu, a).abs().max())
    assert damped[0, 0].abs() <= 1 / (2 * lam) and damped[0, 1] == pytest.approx(exact[0, 1], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The generic linearised rule (fallback and multi-branch regions) and affine_piece.


class _Stage(nn.Module):
    """A small multi-branch region: conv → SiLU, gated by a sigmoid of the input, plus a skip."""

    def __init__(self, c: int, seed: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(rand(self.conv.weight.shape, seed) / (3 * c**0.5))
            self.conv.bias.copy_(rand((c,), seed + 1))

    def forward(self, x: Tensor, extra: Tensor) -> Tensor:
        return F.silu(self.conv(x)) * torch.sigmoid(x.mean(1, keepdim=True)) + x + extra


@pytest.mark.parametrize("rule", [linearized_inverse, region_inverse], ids=["linearized", "region"])
@SETTINGS
@given(data=st.data())
def test_generic_rules_equal_dense_pseudo_inverse(rule, data):
    c = data.draw(st.integers(1, 3))
    seed = data.draw(SEEDS)
    x = rand((data.draw(st.integers(1, 3)), c, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))), seed)
    extra = rand(x.shape, seed + 5)
    stage = _Stage(c, seed)
    y = rand(x.shape, seed + 6)
    ps = [affine_piece_of(lambda t, b=b: stage(t, extra[b : b + 1]), x[b : b + 1]) for b in range(x.shape[0])]
    expected = oracle_inverse(lambda b: lambda t: stage(t, extra[b : b + 1]), x, y)
    with torch.no_grad():  # as the inverse network runs
        ctx = exact_ctx()
        got = rule(ctx, y, stage, x, extra, layer="block")
        assert_rel_close(got, expected, TOL, rule.__name__)
        assert ctx.records[-1].rule == rule.__name__ and ctx.records[-1].method == "dense"
        # the matrix-free path (jvp/vjp + CGLS) reaches the same pseudo-inverse
        conds = [float(torch.linalg.svdvals(pc.jac)[0] / torch.linalg.svdvals(pc.jac)[pc.rank - 1]) for pc in ps]
        if max(conds) < COND_MAX:
            got = rule(exact_ctx("iterative", tol=1e-12, max_iter=5000), y, stage, x, extra, layer="block")
            assert_rel_close(got, expected, ITER_TOL, f"{rule.__name__} (iterative)")
        # affine_piece: θ and the per-sample Jacobian match the oracle
        op, theta = affine_piece(stage, x, extra)
        for b, pc in enumerate(ps):
            assert_rel_close(theta[b].reshape(1, -1), pc.theta[None], 1e-12, "θ")
            assert_rel_close(op.jacobian(b)[None], pc.jac[None], 1e-12, "J")
        # I5 for the per-sample (non-shared) operator with damping: σ_max and λ are per sample
        for solver in ("dense", "iterative"):
            cfg = SolverConfig(solver=solver, damping=1e-2, tol=1e-10, max_iter=5000)
            batch = rule(SolverContext(cfg), y, stage, x, extra, layer="block")
            singles = [
                rule(SolverContext(cfg), y[b : b + 1], stage, x[b : b + 1], extra[b : b + 1], layer="block")
                for b in range(x.shape[0])
            ]
            assert_rel_close(batch, torch.cat(singles), 1e-10, f"{rule.__name__}/{solver}: batch != per sample")


# ---------------------------------------------------------------------------------------------
# The table itself.


def test_duplicate_registration_raises_and_lookup_never_falls_back():
    with pytest.raises(ValueError, match="already registered"):
        register_inverse(torch.conv2d)(lambda solver, bpfm_out, input, **kw: bpfm_out)
    assert get_inverse_rule(torch.conv2d) is INVERSE_RULES[torch.conv2d]  # the original is kept

    sentinel = object()
    assert get_inverse_rule(sentinel) is None
    assert get_inverse_rule(nn.Conv2d) is None  # modules are lowered by normalize, never looked up
    assert get_inverse_rule("conv2d") is None
    assert get_inverse_rule(torch.add) is None

    def my_op(x):
        return x * 2

    try:
        inverse = register_inverse(my_op)(lambda solver, bpfm_out, input: bpfm_out / 2)
        assert get_inverse_rule(my_op) is inverse
        ctx = exact_ctx()
        assert torch.equal(inverse(ctx, torch.ones(2, 3), torch.ones(2, 3), layer="x"), torch.full((2, 3), 0.5))
        assert ctx.records[-1].layer == "x"
        with pytest.raises(ValueError, match="already registered"):
            register_inverse(my_op)(lambda solver, bpfm_out, input: bpfm_out)
    finally:
        INVERSE_RULES.pop(my_op, None)
    assert get_inverse_rule(my_op) is None


def test_abandon_zeroes_exactly_where_the_coefficient_is_zero():
    bpfm = rand((2, 3, 4, 4), 0)
    lam = rand((2, 3, 4, 4), 1) * (rand((2, 3, 4, 4), 2) > 0)
    got = abandon(bpfm, lam)
    assert torch.equal(got, torch.where(lam != 0, bpfm, 0))


def test_a_smooth_activation_with_zero_slope_everywhere_is_not_damped():
    """J = 0 (hardswish below −3): B_u = 0 and λ = 0, as for any zero Jacobian."""
    ctx = SolverContext(SolverConfig(damping=1e-2))
    a = torch.full((2, 3, 4, 4), -5.0)
    got = get_inverse_rule(F.hardswish)(ctx, torch.randn(2, 3, 4, 4), a, layer="hs")
    assert not got.any() and ctx.records[-1].damping == 0.0


# ---------------------------------------------------------------------------------------------
# Mutation-testing round 2: cases the spec table's generators do not reach.


def test_constant_pad_records_the_residual_of_its_pad_value():
    """θ of a constant pad is the pad value at the padded positions: a consistent B_w has residual 0."""
    x = rand((2, 3, 3, 4), 0)
    pad, value = (1, 2, 1, 0), 1.5
    y = F.pad(x, pad, value=value)  # B_w = pad(a): consistent
    ctx = exact_ctx()
    got = get_inverse_rule(F.pad)(ctx, y, x, layer="pad", pad=pad, mode="constant", value=value)
    assert torch.equal(got, x)
    (rec,) = ctx.records
    assert rec.residual <= 1e-12


def test_lp_pool_of_power_one_passes_back_through_windows_of_zeros():
    """p = 1 is a plain window sum, of slope 1 everywhere, also where a window is all zeros (after a ReLU)."""
    x = rand((2, 2, 4, 4), 0).abs() + 0.1
    x[:, :, :2, :2] = 0.0  # one window of zeros per channel
    kwargs = dict(norm_type=1.0, kernel_size=2, stride=2, ceil_mode=False)
    bpfm_out = rand((2, 2, 2, 2), 1)
    got = get_inverse_rule(F.lp_pool2d)(exact_ctx(), bpfm_out, x, layer="pool", **kwargs)
    jac = torch.func.jacrev(lambda t: F.avg_pool2d(t, 2, 2) * 4)(x[:1]).reshape(8, 32)  # the window sum
    expected = (bpfm_out.reshape(2, -1) @ torch.linalg.pinv(jac).T).reshape(x.shape)
    assert_rel_close(got, expected, 1e-10, "lp_pool2d p=1 vs the window sum's pseudo-inverse")


def test_the_cached_one_by_one_filter_is_per_dtype():
    """A context reused for the same layer in float64 then float32 gets a filter of each dtype."""
    w, x = rand((4, 3, 1, 1), 0), rand((1, 3, 5, 5), 1)
    y = torch.conv2d(x, w)
    kwargs = dict(bias=None, stride=1, padding=0, dilation=1, groups=1)
    ctx, rule = SolverContext(SolverConfig()), get_inverse_rule(torch.conv2d)
    wide = rule(ctx, y, x, layer="conv", weight=w, **kwargs)
    narrow = rule(ctx, y.float(), x.float(), layer="conv", weight=w.float(), **kwargs)
    assert narrow.dtype == torch.float32
    assert_rel_close(narrow, wide, 1e-5, "float32 vs float64 filter")

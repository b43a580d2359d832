"""Inverse rules of pooling and resampling: max pools and nearest resampling are selections
(scatter-mean); average pools and the other interpolation modes are solved."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..solvers.operator import linear_map
from . import register_inverse

__all__ = [
    "selection_index",
    "select_inverse",
    "max_pool2d_inverse",
    "adaptive_max_pool2d_inverse",
    "avg_pool2d_inverse",
    "adaptive_avg_pool2d_inverse",
    "interpolate_inverse",
]


def selection_index(plane: Sequence[int], select: Callable[[Tensor], Tensor], device, leading: int = 2) -> Tensor:
    """Where each output of a selection reads in the flattened input ``plane``: ``select`` applied to
    the positions ``0..n−1``, rounded (−1 where it reads none, if ``select`` fills with −1).

    The positions are float64 on the CPU, exact integers whatever the device (MPS has no float64),
    with ``leading`` singleton dims in front of the plane as ``select`` needs them; the index goes to
    ``device``.
    """
    source = torch.arange(math.prod(plane), dtype=torch.float64, device="cpu").reshape(*([1] * leading), *plane)
    out = select(source)
    return out.reshape(out.shape[-len(plane) :]).round().long().to(device)


def select_inverse(solver, rhs: Tensor, index: Tensor, in_shape: torch.Size, plane_dims: int = 2) -> Tensor:
    """Least squares of a selection ``y[..., o] = x[..., index[o]]`` over the trailing ``plane_dims``.

    ``index`` (broadcastable to ``rhs``) addresses the flattened input plane; ``index < 0`` marks
    outputs that read no input (constant padding). Each selected input gets the mean of the
    outputs that selected it; unselected inputs get 0, the minimum-norm choice.
    """
    n_in = int(torch.Size(in_shape[-plane_dims:]).numel())
    n_out = int(torch.Size(rhs.shape[-plane_dims:]).numel())
    flat_b = rhs.reshape(-1, n_out)
    flat_i = index.expand(rhs.shape).reshape(-1, n_out)
    valid = flat_i >= 0
    idx = torch.where(valid, flat_i, 0)
    weight = valid.to(flat_b.dtype)
    sums = torch.zeros(flat_b.shape[0], n_in, dtype=flat_b.dtype, device=flat_b.device)
    sums.scatter_add_(1, idx, flat_b * weight)
    counts = torch.zeros_like(sums).scatter_add_(1, idx, weight)
    x = sums / counts.clamp_min(1)
    solver.closed_form((torch.gather(x, 1, idx) * weight).reshape(rhs.shape), rhs)
    return x.reshape(in_shape)


@register_inverse(F.max_pool2d)
def max_pool2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, kernel_size, stride, padding, dilation, ceil_mode):
    """Scatter-mean at the forward argmax indices (= max-unpool when windows do not overlap)."""
    _, index = F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    return select_inverse(solver, bpfm_out, index, input.shape)


@register_inverse(F.adaptive_max_pool2d)
def adaptive_max_pool2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, output_size):
    """Scatter-mean at the forward argmax indices."""
    _, index = F.adaptive_max_pool2d(input, output_size, return_indices=True)
    return select_inverse(solver, bpfm_out, index, input.shape)


@register_inverse(F.avg_pool2d)
def avg_pool2d_inverse(
    solver, bpfm_out: Tensor, input: Tensor, *, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override,
):  # fmt: skip
    """Min-norm least squares of the (linear) average pool: spreads each output over its window."""

    def pool(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    return solver.solve(linear_map(pool, input), bpfm_out, damped=False)


@register_inverse(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, output_size):
    """Min-norm least squares of the adaptive average pool."""
    return solver.solve(linear_map(lambda x: F.adaptive_avg_pool2d(x, output_size), input), bpfm_out, damped=False)


@register_inverse(F.interpolate)
def interpolate_inverse(
    solver, bpfm_out: Tensor, input: Tensor, *, size, scale_factor, mode, align_corners, recompute_scale_factor,
    antialias,
):  # fmt: skip
    """Resampling (``F.interpolate``, ``nn.Upsample``), in any mode and dimension (decision 34).

    The nearest modes copy one input to each output, a selection: each input gets the mean of
    its copies, and an input no output reads gets 0, as for max pools. The other modes (linear,
    bilinear, bicubic, trilinear, area) mix neighbours linearly and are solved like average
    pools, min-norm and undamped: their Jacobians are well conditioned (condition number below
    10 for factors from 1/2 to 3).
    """

    def resample(x: Tensor) -> Tensor:
        return F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)

    if mode in ("nearest", "nearest-exact"):
        plane = input.shape[2:]
        index = selection_index(plane, resample, input.device)
        return select_inverse(solver, bpfm_out, index, input.shape, plane_dims=len(plane))
    return solver.solve(linear_map(resample, input), bpfm_out, damped=False)

"""Inverse rules of affine layers: conv2d, linear (solved) and eval-mode BatchNorm (closed form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..solvers.operator import linear_map, linearized_map
from . import register_inverse

__all__ = ["conv2d_inverse", "linear_inverse", "batch_norm_inverse", "layer_norm_inverse"]


def _channel_view(v: Tensor, like: Tensor, dim: int = 1) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.to(like.dtype).reshape(shape)


@register_inverse(torch.conv2d)
def conv2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, weight, bias, stride, padding, dilation, groups):
    """Damped min-norm least squares of ``conv2d(B_u) = B_w − bias``, matrix-free or dense."""

    def conv(x: Tensor) -> Tensor:
        return torch.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)

    rhs = bpfm_out if bias is None else bpfm_out - _channel_view(bias, bpfm_out)
    return solver.solve(linear_map(conv, input), rhs)


@register_inverse(F.linear)
def linear_inverse(solver, bpfm_out: Tensor, input: Tensor, *, weight, bias):
    """Damped min-norm least squares of ``linear(B_u) = B_w − bias`` (features in the last dim)."""

    def lin(x: Tensor) -> Tensor:
        return F.linear(x, weight.to(x.dtype))

    rhs = bpfm_out if bias is None else bpfm_out - bias.to(bpfm_out.dtype)
    return solver.solve(linear_map(lin, input), rhs)


@register_inverse(F.batch_norm)
def batch_norm_inverse(
    solver, bpfm_out: Tensor, input: Tensor, *, running_mean, running_var, weight, bias, training, momentum, eps
):
    """Exact affine inverse with the running statistics; a channel with γ = 0 gets 0."""
    scale = torch.rsqrt(running_var.to(bpfm_out.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(bpfm_out.dtype)
    shift = -running_mean.to(bpfm_out.dtype) * scale
    if bias is not None:
        shift = shift + bias.to(bpfm_out.dtype)
    scale, shift = _channel_view(scale, bpfm_out), _channel_view(shift, bpfm_out)
    rhs = bpfm_out - shift
    x = torch.where(scale != 0, rhs / torch.where(scale != 0, scale, 1), 0)
    solver.closed_form(scale * x, rhs)
    return x


@register_inverse(F.layer_norm)
def layer_norm_inverse(solver, bpfm_out: Tensor, input: Tensor, *, normalized_shape, weight, bias, eps):
    """Damped min-norm least squares through LayerNorm's affine piece at the forward point.

    LayerNorm is not affine (it divides by the input's own standard deviation), so ``J`` is its
    Jacobian at ``a_u``; its null space holds the per-position mean and the direction of ``a_u``.
    """

    def norm(x: Tensor) -> Tensor:
        w = None if weight is None else weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        return F.layer_norm(x, normalized_shape, w, b, eps)

    op, theta = linearized_map(norm, input)
    return solver.solve(op, bpfm_out - theta)

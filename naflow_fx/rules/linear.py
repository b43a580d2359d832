"""Inverse rules of affine layers: convolutions, linear (solved), eval-mode BatchNorm (closed form), norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..solvers.operator import linear_map, linearized_map
from . import register_inverse

__all__ = [
    "conv2d_inverse",
    "conv_transpose2d_inverse",
    "linear_inverse",
    "batch_norm_inverse",
    "layer_norm_inverse",
    "group_norm_inverse",
    "instance_norm_inverse",
    "local_response_norm_inverse",
    "glu_inverse",
    "softmax_inverse",
    "log_softmax_inverse",
    "lp_pool2d_inverse",
]


def _channel_view(v: Tensor, like: Tensor, dim: int = 1) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.to(like.dtype).reshape(shape)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pointwise(weight: Tensor, padding) -> bool:
    """A 1×1 convolution without padding: the same channel matrix at every (strided) pixel."""
    return tuple(weight.shape[-2:]) == (1, 1) and (isinstance(padding, str) or _pair(padding) == (0, 0))


def _channel_matrix(weight: Tensor, groups: int) -> Tensor:
    """A 1×1 conv's weight ``[C_out, C_in/groups, 1, 1]`` as its ``[C_out, C_in]`` (block-diagonal) matrix."""
    w = weight[..., 0, 0]
    if groups == 1:
        return w
    cout_g = w.shape[0] // groups
    return torch.block_diag(*(w[g * cout_g : (g + 1) * cout_g] for g in range(groups)))


def _depthwise(weight: Tensor, groups: int) -> bool:
    """A grouped convolution with one input channel per group (MobileNet's depthwise convs)."""
    return groups > 1 and weight.shape[1] == 1 and weight.dim() == 4


@register_inverse(torch.conv2d)
def conv2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, weight, bias, stride, padding, dilation, groups):
    """Damped min-norm least squares of ``conv2d(B_u) = B_w − bias``, matrix-free or dense.

    A 1×1 convolution without padding is solved in closed form (NOTE [1×1 convolutions]).
    """

    def conv(x: Tensor) -> Tensor:
        return torch.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)

    rhs = bpfm_out if bias is None else bpfm_out - _channel_view(bias, bpfm_out)
    if _pointwise(weight, padding):
        # NOTE [1×1 convolutions]
        # A 1×1 convolution with stride s and no padding reads the pixels (s·i, s·j) and applies
        # the same [C_out, C_in] matrix M at each: J = (I ⊗ M) S with S that selection. So
        # σ_max(J) = σ_max(M), and the Tikhonov solution of NOTE [damping] is exact position by
        # position: B_u = M_λ⁺ (B_w − b) at the pixels read, where M_λ⁺ = V diag(σ/(σ²+λ²)) Uᵀ,
        # and 0 at the pixels no output reads (the minimum-norm choice). One small SVD per layer,
        # cached, replaces an iterative solve over the whole feature map, whatever `solver` says.
        matrix = _channel_matrix(weight.to(rhs.dtype), groups)
        q, p = int(rhs[0].numel()), int(input[0].numel())
        filt = solver.position_filter(matrix, (q, p))
        x = torch.zeros(input.shape, dtype=rhs.dtype, device=rhs.device)
        sh, sw = _pair(stride)
        x[..., ::sh, ::sw] = torch.einsum("pq,bqhw->bphw", filt, rhs)
        solver.closed_form(conv(x), rhs)
        return x
    if _depthwise(weight, groups):
        # NOTE [depthwise layout]
        # On the CPU oneDNN's depthwise forward is 1.4–3× and its adjoint 1.3–6× faster in
        # channels-last, and the NCHW adjoint can allocate large temporaries on each call (up to
        # 2,400 page faults per call at 112×112; benchmarks/experiments/depthwise_layout.py). So
        # the solve runs in channels-last: CGLS keeps the layout of its right-hand side and of
        # the adjoint's results, which follow `like`. The solution goes back to the usual layout.
        cl = torch.channels_last
        x = solver.solve(linear_map(conv, input.contiguous(memory_format=cl)), rhs.contiguous(memory_format=cl))
        return x.contiguous()
    return solver.solve(linear_map(conv, input), rhs)


@register_inverse(torch.conv_transpose2d)
def conv_transpose2d_inverse(
    solver, bpfm_out: Tensor, input: Tensor, *, weight, bias, stride, padding, output_padding, groups, dilation
):
    """Damped min-norm least squares of ``conv_transpose2d(B_u) = B_w − bias``, like a convolution."""

    def deconv(x: Tensor) -> Tensor:
        return torch.conv_transpose2d(x, weight.to(x.dtype), None, stride, padding, output_padding, groups, dilation)

    rhs = bpfm_out if bias is None else bpfm_out - _channel_view(bias, bpfm_out)
    return solver.solve(linear_map(deconv, input), rhs)


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
        return F.layer_norm(x, normalized_shape, _cast(weight, x), _cast(bias, x), eps)

    return _solve_linearized(solver, norm, bpfm_out, input)


def _cast(t: Tensor | None, like: Tensor) -> Tensor | None:
    return None if t is None else t.to(like.dtype)


def _solve_linearized(solver, fn, bpfm_out: Tensor, input: Tensor) -> Tensor:
    """Damped min-norm least squares through ``fn``'s affine piece at the forward point ``input``."""
    op, theta = linearized_map(fn, input)
    return solver.solve(op, bpfm_out - theta)


@register_inverse(F.group_norm)
def group_norm_inverse(solver, bpfm_out: Tensor, input: Tensor, *, num_groups, weight, bias, eps):
    """GroupNorm, solved through its Jacobian at the forward point like LayerNorm (decision 16):
    it divides each group by its own standard deviation, so it has no closed-form affine inverse."""

    def norm(x: Tensor) -> Tensor:
        return F.group_norm(x, num_groups, _cast(weight, x), _cast(bias, x), eps)

    return _solve_linearized(solver, norm, bpfm_out, input)


@register_inverse(F.instance_norm)
def instance_norm_inverse(
    solver, bpfm_out: Tensor, input: Tensor, *, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
):
    """InstanceNorm, solved through its Jacobian like LayerNorm. The module with running statistics is
    lowered to an eval BatchNorm instead; a functional call is taken as written, except that running
    statistics it would only update (``use_input_stats=True``) are left out."""
    stats = (None, None) if use_input_stats else (running_mean, running_var)

    def norm(x: Tensor) -> Tensor:
        mean, var = (_cast(s, x) for s in stats)
        return F.instance_norm(x, mean, var, _cast(weight, x), _cast(bias, x), use_input_stats, momentum, eps)

    return _solve_linearized(solver, norm, bpfm_out, input)


@register_inverse(F.local_response_norm)
def local_response_norm_inverse(solver, bpfm_out: Tensor, input: Tensor, *, size, alpha, beta, k):
    """LocalResponseNorm (AlexNet's original), solved through its Jacobian at the forward point."""

    def norm(x: Tensor) -> Tensor:
        return F.local_response_norm(x, size, alpha, beta, k)

    return _solve_linearized(solver, norm, bpfm_out, input)


# Ops that mix several inputs into each output non-linearly, with no closed form: solved through
# their Jacobian at the forward point, damped, like the normalisations (decision 36).


@register_inverse(F.glu)
def glu_inverse(solver, bpfm_out: Tensor, input: Tensor, *, dim):
    """GLU ``a ⊙ σ(b)`` over the two halves of ``dim``: half as many outputs as inputs."""
    return _solve_linearized(solver, lambda x: F.glu(x, dim), bpfm_out, input)


@register_inverse(F.softmax)
def softmax_inverse(solver, bpfm_out: Tensor, input: Tensor, *, dim, dtype):
    """Softmax over ``dim`` (``nn.Softmax2d``: the channels); a shift along ``dim`` is its null space."""
    return _solve_linearized(solver, lambda x: F.softmax(x, dim, dtype=dtype), bpfm_out, input)


@register_inverse(F.log_softmax)
def log_softmax_inverse(solver, bpfm_out: Tensor, input: Tensor, *, dim, dtype):
    """Log-softmax over ``dim``, like softmax."""
    return _solve_linearized(solver, lambda x: F.log_softmax(x, dim, dtype=dtype), bpfm_out, input)


@register_inverse(F.lp_pool2d)
def lp_pool2d_inverse(solver, bpfm_out: Tensor, input: Tensor, *, norm_type, kernel_size, stride, ceil_mode):
    """Power pooling ``(Σ_window x^p)^(1/p)``, linearised at the forward point.

    Its slope is ``s^(1/p − 1) x^(p − 1)`` with ``s`` the window's sum of powers. A window of zeros
    (common after a ReLU) is the cone point of a p-norm, where autograd gives NaN: it has no slope
    and passes nothing back, like a dead ReLU (for ``p = 1`` the pool is a plain sum, of slope 1).
    """
    p = float(norm_type)
    kh, kw = _pair(kernel_size)

    def pool(x: Tensor) -> Tensor:
        return F.lp_pool2d(x, norm_type, kernel_size, stride, ceil_mode)

    def window_sum(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size, stride, 0, ceil_mode) * (kh * kw)

    point = input.detach()
    sums = window_sum(point.pow(p))
    scale = torch.where(sums > 0, sums.pow(1 / p - 1), 1.0 if p == 1 else 0.0)
    weight = point.pow(p - 1)

    def tangent(t: Tensor) -> Tensor:
        return scale.to(t.dtype) * window_sum(weight.to(t.dtype) * t)

    tangent.transposable = True  # linear in t: its vjp at 0 is the adjoint
    # the dense solver's Jacobian is the tangent's too (fn64): autograd's of `pool` is NaN at zero windows
    op, theta = linearized_map(pool, point, tangent, tangent=tangent, value=pool(point))
    return solver.solve(op, bpfm_out - theta)

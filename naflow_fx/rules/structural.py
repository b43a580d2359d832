"""Inverse rules of structural ops: flatten, reshape, permutations and shuffles (exact), pad (a selection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register_inverse
from .pooling import select_inverse, selection_index

__all__ = [
    "flatten_inverse",
    "reshape_inverse",
    "permute_inverse",
    "transpose_inverse",
    "pad_inverse",
    "pixel_shuffle_inverse",
    "pixel_unshuffle_inverse",
    "channel_shuffle_inverse",
]


@register_inverse(torch.flatten)
def flatten_inverse(solver, bpfm_out: Tensor, input: Tensor, *, start_dim, end_dim):
    """Unflatten to the input's shape."""
    solver.closed_form(bpfm_out, bpfm_out)
    return bpfm_out.reshape(input.shape)


@register_inverse(torch.reshape)
def reshape_inverse(solver, bpfm_out: Tensor, input: Tensor, *, shape):
    """Reshape back to the input's shape."""
    solver.closed_form(bpfm_out, bpfm_out)
    return bpfm_out.reshape(input.shape)


@register_inverse(torch.permute)
def permute_inverse(solver, bpfm_out: Tensor, input: Tensor, *, dims):
    """Apply the inverse permutation."""
    dims = [d % input.dim() for d in dims]
    inverse = [dims.index(i) for i in range(len(dims))]
    solver.closed_form(bpfm_out, bpfm_out)
    return bpfm_out.permute(inverse)


@register_inverse(torch.transpose)
def transpose_inverse(solver, bpfm_out: Tensor, input: Tensor, *, dim0, dim1):
    """Transpose back."""
    solver.closed_form(bpfm_out, bpfm_out)
    return bpfm_out.transpose(dim0, dim1)


@register_inverse(F.pad)
def pad_inverse(solver, bpfm_out: Tensor, input: Tensor, *, pad, mode, value):
    """Least squares of padding (any mode): each input gets the mean of its copies; crops for zeros."""
    k = len(pad) // 2
    constant = mode == "constant"

    def select(source: Tensor) -> Tensor:  # the non-constant modes need (N, C) dims before the plane
        return F.pad(source, pad, mode=mode, value=-1.0) if constant else F.pad(source, pad, mode=mode)

    index = selection_index(input.shape[-k:], select, input.device, leading=0 if constant else 2)
    theta = F.pad(torch.zeros_like(input), pad, mode="constant", value=value or 0.0) if constant else 0
    return select_inverse(solver, bpfm_out - theta, index, input.shape, plane_dims=k)


@register_inverse(torch.pixel_shuffle)
def pixel_shuffle_inverse(solver, bpfm_out: Tensor, input: Tensor, *, upscale_factor):
    """Move the pixels back into channels (``pixel_unshuffle``)."""
    solver.closed_form(bpfm_out, bpfm_out)
    return torch.pixel_unshuffle(bpfm_out, upscale_factor)


@register_inverse(torch.pixel_unshuffle)
def pixel_unshuffle_inverse(solver, bpfm_out: Tensor, input: Tensor, *, downscale_factor):
    """Move the channels back into pixels (``pixel_shuffle``)."""
    solver.closed_form(bpfm_out, bpfm_out)
    return torch.pixel_shuffle(bpfm_out, downscale_factor)


@register_inverse(torch.channel_shuffle)
def channel_shuffle_inverse(solver, bpfm_out: Tensor, input: Tensor, *, groups):
    """Shuffling C channels in ``groups`` is undone by shuffling them in ``C // groups``."""
    solver.closed_form(bpfm_out, bpfm_out)
    return torch.channel_shuffle(bpfm_out, input.shape[1] // groups)

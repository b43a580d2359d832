"""The canonical operator set: after ``normalize`` every supported node calls one of these.

A canonical node has exactly one positional argument (the feature input) and every other
parameter as a keyword, defaults filled in, so rules can read ``node.kwargs["stride"]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CANONICAL_SIGNATURES", "bind_canonical", "is_canonical", "short_op_name"]


def _sig(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


# One stub per canonical op: its parameters are the canonical node's kwargs.
def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1): ...
def _linear(input, weight, bias=None): ...
def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5): ...
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5): ...
def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
): ...
def _local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0): ...


def _unary(input): ...
def _hardtanh(input, min_val=-1.0, max_val=1.0): ...
def _leaky_relu(input, negative_slope=0.01): ...
def _prelu(input, weight): ...
def _elu(input, alpha=1.0): ...
def _gelu(input, approximate="none"): ...
def _softplus(input, beta=1.0, threshold=20.0): ...
def _binary(input, other): ...
def _shrink(input, lambd=0.5): ...
def _threshold(input, threshold, value): ...
def _glu(input, dim=-1): ...
def _softmax(input, dim=None, dtype=None): ...
def _lp_pool2d(input, norm_type, kernel_size, stride=None, ceil_mode=False): ...
def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False): ...
def _avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
): ...
def _adaptive_pool2d(input, output_size): ...
def _flatten(input, start_dim=0, end_dim=-1): ...
def _reshape(input, shape): ...
def _permute(input, dims): ...


def _transpose(input, dim0, dim1): ...
def _pad(input, pad, mode="constant", value=None): ...
def _interpolate(
    input, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None,
    antialias=False,
): ...  # fmt: skip
def _pixel_shuffle(input, upscale_factor): ...
def _pixel_unshuffle(input, downscale_factor): ...
def _channel_shuffle(input, groups): ...


CANONICAL_SIGNATURES: dict[Callable, inspect.Signature] = {
    torch.conv2d: _sig(_conv2d),
    torch.conv_transpose2d: _sig(_conv_transpose2d),
    F.linear: _sig(_linear),
    F.batch_norm: _sig(_batch_norm),
    F.layer_norm: _sig(_layer_norm),
    F.group_norm: _sig(_group_norm),
    F.instance_norm: _sig(_instance_norm),
    F.local_response_norm: _sig(_local_response_norm),
    torch.relu: _sig(_unary),
    F.hardtanh: _sig(_hardtanh),
    F.leaky_relu: _sig(_leaky_relu),
    F.prelu: _sig(_prelu),
    F.elu: _sig(_elu),
    torch.sigmoid: _sig(_unary),
    torch.tanh: _sig(_unary),
    F.silu: _sig(_unary),
    F.gelu: _sig(_gelu),
    F.hardswish: _sig(_unary),
    F.hardsigmoid: _sig(_unary),
    F.mish: _sig(_unary),
    F.softplus: _sig(_softplus),
    F.logsigmoid: _sig(_unary),
    F.softsign: _sig(_unary),
    F.tanhshrink: _sig(_unary),
    F.hardshrink: _sig(_shrink),
    F.softshrink: _sig(_shrink),
    F.threshold: _sig(_threshold),
    torch.maximum: _sig(_binary),
    torch.minimum: _sig(_binary),
    F.glu: _sig(_glu),
    F.softmax: _sig(_softmax),
    F.log_softmax: _sig(_softmax),
    F.lp_pool2d: _sig(_lp_pool2d),
    F.selu: _sig(_unary),
    F.celu: _sig(_elu),
    F.max_pool2d: _sig(_max_pool2d),
    F.avg_pool2d: _sig(_avg_pool2d),
    F.adaptive_avg_pool2d: _sig(_adaptive_pool2d),
    F.adaptive_max_pool2d: _sig(_adaptive_pool2d),
    torch.flatten: _sig(_flatten),
    torch.reshape: _sig(_reshape),
    torch.permute: _sig(_permute),
    torch.transpose: _sig(_transpose),
    F.pad: _sig(_pad),
    F.interpolate: _sig(_interpolate),
    torch.pixel_shuffle: _sig(_pixel_shuffle),
    torch.pixel_unshuffle: _sig(_pixel_unshuffle),
    torch.channel_shuffle: _sig(_channel_shuffle),
}

_SHORT_NAMES = {
    torch.conv2d: "conv2d",
    F.linear: "linear",
    F.batch_norm: "batch_norm",
    torch.relu: "relu",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    F.logsigmoid: "logsigmoid",  # its __name__ is "log_sigmoid"
    F.threshold: "threshold",  # "_threshold"
}


def is_canonical(target: object) -> bool:
    return target in CANONICAL_SIGNATURES


def short_op_name(target: object) -> str:
    """``torch.conv2d`` → ``"conv2d"``; other callables by ``__name__``; strings as they are."""
    if isinstance(target, str):
        return target
    if target in _SHORT_NAMES:
        return _SHORT_NAMES[target]
    return getattr(target, "__name__", repr(target))


def bind_canonical(target: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind ``args``/``kwargs`` to ``target``'s canonical signature: ``(input,)`` plus all kwargs."""
    # arguments that do not change the value: in-place flags, max-pool indices (refused earlier),
    # and the warning stack level fx records for F.softmax / F.log_softmax
    kwargs = {k: v for k, v in kwargs.items() if k not in ("inplace", "return_indices", "_stacklevel")}
    bound = CANONICAL_SIGNATURES[target].bind(*args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    first = params.pop("input")
    if target is F.hardtanh:  # clamp(min=None) and friends become infinite bounds
        params["min_val"] = -math.inf if params["min_val"] is None else params["min_val"]
        params["max_val"] = math.inf if params["max_val"] is None else params["max_val"]
    return (first,), params

"""Inverse rules of elementwise activations: ``B_u = (B_w − θ) / g'(a_u)``, 0 where g'(a_u) = 0.

For piecewise-linear ops θ = 0 on the linear pieces (ReLU, LeakyReLU, PReLU) or the clamp value
where the derivative is 0 (ReLU6, hardtanh), so the same formula is the spec's mask / slope rule.
Their slopes are fixed, and they are exact. Smooth ops (SiLU, GELU, sigmoid, tanh…), whose
derivative comes arbitrarily close to 0, use the damped form ``g'·(B_w − θ) / (g'² + λ²)`` with
λ = damping · max |g'| (NOTE [damping] in ``naflow_fx/solvers/context.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..canonical import short_op_name
from ..solvers.operator import jvp
from . import register_inverse

__all__ = ["register_pointwise", "pointwise_derivative"]

Derivative = Callable[..., Tensor]
_DERIVATIVES: dict[object, Derivative | None] = {}


def pointwise_derivative(target: Callable, input: Tensor, **kwargs) -> Tensor:
    """``g'(a)`` elementwise: the registered closed form, else a ``jvp`` with a tangent of ones."""
    derivative = _DERIVATIVES.get(target)
    if derivative is not None:
        return derivative(input, **kwargs).to(input.dtype)
    return jvp(lambda t: target(t, **kwargs), (input,), (torch.ones_like(input),))[1]


def register_pointwise(target: Callable, derivative: Derivative | None = None, *, damped: bool = True) -> Callable:
    """Register the inverse of an elementwise op ``target(input, **kwargs)``.

    ``derivative(input, **kwargs)`` gives ``g'(a)``; None uses ``jvp`` (exact for elementwise ops).
    ``damped=False`` is for ops whose derivative takes a few fixed values (the ReLU family): their
    inverse is then exact, ``(B_w − θ) / g'(a)``, whatever the damping.
    """
    _DERIVATIVES[target] = derivative

    def rule(solver, bpfm_out: Tensor, input: Tensor, **kwargs) -> Tensor:
        d = pointwise_derivative(target, input, **kwargs)
        theta = target(input, **kwargs) - d * input
        return solver.diagonal_inverse(d, bpfm_out - theta, damped=damped)

    name = f"{short_op_name(target)}_inverse"
    rule.__name__ = rule.__qualname__ = name
    rule.__module__ = __name__
    rule.__doc__ = f"Inverse of elementwise ``{short_op_name(target)}`` at the forward point."
    inverse = register_inverse(target)(rule)
    globals()[name] = inverse
    return inverse


def _prelu_slope(input: Tensor, weight: Tensor) -> Tensor:
    w = weight.to(input.dtype)
    if w.numel() > 1:
        shape = [1] * input.dim()
        shape[1] = -1
        w = w.reshape(shape)
    return torch.where(input > 0, torch.ones_like(input), w)


# piecewise linear, fixed slopes: exact
register_pointwise(torch.relu, lambda a: a > 0, damped=False)
register_pointwise(F.hardtanh, lambda a, min_val, max_val: (a > min_val) & (a < max_val), damped=False)
register_pointwise(
    F.leaky_relu, lambda a, negative_slope: torch.where(a > 0, torch.ones_like(a), negative_slope), damped=False
)
register_pointwise(F.prelu, _prelu_slope, damped=False)
register_pointwise(F.hardsigmoid, damped=False)  # slope 1/6 or 0
for _op in (F.hardshrink, F.softshrink):  # slope 1 outside [−λ, λ], 0 inside
    register_pointwise(_op, lambda a, lambd: (a > lambd) | (a < -lambd), damped=False)
register_pointwise(F.threshold, lambda a, threshold, value: a > threshold, damped=False)
# max/min with a constant (FilterResponseNorm's TLU, max(x, τ)): slope 1 or 0, and ½ at a tie as
# autograd has it, from jvp; the other operand is a number or a tensor that does not depend on x
register_pointwise(torch.maximum, damped=False)
register_pointwise(torch.minimum, damped=False)
# derivative arbitrarily close to 0: damped
register_pointwise(F.elu, lambda a, alpha: torch.where(a > 0, 1.0, alpha * torch.exp(a)))
for _op in (torch.sigmoid, torch.tanh, F.silu, F.gelu, F.hardswish, F.mish, F.softplus, F.selu, F.celu):
    register_pointwise(_op)
for _op in (F.logsigmoid, F.softsign, F.tanhshrink):
    register_pointwise(_op)

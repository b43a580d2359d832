"""The inverse-rule table: one entry per canonical op, filled by ``@register_inverse``.

# NOTE [rule signature]
# A rule is ``rule(solver, bpfm_out, input, **kwargs) -> bpfm_in``:
#   solver    the SolverContext (configuration, solves, diagnostics);
#   bpfm_out  B_w, the back-propagated feature map of the node's output, Tensor[B, ...];
#   input     a_u, the recorded forward value of the node's feature input;
#   kwargs    the canonical node's other arguments, with recorded values / parameters in place.
# It returns B_u = J⁺(B_w − θ) for the affine piece (J, θ) of the op at a_u (spec §2). The
# abandoning mask is applied by the generated code afterwards, not by the rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from torch import Tensor

__all__ = ["InverseRule", "INVERSE_RULES", "register_inverse", "get_inverse_rule", "recorded", "abandon"]


class InverseRule(Protocol):
    def __call__(self, solver, bpfm_out: Tensor, input: Tensor, /, **kwargs) -> Tensor: ...


INVERSE_RULES: dict[object, Callable] = {}


def register_inverse(*targets: object) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the inverse rule of each canonical ``target`` (duplicates are an error).

    The registered callable takes an extra keyword ``layer`` (the forward node's layer name) and
    records the step's diagnostics and time in the solver context.
    """

    def deco(fn: Callable) -> Callable:
        inverse = recorded(fn)
        for target in targets:
            if target in INVERSE_RULES:
                raise ValueError(f"an inverse rule for {target!r} is already registered")
            INVERSE_RULES[target] = inverse
        return inverse

    return deco


def recorded(fn: Callable) -> Callable:
    """Wrap a rule so that it takes ``layer=`` and records one diagnostics row per call."""

    @functools.wraps(fn)
    def inverse(solver, bpfm_out: Tensor, *args, layer: str, **kwargs) -> Tensor:
        with solver.step(layer, fn.__name__):
            return fn(solver, bpfm_out, *args, **kwargs)

    return inverse


def get_inverse_rule(target: object) -> Callable | None:
    """The registered inverse of a canonical target, or None. Never falls back silently."""
    return INVERSE_RULES.get(target)


def abandon(bpfm: Tensor, coefficients: Tensor) -> Tensor:
    """Neuron abandoning: zero the BPFM where the importance coefficient is exactly 0."""
    return bpfm * (coefficients != 0)


# Register the families (import for side effects).
from . import generic, linear, pointwise, pooling, structural  # noqa: E402, F401

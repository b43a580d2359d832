"""The generic linearised rule: ``B_u = J⁺(B_w − θ)`` with ``J`` from ``jvp``/``vjp`` at the forward point.

It is the definition every closed-form rule must agree with (invariant I4), the explicit
``fallback="linearize"`` for ops without a rule, and the region solver of multi-branch stages.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from ..solvers.linearize import linearize_graph
from ..solvers.operator import linearized_map, widest_float
from . import recorded

__all__ = ["linearized_inverse", "region_inverse", "elementwise_affine_inverse", "affine_piece"]


def _float64_call(stage: nn.Module, extras: tuple):
    """``stage`` in float64 (float32 on MPS), for the dense solver only: the copies are made on its first call."""
    copies: list = []

    def call(x: Tensor) -> Tensor:
        if not copies:
            wide = widest_float(x.device)
            to64 = lambda v: v.to(wide) if isinstance(v, Tensor) and v.is_floating_point() else v  # noqa: E731
            copies.append({k: to64(v) for k, v in [*stage.named_parameters(), *stage.named_buffers()]})
            copies.append(tuple(to64(e) for e in extras))
        return torch.func.functional_call(stage, copies[0], (x, *copies[1]))

    return call


def affine_piece(stage: nn.Module, input: Tensor, *extras):
    """``(J, θ)`` of ``x ↦ stage(x, *extras)`` at ``input`` (see ``linearized_map``).

    Stages are graph modules: ``J`` is applied op by op (``linearize_graph``), not with ``jvp``.
    """
    value, tangent = linearize_graph(stage, input, *extras) if isinstance(stage, fx.GraphModule) else (None, None)
    return linearized_map(lambda x: stage(x, *extras), input, _float64_call(stage, extras), tangent, value)


def _solve_affine_piece(solver, bpfm_out: Tensor, stage: nn.Module, input: Tensor, *extras) -> Tensor:
    op, theta = affine_piece(stage, input, *extras)
    return solver.solve(op, bpfm_out - theta)


@recorded
def linearized_inverse(solver, bpfm_out: Tensor, stage: nn.Module, input: Tensor, *extras) -> Tensor:
    """The explicit ``fallback="linearize"``: damped min-norm solve through the op's affine piece."""
    return _solve_affine_piece(solver, bpfm_out, stage, input, *extras)


@recorded
def region_inverse(solver, bpfm_out: Tensor, stage: nn.Module, input: Tensor, *extras) -> Tensor:
    """Joint damped min-norm solve of a multi-branch region through its affine piece (spec §2)."""
    return _solve_affine_piece(solver, bpfm_out, stage, input, *extras)


@recorded
def elementwise_affine_inverse(solver, bpfm_out: Tensor, stage: nn.Module, input: Tensor, *extras) -> Tensor:
    """Arithmetic with a constant, ``x·c``, ``x/c``, ``x ± c``, ``c − x`` or ``−x``: ``B_u = (B_w − θ)/c``.

    ``c`` is a number or a tensor that does not depend on the input (a learnt per-channel scale),
    so ``J`` is diagonal, ``diag(d)`` with ``d`` the vjp of ones, and the spec's rule is exact, as
    for batch norm (0 where ``c = 0``). A constant that broadcasts the input to a larger shape
    makes ``J`` tall instead; that is solved like any affine piece.
    """
    out, vjp_fn = torch.func.vjp(lambda a: stage(a, *extras), input)
    if out.shape != input.shape:
        return _solve_affine_piece(solver, bpfm_out, stage, input, *extras)
    d = vjp_fn(torch.ones_like(out))[0]
    return solver.diagonal_inverse(d, bpfm_out - (out - d * input), damped=False)

"""assign_inverse_rules: give every stage its inverse; report every unsupported node in one error.

A single-op stage gets the op's registered rule (``naflow_fx.rules``). A multi-branch region is
solved jointly through its composite affine piece (spec §2), and so is a single op without a
rule when the caller chose ``fallback="linearize"``. The result is ``node.meta["naflow.inverse"]``
on each stage's output node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..canonical import short_op_name
from ..errors import ConfigError, UnsupportedOpError
from ..rules import get_inverse_rule
from .partition import Plan, Stage

__all__ = ["InverseStep", "assign_inverse_rules"]

_FALLBACKS = (None, "linearize")


@dataclass(frozen=True)
class InverseStep:
    """How one stage is inverted.

    ``kind`` is ``"rule"`` (a registered closed-form or solved rule), ``"region"`` (joint solve of
    a multi-branch stage through its linearisation), ``"affine"`` (arithmetic with a constant,
    :func:`~naflow_fx.rules.generic.elementwise_affine_inverse`) or ``"linearize"`` (the generic
    rule on a single op that has no rule, chosen explicitly with ``fallback="linearize"``).
    """

    stage: Stage
    kind: str
    rule: object | None = None  # the registered rule for kind == "rule"

    @property
    def rule_name(self) -> str:
        if self.kind == "rule":
            return getattr(self.rule, "__name__", str(self.rule))
        names = {"region": "region_inverse", "affine": "elementwise_affine_inverse"}
        return names.get(self.kind, "linearized_inverse (fallback)")


# arithmetic that is affine in its one feature operand when the other is a constant
_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.neg, torch.mul, torch.add, torch.sub, torch.neg}
_DIVISIONS = {operator.truediv, torch.div, torch.true_divide}  # affine only in the dividend
_ARITHMETIC_METHODS = {"mul", "add", "sub", "neg", "div", "true_divide"}


def _elementwise_affine(w: fx.Node, u: fx.Node) -> bool:
    """``w`` is ``u·c``, ``u/c``, ``u ± c``, ``c − u`` or ``−u`` for a constant ``c`` (a lone stage reads
    the feature only through ``u``, so every other operand is a number or a parameter)."""
    if w.kwargs.get("rounding_mode") is not None or sum(a is u for a in (*w.args, *w.kwargs.values())) != 1:
        return False
    if w.op == "call_method":
        divides = w.target in ("div", "true_divide")
        return w.target in _ARITHMETIC_METHODS and (not divides or w.args[:1] == (u,))
    if w.op != "call_function":
        return False
    return w.target in _ARITHMETIC or (w.target in _DIVISIONS and w.args[:1] == (u,))


def _describe(node: fx.Node) -> str:
    where = node.meta.get("naflow.module")
    if where:
        what = f"module {where!r} ({node.meta.get('naflow.module_type', 'module')})"
    else:  # the layer's name, as everywhere else (decision 1): fx's own name is not unique across blocks
        what = f"layer {node.meta.get('naflow.name', node.name)!r} ({short_op_name(node.target)})"
    return f"  - {node.format_node()}   [{what}]"


def assign_inverse_rules(gm: fx.GraphModule, fallback: str | None = None) -> fx.GraphModule:
    """Attach an ``InverseStep`` to each stage's output node, or raise listing all unsupported nodes."""
    if fallback not in _FALLBACKS:
        raise ConfigError(f"fallback must be None or 'linearize', got {fallback!r}")
    plan: Plan = gm.meta["naflow.plan"]
    nodes = {n.name: n for n in gm.graph.nodes}
    unsupported: list[fx.Node] = []
    for stage in plan.stages:
        w, u = nodes[stage.output], nodes[stage.input]
        if stage.is_region:
            step = InverseStep(stage, "region")
        else:
            rule = get_inverse_rule(w.target) if w.op == "call_function" else None
            feature_args = [a for a in w.all_input_nodes if a is u]
            single = w.args[:1] == (u,) and len(feature_args) == 1 and u not in w.kwargs.values()
            if rule is not None and single:
                step = InverseStep(stage, "rule", rule)
            elif _elementwise_affine(w, u):
                step = InverseStep(stage, "affine")
            elif fallback == "linearize":
                step = InverseStep(stage, "linearize")
            else:
                unsupported.append(w)
                continue
        w.meta["naflow.inverse"] = step
    if unsupported:
        listing = "\n".join(_describe(n) for n in unsupported)
        raise UnsupportedOpError(
            f"{len(unsupported)} node(s) between the input and the last layer have no inverse rule:\n{listing}\n"
            "What to do: register one with @naflow_fx.rules.register_inverse(<canonical op>), or pass "
            "compile_naflow(..., fallback='linearize') to invert them through their linearisation "
            "(torch.func jvp/vjp + least squares; slower, and reported in flow.diagnostics)."
        )
    return gm

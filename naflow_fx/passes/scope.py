"""check_scope: reject self-attention models (ViT, Swin, MaxViT) right after tracing, with one clear error.

NAFlow inverts CNN layers; a dot-product attention block (a softmax over the product of two
activations) has no inverse rule in the paper, so transformer models are out of scope. Detecting
them on the traced graph, before shapes are propagated, makes them fail fast and say why, instead
of failing later on a shape assertion or an unsupported ``einsum``.

Flagged as attention:

* a ``torch.nn.MultiheadAttention`` call (ViT);
* ``F.scaled_dot_product_attention`` / ``F.multi_head_attention_forward``, or a wrapped (leaf)
  function whose name contains "attention" (Swin's ``shifted_window_attention``);
* a softmax fed, within a few nodes, by a ``matmul`` / ``bmm`` / ``einsum`` of two activations
  (hand-written attention, MaxViT, non-local blocks).

Multiplicative gates such as squeeze-excitation, CBAM and BAM (a sigmoid times a feature map) are
not attention in this sense and pass.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["check_scope"]

_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, F.multi_head_attention_forward}
_PRODUCTS = {torch.matmul, torch.bmm, torch.einsum, operator.matmul, "matmul", "bmm", "__matmul__"}
_SOFTMAX = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, "softmax", "log_softmax"}
_HOPS = 6


def _is_activation(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op not in ("get_attr",)


def _is_activation_product(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in _PRODUCTS:
        return False
    operands = node.args[1:] if node.target is torch.einsum else node.args
    if node.target is torch.einsum and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    return sum(_is_activation(a) for a in operands) >= 2


def _fed_by_product(node: fx.Node) -> bool:
    frontier, seen = [node], {node}
    for _ in range(_HOPS):
        nxt = []
        for n in frontier:
            for parent in n.all_input_nodes:
                if parent in seen:
                    continue
                if _is_activation_product(parent):
                    return True
                seen.add(parent)
                nxt.append(parent)
        frontier = nxt
    return False


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    stack = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in stack.strip().splitlines() if ln.strip().startswith("File ")]
    origin = f", {lines[-1]}" if lines else ""
    return f"node '{node.name}' ({getattr(node.target, '__name__', node.target)}{origin})"


def _attention_node(gm: fx.GraphModule) -> fx.Node | None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            return node
        if node.op != "call_function" and node.op != "call_method":
            continue
        if node.target in _ATTENTION_FUNCTIONS:
            return node
        name = getattr(node.target, "__name__", "")
        module = getattr(node.target, "__module__", "") or ""
        if (
            node.op == "call_function"
            and "attention" in name.lower()
            and module.split(".")[0] not in ("torch", "builtins", "operator")
        ):
            return node
        if node.target in _SOFTMAX and _fed_by_product(node):
            return node
    return None


def check_scope(gm: fx.GraphModule) -> fx.GraphModule:
    """Raise :class:`UnsupportedModelError` when ``gm`` computes dot-product self-attention."""
    node = _attention_node(gm)
    if node is not None:
        raise UnsupportedModelError(
            f"this model computes self-attention at {_where(gm, node)}. naflow_fx explains CNNs: "
            "transformer and attention models (ViT, Swin, MaxViT, non-local blocks) are out of scope, "
            "because NAFlow defines no inverse for dot-product attention. To explain the convolutional "
            "part of a hybrid model, compile that sub-module instead (e.g. compile_naflow(model.stem, ...))."
        )
    return gm

"""partition_stages: articulation nodes, the last feature layer N, and the stages between them.

# NOTE [articulation nodes]
# The feature graph is the set of nodes with a floating tensor output on some path from the
# input placeholder to the target node. fx keeps nodes in a topological order, so a feature node
# v is an articulation node (every input→target path passes through it) exactly when no
# feature edge a→b jumps over it (pos(a) < pos(v) < pos(b)). Non-tensor nodes such as
# ``x.size(0)`` depend only on shapes, which are fixed for a given input size, and do not count.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedModelError, did_you_mean
from .shape_prop import is_feature_node, tensor_meta

__all__ = ["Stage", "Plan", "partition_stages", "feature_subgraph", "articulation_nodes"]

_GLOBAL_POOLS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}
# the max pools that also return their indices: their values (getitem 0) are the layer
POOLS_WITH_INDICES = frozenset({F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices})


@dataclass(frozen=True)
class Stage:
    """The part of the graph between two consecutive articulation nodes ``input`` → ``output``.

    ``body`` lists the nodes strictly after ``input`` up to and including ``output``; a stage with
    one body node whose only feature input is ``input`` is a single op, anything else a region.
    """

    index: int
    input: str
    output: str
    body: tuple[str, ...]

    @property
    def is_region(self) -> bool:
        return len(self.body) > 1


@dataclass(frozen=True)
class Plan:
    """Graph-level result of partitioning, stored as ``gm.meta["naflow.plan"]``."""

    input: str  # the input placeholder
    last: str  # N, the last feature layer
    stages: tuple[Stage, ...]  # shallow → deep
    layers: tuple[str, ...]  # 4-D feature nodes in (input, N], shallow → deep (node names)


def feature_subgraph(
    graph: fx.Graph, source: fx.Node, sink: fx.Node, keep: Callable[[fx.Node], bool] = is_feature_node
) -> list[fx.Node]:
    """Nodes on some path ``source`` → ``sink`` through ``keep`` nodes (default: feature nodes), in graph order."""
    forward = {source}
    for n in graph.nodes:
        if n is not source and keep(n) and any(a in forward for a in n.all_input_nodes):
            forward.add(n)
    backward = {sink}
    for n in reversed(list(graph.nodes)):
        if n in backward:
            backward.update(a for a in n.all_input_nodes if a in forward)
    return [n for n in graph.nodes if n in forward and n in backward]


def _no_feature_path_message(graph: fx.Graph, source: fx.Node, sink: fx.Node) -> str:
    """Why no floating-point path joins ``source`` to ``sink``: a non-real tensor on the way, or none at all."""
    paths = feature_subgraph(graph, source, sink, keep=lambda n: True)  # through any node
    blocking = [n for n in paths if tensor_meta(n) is not None and not is_feature_node(n)]
    if not blocking or source not in paths:
        return "the model's output does not depend on its input"
    n = blocking[0]
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return (
        f"the model's output depends on its input only through {n.meta.get('naflow.name', n.name)!r} "
        f"({n.op} {target}), which gives a {tensor_meta(n).dtype} tensor. NAFlow inverts layers "
        "between real floating-point feature maps; complex (torch.fft), integer and boolean "
        "intermediates have no inverse. Wrap the part that makes and consumes them in a module "
        "that takes and returns real tensors, and pass compile_naflow(..., leaf_modules=[ThatModule], "
        "fallback='linearize')."
    )


def articulation_nodes(nodes: list[fx.Node]) -> list[fx.Node]:
    """The single-tensor nodes of a source→sink feature subgraph that every path passes through.

    (NOTE above.) Nodes that output a tuple (``chunk``, ``split``, ``torch.max``) stay inside
    a stage: a stage boundary carries one feature map.
    """
    pos = {n: i for i, n in enumerate(nodes)}
    covered = [0] * (len(nodes) + 1)  # difference array over open intervals (pos(a), pos(b))
    for b in nodes:
        for a in b.all_input_nodes:
            if a in pos and pos[b] - pos[a] > 1:
                covered[pos[a] + 1] += 1
                covered[pos[b]] -= 1
    out, running = [], 0
    for i, n in enumerate(nodes):
        running += covered[i]
        if running == 0 and tensor_meta(n) is not None:  # a tuple (chunk, split) is never a boundary
            out.append(n)
    return out


def _is_4d(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and len(meta.shape) == 4


def _small_example(features: Iterable[fx.Node], source: fx.Node) -> str:
    """The hint when no feature map after the input is larger than 1×1: the example is too small for
    the model (a 1×1 example, or one its downsampling reduces to 1×1 at once), so nothing has a map."""
    maps = [m.shape for n in features if n is not source and _is_4d(n) and (m := tensor_meta(n)) is not None]
    if not maps or any(shape[-2] * shape[-1] > 1 for shape in maps):  # no conv at all, or a map to explain
        return ""
    height, width = tensor_meta(source).shape[-2:]
    return (
        f": the example is {height}×{width}, and at that size no feature map of the model is larger than 1×1. Pass an "
        "example of the size the model is used at, e.g. (1, 3, 224, 224) (the compiled flow accepts other sizes)."
    )


def _is_global_pool(node: fx.Node) -> bool:
    """Adaptive pools to 1×1, and to a larger size (VGG's 7×7) when no convolution follows that keeps a
    map larger than 1×1 (the head's, even with its classifier written as convolutions; not one
    mid-network); any op that reduces a larger map to 1×1 (``mean((2, 3), keepdim=True)``…)."""
    one = tuple(tensor_meta(node).shape[2:]) == (1, 1)
    if node.target is operator.getitem and getattr(node.args[0], "target", None) in POOLS_WITH_INDICES:
        node = node.args[0]  # the values of a max pool that also returns its indices: the pool
    if node.op == "call_function" and node.target in _GLOBAL_POOLS:
        return one or not _convolved_later(node)
    return one and any(_is_4d(a) and tuple(tensor_meta(a).shape[2:]) != (1, 1) for a in node.all_input_nodes)


def _convolved_later(node: fx.Node) -> bool:
    """Whether a convolution with an output larger than 1×1 reads ``node``'s output, directly or not."""
    seen, todo = set(), list(node.users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        if n.op == "call_function" and n.target in (torch.conv2d, torch.conv_transpose2d):
            meta = tensor_meta(n)
            if meta is not None and tuple(meta.shape[2:]) != (1, 1):
                return True
        seen.add(n)
        todo.extend(n.users)
    return False


def _default_last(candidates: list[fx.Node], batch: int) -> fx.Node | None:
    """The deepest 4-D articulation node that is not (and does not follow) a global pool.

    Nodes whose first dim is not the batch (a head that turns the columns of a feature map into a
    sequence, ``[W, B, C, H]``) are passed over; if every node is such, the deepest is returned,
    for ``_check_batch_dim`` to say why it cannot be N.
    """
    last = other = None
    for n in candidates:
        if not _is_4d(n) or n.op == "placeholder":
            continue
        if _is_global_pool(n):
            break
        if _per_image(n, batch):
            last = n
        else:
            other = n
    return last or other


def _output_value(result: object) -> object:
    """A returned node's recorded value (a named tuple built in forward is one node), else ``result``."""
    if isinstance(result, fx.Node):
        value = result.meta.get("val", result.meta.get("tensor_meta"))
        if tensor_meta(result) is not None:  # one tensor: its metadata is a named tuple, not the output
            return result
        if result.op == "call_function" and dataclasses.is_dataclass(result.target):
            return result.target  # a dataclass made in forward: its class names the fields
        return value if isinstance(value, (tuple, list, dict)) else result
    return result


def _is_dataclass(value: object) -> bool:
    """A dataclass instance, or the class of one built in forward (see ``_output_value``)."""
    return dataclasses.is_dataclass(value)


def _describe_output(result: object) -> str:
    """What a model returns, for an error: a dict's keys, a named tuple's fields, a tuple's length."""
    result = _output_value(result)
    if isinstance(result, dict):
        return f"a dict with keys {list(result)}"
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return f"a {type(result).__name__} with fields {list(result._fields)}"
    if _is_dataclass(result):
        kind = result.__name__ if isinstance(result, type) else type(result).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        return f"{article} {kind} dataclass with fields {[f.name for f in dataclasses.fields(result)]}"
    if isinstance(result, (tuple, list)):
        return f"a {type(result).__name__} of {len(result)}"
    return repr(result)


def _wrapper_hint(result: object) -> str:
    result = _output_value(result)
    if isinstance(result, dict):
        # the conventional names of a prediction (HuggingFace, torchvision's segmentation and
        # IntermediateLayerGetter models) before the first key, which may be a feature map
        key = next((k for k in ("logits", "out", "output", "embedding") if k in result), next(iter(result), "logits"))
        pick = f"[{key!r}]"
    elif isinstance(result, tuple) and hasattr(result, "_fields"):
        pick = f".{result._fields[0]}"
    elif _is_dataclass(result):
        names = [f.name for f in dataclasses.fields(result)]
        pick = "." + ("logits" if "logits" in names else names[0] if names else "logits")
    else:
        pick = "[0]"
    return (
        "class Explained(torch.nn.Module):\n    def __init__(self, model): super().__init__(); self.model = model\n"
        f"    def forward(self, x): return self.model(x){pick}\nthen compile_naflow(Explained(model), x)"
    )


def _per_image(node: fx.Node, batch: int) -> bool:
    meta = tensor_meta(node)
    return meta is not None and len(meta.shape) > 0 and meta.shape[0] == batch


def _check_batch_dim(last: fx.Node, source: fx.Node) -> None:
    """N must keep the input's batch: one map per image.

    A model that folds another dim into the batch (a per-frame CNN over a video reshaped to
    ``[B·T, C, H, W]``, crops or patches) has feature maps of ``B·T`` samples for ``B`` images.
    Its flows would return maps of the wrong batch size, so it is refused at compile time. Other
    4-D nodes without the batch first, such as the kernels timm's CondConv computes from its
    input and its folded conv output, are not feature maps of the images and get no map.
    """
    batch = tensor_meta(source).shape[0]
    for node in (last,):
        if not _per_image(node, batch):
            size = tensor_meta(node).shape[0] if tensor_meta(node) is not None else "?"
            raise UnsupportedModelError(
                f"layer {node.meta.get('naflow.name', node.name)!r} has {size} samples for a batch of {batch} "
                "image(s): the model folds another dim into the batch (video frames, crops or patches), so its "
                "maps would not be one per image. Explain the network it applies to each of them, on a batch of "
                "those: e.g. compile_naflow(model.<per-frame network>, frames) with frames of shape [B·T, C, H, W]"
            )


def partition_stages(gm: fx.GraphModule, last_layer: str | None = None) -> fx.GraphModule:
    """Find N and split input → N into stages; store ``Plan`` in ``gm.meta`` and roles in node.meta."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"naflow_fx explains models with one image input; this one takes {len(placeholders)} "
            f"({', '.join(p.name for p in placeholders)}). Wrap it in a module that takes one tensor."
        )
    source = placeholders[0]
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    meta = tensor_meta(result) if isinstance(result, fx.Node) else None
    if meta is not None and not meta.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"the model's output is a {meta.dtype} tensor of shape {tuple(meta.shape)}: explaining needs a "
            "floating-point output that depends smoothly on the input (logits, scores or an embedding), not "
            "class indices or a thresholded mask; return the values before argmax, rounding or comparison"
        )
    if not isinstance(result, fx.Node) or meta is None or not is_feature_node(result):
        raise UnsupportedModelError(
            f"the model's output must be one floating-point tensor (e.g. logits or an embedding); it returns "
            f"{_describe_output(result)}. Wrap the model so that forward returns the tensor to explain: "
            f"{_wrapper_hint(result)}"
        )
    whole = feature_subgraph(graph, source, result)
    if source not in whole:
        raise UnsupportedModelError(_no_feature_path_message(graph, source, result))
    candidates = articulation_nodes(whole)

    rank = len(tensor_meta(source).shape) if tensor_meta(source) is not None else 4
    not_2d = (
        f" The input is {rank}-D: naflow_fx explains 2-D CNNs, whose inputs and feature maps are [B, C, H, W]; "
        "a video, volume or 1-D signal model has no such layer (explain a 2-D network it applies per frame or "
        "slice instead)."
        if rank != 4
        else ""
    )
    if last_layer is None:
        last = _default_last(candidates, tensor_meta(source).shape[0])
        if last is None:
            raise UnsupportedModelError(
                "found no 4-D feature map that every path from the input to the output passes through"
                + (
                    not_2d
                    or _small_example(whole, source)
                    or "; pass last_layer='<layer name>' to choose the last feature layer."
                )
            )
    else:
        by_name = {n.meta.get("naflow.name", n.name): n for n in candidates if _is_4d(n) and n is not source}
        by_name.update({n.name: n for n in candidates if _is_4d(n) and n is not source})
        if last_layer not in by_name:
            names = [n.meta.get("naflow.name", n.name) for n in candidates if _is_4d(n) and n is not source]
            raise UnsupportedModelError(
                f"last_layer={last_layer!r} is not a 4-D layer that every input→output path passes through"
                + (
                    f"{did_you_mean(last_layer, names)}. Choose one of: {', '.join(names)}"
                    if names
                    else f". This model has none.{not_2d}"
                )
            )
        last = by_name[last_layer]

    nodes = feature_subgraph(graph, source, last)
    arts = articulation_nodes(nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    stages = []
    for i, (u, w) in enumerate(zip(arts, arts[1:])):
        body = tuple(n.name for n in nodes[pos[u] + 1 : pos[w] + 1])
        stage = Stage(index=i, input=u.name, output=w.name, body=body)
        stages.append(stage)
        for n in nodes[pos[u] + 1 : pos[w] + 1]:
            n.meta["naflow.stage"] = stage
    art_set = set(arts)
    for n in graph.nodes:
        if n is source:
            n.meta["naflow.role"] = "input"
        elif n in art_set:
            n.meta["naflow.role"] = "articulation"
        elif n in pos:
            n.meta["naflow.role"] = "inner"
        else:
            n.meta["naflow.role"] = "head" if is_feature_node(n) else "static"
    _check_batch_dim(last, source)
    batch = tensor_meta(source).shape[0]
    layers = tuple(n.name for n in nodes if n is not source and _is_4d(n) and _per_image(n, batch))
    gm.meta["naflow.plan"] = Plan(input=source.name, last=last.name, stages=tuple(stages), layers=layers)
    return gm

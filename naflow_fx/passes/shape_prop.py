"""propagate_shapes: record every node's output shape and dtype (``torch.fx.passes.shape_prop``)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import UnsupportedModelError, channels_last_hint
from ..tracing import dict_input_error, random_state_kept

__all__ = ["propagate_shapes", "tensor_meta", "is_feature_node", "layout"]


class _ShapeProp(fx.Interpreter):
    """``torch.fx``'s ShapeProp, without its printing: it records each node's ``tensor_meta`` and
    ``type`` as ShapeProp does, and remembers the node it failed on. (ShapeProp prints the failing
    node's traceback to ``sys.stderr``; silencing that with ``redirect_stderr`` swapped the
    process-wide stream under other threads.)"""

    failed: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the model's own error, as raised: the message below says where

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        found = False

        def extract(obj: object) -> object:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Run ``gm`` once on ``example_input`` and store ``node.meta["tensor_meta"]``."""
    refusal = dict_input_error(gm.graph)  # before running: a tensor indexed by a string warns first
    if refusal is not None:
        raise refusal
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad(), random_state_kept(example_input.device):
            prop.run(example_input)
    except Exception as exc:  # the user's model failed on the example input
        cause = exc
        where = ""
        if prop.failed is not None:
            module = prop.failed.meta.get("naflow.module_type")
            where = f" at {prop.failed.meta.get('naflow.name', prop.failed.name)}" + (f" ({module})" if module else "")
        message = " ".join(str(cause).split())
        raise UnsupportedModelError(
            f"the model failed on the example input of shape {tuple(example_input.shape)}{where}: "
            f"{type(cause).__name__}: {message}. Pass an example input the model accepts "
            f"(its channels, and a size large enough for its downsampling){channels_last_hint(example_input)}."
        ) from None
    _propagate_layouts(gm)
    return gm


# NOTE [layouts]
# A 4-D feature node's layout is the permutation of (N, C, H, W) its dims hold: ConvNeXt's blocks
# permute to channels-last (0, 2, 3, 1), run LayerNorm and Linear over the last dim and permute
# back. ``permute``/``transpose`` compose the layout; a reshape to 4-D is read as NCHW (ShuffleNet's
# channel shuffle ends in ``view(B, C, H, W)``); a convolution makes its own channels at dim 1 and
# keeps what its spatial dims held (H and W, in either order), or is read as NCHW when one of them
# held the channels (a model that treats image columns as channels); other ops keep their first
# feature input's layout.
# Maps, Grad-CAM and the reported BPFM / coefficients of a channels-last layer are computed on its
# NCHW view, so they are spatial maps like every other layer's.
_NCHW = (0, 1, 2, 3)
_MAKE_CHANNELS = (torch.conv2d, torch.conv_transpose2d)  # after normalize: nn.Conv2d and F.conv2d alike


def _propagate_layouts(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        meta = tensor_meta(node)
        if meta is None or len(meta.shape) != 4:
            continue
        parent = next((a for a in node.all_input_nodes if "naflow.layout" in a.meta), None)
        inherited = parent.meta["naflow.layout"] if parent is not None else _NCHW
        if node.op == "call_function" and node.target is torch.permute and parent is node.args[0]:
            result = tuple(inherited[d % 4] for d in node.kwargs["dims"])
        elif node.op == "call_function" and node.target is torch.transpose and parent is node.args[0]:
            dims = list(inherited)
            i, j = node.kwargs["dim0"] % 4, node.kwargs["dim1"] % 4
            dims[i], dims[j] = dims[j], dims[i]
            result = tuple(dims)
        elif node.op == "call_function" and node.target in (torch.reshape, torch.flatten):
            result = _NCHW
        elif node.op == "call_function" and node.target in _MAKE_CHANNELS:
            result = (0, 1, *inherited[2:]) if set(inherited[2:]) == {2, 3} else _NCHW
        else:
            result = inherited
        node.meta["naflow.layout"] = result


def layout(node: fx.Node) -> tuple[int, ...]:
    """The (N, C, H, W) permutation a 4-D node's dims hold (NOTE [layouts]); NCHW by default."""
    return node.meta.get("naflow.layout", _NCHW)


def tensor_meta(node: fx.Node) -> TensorMetadata | None:
    """The node's ``TensorMetadata`` when its output is a single tensor, else None."""
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def _carries_float(meta: object) -> bool:
    if isinstance(meta, TensorMetadata):
        return meta.dtype.is_floating_point
    if isinstance(meta, (tuple, list)):
        return any(_carries_float(m) for m in meta)
    if isinstance(meta, dict):
        return any(_carries_float(m) for m in meta.values())
    return False


def is_feature_node(node: fx.Node) -> bool:
    """True for nodes whose output is (or holds, e.g. ``torch.max``'s tuple) a floating tensor."""
    return _carries_float(node.meta.get("tensor_meta"))

"""propagate_shapes: record every node's output shape and dtype (``torch.fx.passes.shape_prop``)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import UnsupportedModelError

__all__ = ["propagate_shapes", "tensor_meta", "is_feature_node"]


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Run ``gm`` once on ``example_input`` and store ``node.meta["tensor_meta"]``."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:  # noqa: BLE001 - the user's model failed on the example input
        raise UnsupportedModelError(
            f"the model failed on the example input of shape {tuple(example_input.shape)}: "
            f"{type(exc).__name__}: {exc}\nPass an example input the model accepts."
        ) from None
    return gm


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

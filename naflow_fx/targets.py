"""Targets: what scalar score per sample the flow explains.

``target`` may be ``None`` (argmax per sample), an ``int``, a ``list[int]`` of length B, a
``LongTensor[B]``, a :class:`ClassTarget`, or any callable ``output -> Tensor[B]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import TargetError

__all__ = ["ClassTarget", "resolve_target"]


@dataclass(frozen=True)
class ClassTarget:
    """The logit of a class (per sample when a sequence), like pytorch-grad-cam's
    ``ClassifierOutputTarget``.

    Example:
        >>> ClassTarget(2)(torch.tensor([[0.0, 1.0, 5.0]])).tolist()
        [5.0]
    """

    category: int | Sequence[int] | Tensor

    def indices(self, output: Tensor) -> Tensor:
        if output.dim() != 2:
            raise TargetError(
                f"a class target needs the model to output logits of shape [B, classes]; got "
                f"{tuple(output.shape)}. Pass a callable target(output) -> Tensor[B] instead."
            )
        batch, classes = _classes(output)
        cat = self.category
        if isinstance(cat, Tensor):
            idx = cat.to(device=output.device).reshape(-1)
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise TargetError(f"class targets must be integers, got a {idx.dtype} tensor")
        elif isinstance(cat, bool):
            raise TargetError("class targets must be integers, got a bool")
        elif isinstance(cat, numbers.Integral):  # int, numpy integers
            idx = torch.full((batch,), _in_range(int(cat), classes), device=output.device)
        elif isinstance(cat, Sequence) and not isinstance(cat, (str, bytes)):
            if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cat):
                raise TargetError(f"class targets must be integers, got {list(cat)!r}")
            idx = torch.tensor([_in_range(int(c), classes) for c in cat], device=output.device, dtype=torch.long)
        else:
            raise TargetError(f"cannot use {cat!r} as a class target: pass an int, a list of ints or a LongTensor")
        if idx.numel() == 1 and batch != 1:
            idx = idx.expand(batch)
        if idx.numel() != batch:
            raise TargetError(
                f"got {idx.numel()} class targets for a batch of {batch}: pass one per sample, or a single int"
            )
        bad = (idx < 0) | (idx >= classes)
        if bool(bad.any()):
            _in_range(int(idx[bad][0]), classes)
        return idx.long()

    def __call__(self, output: Tensor) -> Tensor:
        idx = self.indices(output)
        return output.gather(1, idx[:, None])[:, 0]


def _classes(output: Tensor) -> tuple[int, int]:
    """``(batch, classes)`` of logits ``[B, classes]`` with at least one class."""
    batch, classes = output.shape
    if classes == 0:
        raise TargetError("the model outputs 0 classes (shape [B, 0]): there is no class score to explain")
    return batch, classes


def _in_range(c: int, classes: int) -> int:
    """``c`` if it is a class index of a model with ``classes`` outputs (also before it becomes a tensor)."""
    if not 0 <= c < classes:
        raise TargetError(f"class target {c} is out of range: the model has {classes} classes (0–{classes - 1})")
    return c


def resolve_target(target: object, output: Tensor) -> tuple[Tensor, Tensor | None]:
    """Scores ``Tensor[B]`` for ``target`` on ``output``, and the class indices when it is a class target."""
    if target is None:
        if output.dim() != 2:
            raise TargetError(
                f"target=None means the argmax class, which needs logits of shape [B, classes]; the model "
                f"outputs {tuple(output.shape)}. Pass a callable target, e.g. target=lambda out: out.flatten(1).sum(1)."
            )
        _classes(output)
        target = ClassTarget(output.detach().argmax(1))
    elif not isinstance(target, ClassTarget) and not callable(target):
        target = ClassTarget(target)
    if isinstance(target, ClassTarget):
        idx = target.indices(output)
        return output.gather(1, idx[:, None])[:, 0], idx
    fn: Callable[[Tensor], Tensor] = target
    scores = fn(output)
    if not isinstance(scores, Tensor) or scores.shape != (output.shape[0],):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise TargetError(f"a callable target must return a Tensor of shape [B] = [{output.shape[0]}], got {shape}")
    if not scores.is_floating_point() or (output.requires_grad and not scores.requires_grad):
        raise TargetError(
            "a callable target must return a differentiable score of the output (a float Tensor[B] that "
            f"depends on it), got a {scores.dtype} tensor{'' if scores.requires_grad else ' without gradient'}; "
            "argmax, comparisons and .detach() give nothing to explain (use a logit, e.g. out[:, k])"
        )
    return scores, None

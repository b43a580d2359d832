"""Targets: what scalar score per sample the flow explains.

``target`` may be ``None`` (argmax per sample), an ``int``, a ``list[int]`` of length B, a
``LongTensor[B]`` (any integer dtype, on any device), an integer numpy array, a :class:`ClassTarget`,
any callable ``output -> Tensor[B]``, or a list with one target per sample as pytorch-grad-cam takes
them (``[ClassifierOutputTarget(281), ...]``): each a :class:`ClassTarget`, an int, or a callable
called on that sample's output alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import NAFlowError, TargetError

__all__ = ["ClassTarget", "resolve_target"]


@dataclass(frozen=True)
class ClassTarget:
    """The logit of a class (per sample when a sequence), like pytorch-grad-cam's
    ``ClassifierOutputTarget``.

    ``category`` is one class index for every sample or one per sample: an ``int``, a list or
    tuple of ints (numpy integers and 0-d integer tensors count as ints, so ``list(labels)``
    works), an integer tensor of any dtype and device, or an integer numpy array.

    Example:
        >>> ClassTarget(2)(torch.tensor([[0.0, 1.0, 5.0]])).tolist()
        [5.0]
        >>> logits = torch.tensor([[0.0, 1.0, 5.0], [3.0, 1.0, 0.0]])
        >>> ClassTarget(np.array([2, 0])).indices(logits).tolist()
        [2, 0]
        >>> ClassTarget(list(torch.tensor([1, 1]))).indices(logits).tolist()
        [1, 1]
    """

    category: int | np.integer | Sequence[int | np.integer | Tensor] | Tensor | np.ndarray

    def indices(self, output: Tensor) -> Tensor:
        """The class index of each sample of ``output`` (logits ``[B, classes]``), ``LongTensor[B]`` on
        its device; a single class is repeated for the batch. Raises :class:`~naflow_fx.TargetError`
        for anything else (a class out of range, a count that is not B, a non-integer class)."""
        if output.dim() != 2:
            raise TargetError(
                f"a class target needs the model to output logits of shape [B, classes]; got "
                f"{tuple(output.shape)}. Pass a callable target(output) -> Tensor[B] instead."
            )
        batch, classes = _classes(output)
        cat = self.category
        shape = None
        if _is_numpy(cat):
            cat = _from_numpy(cat, classes, "the class target")
        if isinstance(cat, Tensor):
            idx = _read_tensor(cat, "the class target")
            shape = tuple(idx.shape)
            if sum(d != 1 for d in shape) > 1:
                raise TargetError(
                    f"class targets are one class index per sample (shape [B] = [{batch}]), got shape {shape}"
                    + _one_hot_hint(shape, output)
                )
            idx = idx.reshape(-1).to(output.device)
        elif isinstance(cat, bool):
            raise TargetError("class targets must be integers, got a bool")
        elif isinstance(cat, numbers.Integral):  # int, numpy integers
            idx = torch.full((batch,), _in_range(int(cat), classes), device=output.device)
        elif isinstance(cat, Sequence) and not isinstance(cat, (str, bytes)):
            values = []
            for i, c in enumerate(cat):
                value = _scalar_index(c, classes, f"targets[{i}]")
                if value is None:
                    raise TargetError(
                        f"class targets must be integers, one class index per sample; got targets[{i}] = {c!r} "
                        f"({type(c).__name__})"
                    )
                values.append(_in_range(value, classes))
            idx = torch.tensor(values, device=output.device, dtype=torch.long)
        else:
            raise TargetError(
                f"cannot use {cat!r} as a class target: pass an int, a list of ints, an integer tensor or an "
                "integer numpy array"
            )
        if idx.numel() == 1 and batch != 1:
            idx = idx.expand(batch)
        if idx.numel() != batch:
            raise TargetError(
                f"got {idx.numel()} class targets for a batch of {batch}: pass one per sample, or a single int"
                + (_one_hot_hint(shape, output) if shape is not None else "")
            )
        bad = (idx < 0) | (idx >= classes)
        if bool(bad.any()):
            _in_range(int(idx[bad][0]), classes)
        return idx.long()

    def __call__(self, output: Tensor) -> Tensor:
        idx = self.indices(output)
        return output.gather(1, idx[:, None])[:, 0]


_INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64} | {
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
}


def _is_numpy(value: object) -> bool:
    """A numpy array, or a numpy scalar that is not an integer (``np.int64`` is one already)."""
    return isinstance(value, (np.ndarray, np.generic)) and not isinstance(value, numbers.Integral)


def _not_integers(who: str, dtype: object, kind: str) -> TargetError:
    """The error for class indices of a non-integer dtype, with the conversion that fixes the usual case."""
    name = str(dtype).removeprefix("torch.")
    numpy = kind != "tensor"
    if name == "bool":
        hint = " (class indices are ints 0..classes-1, not a mask)"
    elif "float" in name:
        to_int = ".astype(int)" if numpy else ".long()"
        hint = f" (if it holds whole numbers use {to_int}; for one-hot labels or probabilities use .argmax(-1))"
    elif name == "object":
        hint = " (if it holds ints use .astype(int))"
    elif numpy and np.dtype(dtype).kind in "US":
        hint = " (map class names to their indices first)"
    else:
        hint = ""
    article = "an" if name[0] in "aeiou" else "a"
    return TargetError(f"class targets must be integers, but {who} is {article} {dtype} {kind}{hint}")


def _from_numpy(value: np.ndarray | np.generic, classes: int, who: str) -> Tensor:
    """An integer numpy array or scalar as an int64 Tensor of the same shape."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise _not_integers(who, array.dtype, "array" if isinstance(value, np.ndarray) else "numpy scalar")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        _in_range(int(array.max()), classes)  # would wrap around as int64
    return torch.from_numpy(array.astype(np.int64))


def _read_tensor(value: Tensor, who: str) -> Tensor:
    """The values of an integer tensor as a dense int64 Tensor (on its own device)."""
    if value.is_meta:
        raise TargetError(
            f"{who} is a {value.dtype} tensor on the meta device, which has a shape but no values: pass the "
            "class indices themselves (e.g. a LongTensor on the CPU or on the model's device)"
        )
    if value.dtype not in _INT_DTYPES:
        raise _not_integers(who, value.dtype, "tensor")
    try:
        if value.is_nested:
            raise TypeError("a nested tensor holds no single index per sample")
        if value.layout != torch.strided:
            value = value.to_dense()
        return value.to(torch.long)
    except Exception as exc:  # an exotic tensor type whose values cannot be read
        layout = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TargetError(
            f"cannot read class indices from {who}, a {layout} {value.dtype} tensor ({type(exc).__name__}: "
            f"{exc}): pass a plain dense LongTensor of one class index per sample"
        ) from None


def _scalar_index(value: object, classes: int, who: str) -> int | None:
    """One class index from an int, a numpy integer, or a one-element integer tensor/array.

    ``None`` when ``value`` is not a single number (the caller says what it expected); a
    TargetError when it is one but not a usable integer (float or bool dtype, meta tensor).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if _is_numpy(value):
        if np.size(value) != 1:
            return None
        value = _from_numpy(value, classes, who)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        return int(_read_tensor(value, who).reshape(()).item())
    return None


def _one_hot_hint(shape: tuple[int, ...] | None, output: Tensor) -> str:
    """A hint when the target has the output's shape [B, classes]: one-hot labels or scores."""
    if shape == tuple(output.shape) and output.shape[1] > 1:
        return ": it has the output's shape [B, classes]; for one-hot labels or scores pass .argmax(1)"
    return ""


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
            example = (
                "target=lambda out: out (it is already one score per sample)"
                if output.dim() == 1
                else "target=lambda out: out[:, k].flatten(1).sum(1) for channel k"
            )
            raise TargetError(
                f"target=None means the argmax class, which needs logits of shape [B, classes]; the model "
                f"outputs {tuple(output.shape)}. Pass a callable target, e.g. {example}."
            )
        _classes(output)
        target = ClassTarget(output.detach().argmax(1))
    elif _per_sample(target):
        return _per_sample_scores(target, output)
    elif not isinstance(target, ClassTarget) and not callable(target):
        target = ClassTarget(target)
    if isinstance(target, ClassTarget):
        idx = target.indices(output)
        return output.gather(1, idx[:, None])[:, 0], idx
    fn: Callable[[Tensor], Tensor] = target
    scores = _call(fn, output, "the target", "the model's output")
    if not isinstance(scores, Tensor) or scores.shape != (output.shape[0],):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise TargetError(f"a callable target must return a Tensor of shape [B] = [{output.shape[0]}], got {shape}")
    _check_differentiable(scores, output, "a callable target", "the output (a float Tensor[B] that depends on it)")
    return scores, None


def _check_differentiable(score: Tensor, output: Tensor, who: str, of: str, logit: str = "out[:, k]") -> None:
    """A target's score must be a float that depends on the output, else there is nothing to explain."""
    if not score.is_floating_point() or (output.requires_grad and not score.requires_grad):
        raise TargetError(
            f"{who} must return a differentiable score of {of}, got a {score.dtype} tensor"
            f"{'' if score.requires_grad else ' without gradient'}; argmax, comparisons and .detach() give nothing "
            f"to explain (use a logit, e.g. {logit})"
        )


def _call(fn: Callable[[Tensor], Tensor], output: Tensor, what: str, of: str) -> object:
    """``fn(output)``; an exception inside the user's target is one :class:`TargetError` naming it."""
    try:
        return fn(output)
    except NAFlowError:  # the library's own targets (SimilarityTarget) say what is wrong themselves
        raise
    except Exception as exc:  # the user's callable rejected this output
        raise TargetError(
            f"{what} failed on {of} of shape {tuple(output.shape)}: {type(exc).__name__}: {exc}"
        ) from None


def _per_sample(target: object) -> bool:
    """A list or tuple holding at least one target object (not only class indices)."""
    return isinstance(target, (list, tuple)) and any(isinstance(t, ClassTarget) or callable(t) for t in target)


def _per_sample_scores(targets: Sequence, output: Tensor) -> tuple[Tensor, Tensor | None]:
    """pytorch-grad-cam's convention: ``targets[i]`` scores sample ``i`` from ``output[i]`` alone.

    One target for a larger batch applies to every sample, as a single int does.
    """
    from .similarity import SimilarityTarget  # similarity imports this module

    batch = output.shape[0]
    if len(targets) not in (1, batch):
        raise TargetError(f"got {len(targets)} targets for a batch of {batch}: pass one per sample, or one for all")
    items = [targets[0]] * batch if len(targets) == 1 else list(targets)
    scores, classes = [], []
    for i, t in enumerate(items):
        if isinstance(t, SimilarityTarget):
            raise TargetError(
                "a SimilarityTarget scores the whole batch (one reference per sample): pass it alone, not in a list"
            )
        if isinstance(t, ClassTarget) or not callable(t):
            cat = t.category if isinstance(t, ClassTarget) else t
            index = _scalar_index(cat, output.shape[-1], f"targets[{i}]")
            if index is None:
                raise TargetError(
                    f"targets[{i}] = {t!r}: in a list of per-sample targets, each is one class index, a "
                    "ClassTarget of one class, or a callable scoring that sample's output"
                )
            idx = ClassTarget(index).indices(output[i : i + 1])
            scores.append(output[i, idx[0]])
            classes.append(idx[0])
            continue
        score = _call(t, output[i], f"targets[{i}]", f"sample {i}'s output")
        if not isinstance(score, Tensor) or score.numel() != 1:
            shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise TargetError(
                f"targets[{i}] must return one score for sample {i}'s output {tuple(output[i].shape)} (as "
                f"pytorch-grad-cam's targets do), got {shape}"
            )
        of = f"sample {i}'s output (a float that depends on it)"
        _check_differentiable(score, output, f"targets[{i}]", of, logit="out[k]")
        scores.append(score.reshape(()))
    all_classes = len(classes) == batch
    return torch.stack(scores), (torch.stack(classes) if all_classes else None)

"""Weighted kNN classification over a memory bank (NPID style), explained with NAFlow.

Instance-discrimination models (NPID, Wu et al. 2018) classify by a weighted vote of the nearest
embeddings in a memory bank: with ``s_j = cos(v, b_j)`` for the top-k bank entries,

    score(c) = Σ_{j ∈ top-k, y_j = c} exp(s_j / τ)          prediction = argmax_c score(c)

:func:`explain_knn` explains that decision with :class:`KNNTarget`, the similarity target of the
predicted class's neighbours (see its docstring for the exact choice).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from naflow_fx.knn import explain_knn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                       nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> bank, bank_labels = torch.randn(20, 8), torch.arange(20) % 4
    >>> res = explain_knn(model, torch.randn(2, 3, 12, 12), bank, bank_labels, k=5)
    >>> res.prediction.shape, res.class_scores.shape, res.neighbours.shape
    (torch.Size([2]), torch.Size([2, 4]), torch.Size([2, 5]))
    >>> torch.allclose(res.flow.scores, torch.ones(2))  # Σ_d ω_d = sign of the weighted similarity
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import NAFlow
from .errors import ConfigError, InputError, InputTypeError, TargetError
from .fewshot import (
    _as_batch,
    _count,
    _embed,
    _first,
    _Integer,
    _labels_tensor,
    _nonzero_rows,
    _resolve_naflow,
    _scalar,
)
from .result import FlowResult
from .similarity import SimilarityTarget
from .solvers.operator import float64_device

__all__ = ["explain_knn", "KNNExplanation", "KNNTarget"]


class KNNTarget(SimilarityTarget):
    """The weighted cosine similarity to a set of neighbours, as channel contributions (spec §5).

    For sample ``b`` with neighbours ``j`` (bank embeddings ``b_j``) and weights ``w_j``:

        score(v) = Σ_j w_j · cos(v, b_j) = Σ_d c_d,    c_d = v̂_d · r_d,   r = Σ_j w_j b̂_j

    (``v̂``, ``b̂`` L2-normalised), and the explained score is ``Σ_d ω_d`` with
    ``ω_d = c_d / |Σ_d c_d|``, the denominator detached, exactly as in
    :class:`~naflow_fx.SimilarityTarget`: ``flow.scores`` is ``sign(score) = ±1`` and the
    gradient is ``∇ score / |score|``. The weights are constants (detached at the forward
    point). Because of this normalisation, scaling all ``w`` of a sample by one factor changes
    neither ω nor the flow, so :func:`explain_knn` passes ``exp((s_j − max_j s_j)/τ)`` (max over
    the predicted class's neighbours: no overflow or underflow for small τ) instead of
    ``exp(s_j/τ)``; :meth:`similarity` is the score for the weights given.

    Args:
        neighbours: ``Tensor[B, K, D]``, the neighbour embeddings of each sample.
        weights: ``Tensor[B, K]`` (``0`` for entries to ignore, e.g. other classes' neighbours).

    Example:
        >>> t = KNNTarget(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[2.0, 1.0]]))
        >>> t.similarity(torch.tensor([[3.0, 4.0]]))  # 2·0.6 + 1·0.8
        tensor([2.])
        >>> t(torch.tensor([[3.0, 4.0]]))
        tensor([1.])
    """

    def __init__(self, neighbours: Tensor, weights: Tensor) -> None:
        if not isinstance(neighbours, Tensor) or neighbours.dim() != 3:
            shape = tuple(neighbours.shape) if isinstance(neighbours, Tensor) else type(neighbours).__name__
            raise TargetError(f"neighbours must be a Tensor [B, K, D], got {shape}")
        if not isinstance(weights, Tensor) or weights.shape != neighbours.shape[:2]:
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise TargetError(f"weights must be a Tensor [B, K] = {list(neighbours.shape[:2])}, got {shape}")
        if not neighbours.is_floating_point():
            raise TargetError(f"neighbours must be floating-point embeddings, got {neighbours.dtype}")
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TargetError(f"weights must be real numbers, got {weights.dtype}")
        for name, t in (("neighbours", neighbours), ("weights", weights)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TargetError(f"the {name} of a KNNTarget contain NaN or Inf values")
        weights = weights.detach().to(neighbours.dtype)
        reference = (weights[..., None] * F.normalize(neighbours.detach(), dim=-1)).sum(1)
        super().__init__(reference, metric="dot")
        self.neighbours = neighbours.detach()
        self.neighbour_weights = weights

    def __repr__(self) -> str:
        b, k, d = self.neighbours.shape
        return f"KNNTarget(batch={b}, neighbours={k}, dim={d})"

    def contributions(self, output: Tensor) -> Tensor:
        query, ref = self._pair(output)
        return F.normalize(query, dim=1) * ref

    def _cosine_to_reference(self) -> bool:
        return True  # Σ_j w_j cos(v, b_j) = ‖r‖ cos(v, r)

    def _extremum_message(self, i: int, cos: float) -> str:
        return (
            f"the embedding of sample {i} points along the weighted mean of its neighbours (cosine {cos:.8g}, ±1 up "
            "to float rounding), as when the image itself is in the bank and is its only neighbour of the predicted "
            "class: the score's gradient is 0 there, so there is nothing to explain; leave the image's own row out "
            "of the bank (and of its labels)"
        )

    def _zero_reason(self, output: Tensor, i: int) -> str:
        if not bool(self.neighbour_weights[i].any()):
            return "all its neighbour weights are 0: give at least one neighbour a non-zero weight"
        return super()._zero_reason(output, i)


@dataclass
class KNNExplanation:
    """A weighted-kNN prediction and its flow (returned by :func:`explain_knn`).

    Attributes:
        prediction: ``LongTensor[B]``, the predicted class (argmax of ``class_scores``; ties:
            the lower class).
        class_scores: ``Tensor[B, num_classes]`` (float64), ``Σ exp(s_j/τ)`` over the top-k
            neighbours of each class; on the CPU when the model is on MPS, which has no float64.
        neighbours: ``LongTensor[B, k]``, bank indices of the top-k neighbours, most similar first.
        similarities: ``Tensor[B, k]``, their cosine similarities ``s_j``.
        neighbour_labels: ``LongTensor[B, k]``, their labels.
        flow: the flow of ``x`` w.r.t. :attr:`target` (the predicted class's neighbours).
        target: the :class:`KNNTarget` that was explained.
        embeddings: ``Tensor[B, D]``, the model's embeddings of ``x``.
        naflow: the compiled :class:`~naflow_fx.NAFlow`.
        tau: the temperature τ.
    """

    prediction: Tensor
    class_scores: Tensor
    neighbours: Tensor
    similarities: Tensor
    neighbour_labels: Tensor
    flow: FlowResult
    target: KNNTarget
    embeddings: Tensor
    naflow: NAFlow = field(repr=False)
    tau: float = 0.07


_MAX_SCORE_BYTES = 2**30  # class_scores beyond this is a labelling mistake, not a vote


def explain_knn(
    model: nn.Module | NAFlow,
    x: Tensor,
    bank: Tensor,
    bank_labels: Tensor | np.ndarray | Sequence[int | np.integer],
    k: _Integer = 200,
    tau: float = 0.07,
    *,
    num_classes: _Integer | None = None,
    layers: str | nn.Module | Iterable[str | nn.Module] | None = None,
    compile_options: dict | None = None,
) -> KNNExplanation:
    """Classify ``x`` by a weighted kNN vote in a memory bank (NPID) and explain the decision.

    Args:
        model: an embedding network (output ``[B, D]``) or a :class:`~naflow_fx.NAFlow` compiled
            from one (used as is, never recompiled).
        x: ``Tensor[B, C, H, W]`` (or one image ``[C, H, W]``).
        bank: ``Tensor[M, D]``, the memory bank of embeddings (normalised or not: cosine is used).
        bank_labels: ``LongTensor[M]`` (or an integer numpy array, or a list of ints), labels in ``0..num_classes-1``.
        k: number of neighbours (``1 <= k <= M``; NPID uses 200).
        tau: the temperature τ > 0 (NPID: 0.07).
        num_classes: the number of classes (default: ``max(bank_labels) + 1``).
        layers, compile_options: as for :func:`~naflow_fx.compile_naflow` (only when compiling).

    The neighbours are the ``k`` bank entries with the highest cosine similarity ``s_j`` to the
    embedding; ``class_scores[c] = Σ_{j: y_j = c} exp(s_j/τ)``. The flow explains
    ``Σ_{j ∈ top-k, y_j = ĉ} w_j cos(v, b_j)`` with ``w_j = exp(s_j/τ)`` detached, normalised as a
    :class:`~naflow_fx.SimilarityTarget` (:class:`KNNTarget`).

    Raises:
        InputError: empty / malformed images or bank, a bank with NaN / Inf or all-zero rows (or
            one that overflows the model's dtype), labels that do not match the bank, a bank whose
            dimension differs from the model's embedding, or images the model fails on.
        TargetError: ``k`` not in ``1..M``, ``num_classes`` not a positive int, labels outside
            ``0..num_classes-1``, so many classes that ``class_scores`` would exceed 1 GiB, a
            model that does not output ``[B, D]``, or an image it embeds to the zero vector.
        ConfigError: ``tau <= 0``, a ``tau`` so small that the votes ``exp(s_j/τ)`` overflow
            or underflow float64, ``layers`` or ``compile_options`` together with a compiled
            NAFlow, or a ``compile_options`` key that ``compile_naflow`` does not take.
        InputTypeError: ``bank`` is not a tensor, ``model`` neither an ``nn.Module`` nor a
            NAFlow, or ``compile_options`` not a dict.
    """
    x = _as_batch(x, "x")
    if not isinstance(bank, Tensor):
        raise InputTypeError(f"bank must be a Tensor of embeddings [M, D], got {type(bank).__name__}")
    if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise InputError(f"bank must be a non-empty Tensor of embeddings [M, D], got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        raise InputError(f"bank must be floating point, got {bank.dtype}")
    if not bool(torch.isfinite(bank).all()):
        rows = (~torch.isfinite(bank).all(1)).nonzero()[:, 0]
        raise InputError(f"the bank contains NaN or Inf values (row(s) {_first(rows)}): fill it with finite embeddings")
    size = bank.shape[0]
    zero = ~bank.detach().any(1)
    if bool(zero.any()):
        raise InputError(
            f"bank row(s) {_first(zero.nonzero()[:, 0])} are all zeros: their cosine similarity to anything is "
            "undefined; fill them with embeddings or drop them (with their labels) from the bank"
        )
    k = _count(k, f"k must be an int between 1 and the bank size {size}", "; lower k", TargetError, high=size)
    tau = _scalar(tau)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
        raise ConfigError(f"tau must be a positive number, got {tau!r}")
    if num_classes is not None:
        num_classes = _count(num_classes, "num_classes must be a positive int (or None)", "", TargetError)
    labels = _labels_tensor(bank_labels, size, bank.device, "bank_labels", "bank entries")
    nf = _resolve_naflow(model, x, layers, compile_options, "explain_knn")

    emb = _embed(nf, x, what="images")
    _nonzero_rows(emb, "images")
    labels = labels.to(emb.device)
    if bank.shape[1] != emb.shape[1]:
        raise InputError(
            f"the bank's embeddings have {bank.shape[1]} dimensions but the model embeds into {emb.shape[1]}: "
            "fill the bank with this model's outputs"
        )
    if int(labels.min()) < 0:
        raise TargetError(
            f"bank_labels must be class indices ≥ 0; got {int(labels.min())}: number the bank's classes 0..K-1, for "
            "example with torch.unique(bank_labels, return_inverse=True)[1]"
        )
    n_cls = int(labels.max()) + 1 if num_classes is None else num_classes
    if n_cls < 1 or int(labels.max()) >= n_cls:
        raise TargetError(
            f"bank_labels must lie in 0..num_classes-1 (num_classes={n_cls!r}); got labels "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    score_bytes = emb.shape[0] * n_cls * 8
    if score_bytes > _MAX_SCORE_BYTES:
        raise TargetError(
            f"{n_cls} classes would make class_scores [{emb.shape[0]}, {n_cls}] take {score_bytes / 2**30:.1f} GiB "
            "(float64): number the bank's classes 0..K-1, for example with "
            "torch.unique(bank_labels, return_inverse=True)[1], or explain fewer images at once"
        )
    given = bank
    bank = bank.detach().to(device=emb.device, dtype=emb.dtype)
    if not bool(torch.isfinite(bank).all()):
        raise InputError(
            f"the bank overflows the model's {emb.dtype} (largest magnitude {float(given.abs().max()):.3g}): fill it "
            "with this model's embeddings"
        )
    bank_n = F.normalize(bank, dim=1)

    sims = F.normalize(emb, dim=1) @ bank_n.T  # [B, M]
    # most similar first; equal similarities keep the bank's order (lower index first), as retrieval does
    top_sims, top_idx = torch.sort(sims, dim=1, descending=True, stable=True)
    top_sims, top_idx = top_sims[:, :k], top_idx[:, :k]
    top_labels = labels[top_idx]
    home = float64_device(emb.device)  # MPS has no float64: the vote is counted on the CPU there
    votes = torch.exp(top_sims.to(home).double() / float(tau))  # to the CPU first on MPS (no float64 there)
    class_scores = torch.zeros(emb.shape[0], n_cls, dtype=torch.float64, device=home)
    class_scores.scatter_add_(1, top_labels.to(home), votes)
    if not bool(torch.isfinite(class_scores).all()) or not bool((class_scores.amax(1) > 0).all()):
        top = float(top_sims.abs().max())
        raise ConfigError(
            f"tau={tau!r} is too small for these similarities (|s_j| up to {top:.3g}): the votes exp(s_j/τ) "
            f"{'overflow' if not bool(torch.isfinite(class_scores).all()) else 'underflow'} float64, so the vote "
            f"is undefined; use tau >= {top / 700:.3g}"
        )
    prediction = class_scores.argmax(1).to(emb.device)

    # weights exp((s_j - s_max)/τ) ∝ exp(s_j/τ) (the scale cancels in ω), s_max = the class's largest
    # similarity (so the largest weight is 1, whatever τ), zero outside the predicted class
    in_class = top_labels == prediction[:, None]
    shift = torch.where(in_class, top_sims, torch.full_like(top_sims, -torch.inf)).amax(1, keepdim=True)
    rel = torch.exp((top_sims - shift) / float(tau))
    weights = torch.where(in_class, rel, torch.zeros_like(rel))
    target = KNNTarget(bank[top_idx], weights)
    flow = nf(x, target)
    return KNNExplanation(
        prediction=prediction,
        class_scores=class_scores,
        neighbours=top_idx,
        similarities=top_sims,
        neighbour_labels=top_labels,
        flow=flow,
        target=target,
        embeddings=emb,
        naflow=nf,
        tau=float(tau),
    )

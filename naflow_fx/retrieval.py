"""Retrieval: rank a gallery by cosine similarity to a query and explain the top matches with NAFlow.

:func:`explain_match` embeds the gallery (batched, no grad), ranks it by the cosine similarity of
the embeddings, and explains each of the top-k matches from both sides with
:class:`~naflow_fx.SimilarityTarget` (cosine): the query w.r.t. the match's embedding and the
match w.r.t. the query's embedding (paper §III-C).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from naflow_fx.retrieval import explain_match
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                       nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> gallery = torch.randn(10, 3, 12, 12)
    >>> query = gallery[3] + 0.5 * torch.randn(3, 12, 12)  # a noisy copy of gallery image 3
    >>> m = explain_match(model, query, gallery, k=2)
    >>> m.indices.shape, bool(m.similarities[0, 0] >= m.similarities[0, 1])  # [Q, k], best match first
    (torch.Size([1, 2]), True)
    >>> m.query_flow.maps["4"].shape[0], m.match_flow.maps["4"].shape[0]  # Q·k rows each
    (2, 2)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import NAFlow
from .errors import InputError, InputTypeError, TargetError
from .fewshot import (
    _as_batch,
    _check_figure,
    _count,
    _embed,
    _first,
    _index,
    _Integer,
    _labelled_grid,
    _nonzero_rows,
    _resolve_naflow,
    _same_images,
    _take,
)
from .result import FlowResult
from .similarity import METRICS, SimilarityTarget, cosine_at_extremum, similarity_is_zero

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["explain_match", "MatchExplanation"]


@dataclass
class MatchExplanation:
    """The top-k gallery matches of each query, explained from both sides (see :func:`explain_match`).

    Flows have one row per (query, rank) pair, query-major: row ``q * k + r`` is query ``q`` and
    its ``r``-th match (use :meth:`pair`).

    Attributes:
        indices: ``LongTensor[Q, k]``, gallery indices of the matches, most similar first.
        similarities: ``Tensor[Q, k]``, their cosine similarities to the query.
        query_flow: flow (batch ``Q·k``) of each query w.r.t. its match's embedding.
        match_flow: flow (batch ``Q·k``) of each match w.r.t. its query's embedding (None with
            ``explain_matches=False``).
        query_embeddings: ``Tensor[Q, D]``; ``gallery_embeddings``: ``Tensor[G, D]``.
        naflow: the compiled :class:`~naflow_fx.NAFlow` (reuse it for the next query).
        query, gallery: the inputs (``gallery`` is None when only its embeddings were given).
    """

    indices: Tensor
    similarities: Tensor
    query_flow: FlowResult
    match_flow: FlowResult | None
    query_embeddings: Tensor
    gallery_embeddings: Tensor
    naflow: NAFlow = field(repr=False)
    query: Tensor = field(repr=False)
    gallery: Tensor | None = field(repr=False)

    @property
    def k(self) -> int:
        """The number of matches explained per query (``indices.shape[1]``)."""
        return int(self.indices.shape[1])

    def pair(self, q: _Integer = 0, r: _Integer = 0) -> tuple[FlowResult, FlowResult | None]:
        """``(query flow, match flow)`` (batch 1 each) of query ``q`` and its ``r``-th match."""
        nq, k = self.indices.shape
        message = f"pair({q!r}, {r!r}) is out of range: there are {nq} queries and k = {k} matches each"
        q, r = _index(q, nq, message), _index(r, k, message)
        row = torch.tensor([q * k + r], device="cpu")
        return _take(self.query_flow, row), None if self.match_flow is None else _take(self.match_flow, row)

    def plot(
        self, q: _Integer = 0, path: str | os.PathLike[str] | None = None, *, layers: Sequence[str] | None = None
    ) -> Figure:
        """For each of query ``q``'s matches: a row of the query (w.r.t. the match) and a row of the
        match (w.r.t. the query); one column per layer (``layers``, default: all of the flow's).
        Saves a PNG when ``path`` is given; returns the figure. Needs matplotlib (``vision`` extra)."""
        nq = self.indices.shape[0]
        q = _index(q, nq, f"query index {q!r} is out of range: there are {nq} queries (0..{nq - 1})")
        fmt, layers = _check_figure(path, layers, self.query_flow, "MatchExplanation.plot")
        images, flows, labels = [], [], []
        for r in range(self.k):
            qf, mf = self.pair(q, r)
            i, s = int(self.indices[q, r]), float(self.similarities[q, r])
            images.append(self.query[q : q + 1].cpu())  # the gallery may be on the CPU, the query not
            flows.append(qf)
            labels.append(f"query {q}→#{i}\ncos {s:.3f}")
            if mf is not None:
                images.append(self.gallery[i : i + 1].cpu())
                flows.append(mf)
                labels.append(f"match {r + 1}: #{i}\n→query {q}")
        return _labelled_grid(torch.cat(images), flows, labels, path, layers, fmt=fmt, fn="MatchExplanation.plot")


def explain_match(
    model: nn.Module | NAFlow,
    query: Tensor,
    gallery: Tensor | None,
    k: _Integer = 1,
    *,
    gallery_embeddings: Tensor | None = None,
    batch_size: int | None = 64,
    explain_matches: bool = True,
    layers: str | nn.Module | Iterable[str | nn.Module] | None = None,
    compile_options: dict | None = None,
) -> MatchExplanation:
    """Retrieve the ``k`` gallery images most similar to each query and explain every match.

    Args:
        model: an embedding network (output ``[B, D]``) or a :class:`~naflow_fx.NAFlow` compiled
            from one (used as is, never recompiled).
        query: ``Tensor[Q, C, H, W]`` or one image ``[C, H, W]``.
        gallery: ``Tensor[G, C, H, W]``, the images to search. It may stay on the CPU when the
            model is on a GPU: it is moved ``batch_size`` images at a time, and the matches to explain.
            ``None`` for an index that keeps only embeddings: then pass ``gallery_embeddings`` and
            ``explain_matches=False``.
        k: how many matches per query (``1 <= k <= G``).
        gallery_embeddings: precomputed ``Tensor[G, D]`` (skips embedding the gallery); they
            must come from the same model in eval mode.
        batch_size: gallery embedding chunk size (None: one batch).
        explain_matches: also explain the matches w.r.t. the query (one batched call).
        layers: the explained layers when compiling (default ``"all"``); not with a NAFlow.
        compile_options: other ``compile_naflow`` keyword arguments.

    The ranking is by cosine similarity of the embeddings (ties: the lower index first). The
    query's flow for match ``j`` is ``nf(query, SimilarityTarget(e_j))`` and the match's flow is
    ``nf(gallery[j], SimilarityTarget(e_query))``; all pairs go in one call each.

    Raises:
        InputError: empty or malformed query / gallery, images of different shapes, images the
            model fails on, NaN / Inf embeddings, or ``gallery_embeddings`` of the wrong shape,
            not floating point, not finite or with all-zero rows.
        InputTypeError: ``gallery_embeddings`` is not a tensor, ``model`` neither an ``nn.Module``
            nor a NAFlow, or ``compile_options`` not a dict.
        TargetError: ``k`` not in ``1..G``, a model that does not output ``[B, D]``, or a query
            or one of its top-k matches that the model embeds to the zero vector.
        ConfigError: ``layers`` or ``compile_options`` together with a compiled NAFlow, a
            ``compile_options`` key that ``compile_naflow`` does not take (or ``layers`` in it),
            or a ``batch_size`` that is not a positive int or None.
    """
    query = _as_batch(query, "query")
    if gallery is None:  # an index that keeps only embeddings
        if gallery_embeddings is None or explain_matches:
            raise InputError(
                "gallery=None needs gallery_embeddings (Tensor[G, D]) and explain_matches=False: without the "
                "images, the gallery can be ranked and the query explained, but not the matches"
            )
        _check_given_embeddings(gallery_embeddings)
        if gallery_embeddings.dim() != 2 or 0 in gallery_embeddings.shape:
            raise InputError(f"gallery_embeddings must be Tensor[G, D], got shape {tuple(gallery_embeddings.shape)}")
        size = gallery_embeddings.shape[0]
    else:
        if isinstance(gallery, Tensor) and gallery.dim() >= 1 and gallery.shape[0] == 0:
            raise InputError("the gallery is empty: pass at least one image [G, C, H, W] with G >= 1")
        gallery = _as_batch(gallery, "gallery")
        _same_images(query, gallery, "query", "gallery")
        size = gallery.shape[0]
        if gallery_embeddings is not None:
            _check_given_embeddings(gallery_embeddings)
    k = _count(k, f"k must be an int between 1 and the gallery size {size}", "", TargetError, high=size)
    nf = _resolve_naflow(model, query, layers, compile_options, "explain_match")

    q_emb = _embed(nf, query, what="query images")
    _nonzero_rows(q_emb, "query images")
    if gallery_embeddings is None:
        g_emb = _embed(nf, gallery, batch_size, what="gallery images", stream=True)
    else:
        if gallery_embeddings.shape != (size, q_emb.shape[1]):
            raise InputError(
                f"gallery_embeddings has shape {tuple(gallery_embeddings.shape)} but the gallery has {size} images "
                f"and the model embeds into {q_emb.shape[1]} dimensions: pass Tensor[{size}, {q_emb.shape[1]}] or None"
            )
        g_emb = gallery_embeddings.detach().to(device=q_emb.device, dtype=q_emb.dtype)
        if not bool(torch.isfinite(g_emb).all()):
            raise InputError(
                f"gallery_embeddings overflow the model's {q_emb.dtype} (largest magnitude "
                f"{float(gallery_embeddings.abs().max()):.3g}): pass this model's own embeddings"
            )
    sims = F.normalize(q_emb, dim=1) @ F.normalize(g_emb, dim=1).T  # [Q, G]
    # stable sort: equal similarities keep gallery order
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    top = sims.gather(1, order)

    flat = order.reshape(-1)  # [Q·k], query-major
    zero = ~g_emb[flat].any(1)
    if bool(zero.any()):
        picked = torch.unique(flat[zero])
        raise TargetError(
            f"the model embeds gallery image(s) {_first(picked)} to the zero vector, so their cosine similarity to "
            f"the query is undefined, yet they are among the top {k} matches; lower k, or check or remove "
            "those images (e.g. blank or wrongly normalised)"
        )
    _check_zero_matches(q_emb, g_emb, order, explain_matches)
    stored = None if gallery_embeddings is None else gallery_embeddings.dtype  # a bfloat16 index rounds more
    same = cosine_at_extremum(q_emb.repeat_interleave(k, dim=0), g_emb[flat], stored).reshape(-1, k)  # the query
    if bool(same.any()):
        q, j = same.nonzero()[0].tolist()
        raise TargetError(
            f"gallery image {int(order[q, j])} matches query {q} with cosine {float(top[q, j]):.8g}, 1 up to float "
            "rounding: it is the query itself or a copy, and a match with itself has nothing to explain (the "
            "cosine's gradient is 0 at its maximum); leave the query out of the gallery, e.g. "
            "gallery[torch.arange(len(gallery)) != i]"
        )
    queries = query.repeat_interleave(k, dim=0)
    query_flow = nf(queries, SimilarityTarget(g_emb[flat]))
    match_flow = None
    if explain_matches:
        matches = gallery[flat.to(gallery.device)].to(nf._device)  # the gallery may stay on the CPU
        match_flow = nf(matches, SimilarityTarget(q_emb.repeat_interleave(k, dim=0)))
    return MatchExplanation(
        indices=order,
        similarities=top,
        query_flow=query_flow,
        match_flow=match_flow,
        query_embeddings=q_emb,
        gallery_embeddings=g_emb,
        naflow=nf,
        query=query,
        gallery=gallery,
    )


def _check_zero_matches(q_emb: Tensor, g_emb: Tensor, order: Tensor, explain_matches: bool) -> None:
    """Refuse a (query, match) pair whose cosine is 0 (orthogonal embeddings): ω = c / |Σ c| is undefined."""
    k = order.shape[1]
    zero = similarity_is_zero(METRICS["cosine"](q_emb.repeat_interleave(k, dim=0), g_emb[order.reshape(-1)]))
    if bool(zero.any()):
        q, j = divmod(int(zero.nonzero()[0]), k)
        raise TargetError(
            f"gallery image {int(order[q, j])}, match {j + 1} of query {q}, has cosine 0 with it (orthogonal "
            "embeddings), so the weights ω = c / |Σ c| of the pair are undefined; lower k to the matches with a "
            "non-zero similarity" + ("" if not explain_matches else ", or remove that gallery image")
        )


def _check_given_embeddings(emb: object) -> None:
    """Precomputed ``gallery_embeddings``: a real, finite tensor without all-zero rows (shape checked later)."""
    if not isinstance(emb, Tensor):
        raise InputTypeError(
            f"gallery_embeddings must be a Tensor [G, D] of the model's embeddings (or None), got {type(emb).__name__}"
        )
    if not emb.is_floating_point():
        raise InputError(
            f"gallery_embeddings must be floating-point embeddings, got {emb.dtype}; pass the model's own outputs"
        )
    if emb.dim() == 2 and not bool(torch.isfinite(emb).all()):
        rows = (~torch.isfinite(emb).all(1)).nonzero()[:, 0]
        raise InputError(f"gallery_embeddings row(s) {_first(rows)} contain NaN or Inf values")
    if emb.dim() == 2 and emb.shape[1] > 0:
        zero = ~emb.detach().any(1)
        if bool(zero.any()):
            raise InputError(
                f"gallery_embeddings row(s) {_first(zero.nonzero()[:, 0])} are all zeros: their cosine similarity "
                "to anything is undefined; pass the model's embeddings of those images (or None to compute them)"
            )

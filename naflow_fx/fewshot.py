"""Few-shot episodes: explain a prototype classifier's decision with NAFlow (paper §III-C, Fig. 10–11).

The classifier is the MetaBaseline (Chen et al., 2021) protocol: an encoder ``f`` embeds the
support and query images, the prototype of class ``c`` is the mean of the support embeddings of
class ``c`` (the raw embeddings, as in MetaBaseline's code), and the logits are the cosine
similarities of the query embedding to the prototypes times a temperature (default 10). The
prediction is the most similar prototype.

:func:`explain_episode` explains this decision from both sides, with
:class:`~naflow_fx.SimilarityTarget` (cosine):

* the query's flow with respect to the predicted prototype (or any other prototype:
  ``classes=`` or :meth:`EpisodeExplanation.query_flow`), and
* the flows of the support images of the predicted class with respect to the query embedding,

so the query's and the matched supports' attention can be compared side by side
(:meth:`EpisodeExplanation.plot`). Flows are batched: all queries in one call, and all the
supports of one class (for every query that predicts it) in one call.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from naflow_fx.fewshot import explain_episode
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
    ...                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> support, labels = torch.randn(6, 3, 12, 12), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> ep = explain_episode(encoder, support, labels, torch.randn(2, 3, 12, 12))
    >>> ep.logits.shape, ep.prediction.shape, ep.classes.tolist()
    (torch.Size([2, 3]), torch.Size([2]), [0, 1, 2])
    >>> ep.flow.layers == ep.naflow.layers, len(ep.support_flows), ep.support_flows[0].maps["4"].shape[0]
    (True, 2, 2)
    >>> ep.query_flow(1).scores.shape  # both queries w.r.t. the prototype of class 1
    torch.Size([2])
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import check_parent
from .api import NAFlow, compile_naflow
from .errors import ConfigError, InputError, InputTypeError, TargetError
from .result import FlowResult, LayerMaps, _joined
from .similarity import METRICS, SimilarityTarget, cosine_at_extremum, similarity_is_zero

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["explain_episode", "EpisodeExplanation"]

# an index, count or label as these functions take it: an int, a numpy integer or a one-element integer tensor
_Integer = int | np.integer | Tensor


# ---------------------------------------------------------------------------- shared helpers
# (also used by naflow_fx.retrieval and naflow_fx.knn)


def _as_batch(x: object, name: str) -> Tensor:
    """``x`` as an image batch ``[B, C, H, W]`` (a single ``[C, H, W]`` image gets a batch dim)."""
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of images [B, C, H, W], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        hint = ""
        if x.dim() == 5:
            hint = f"; to use a [N, K, C, H, W] stack as one batch, pass {name}.flatten(0, 1) (and its labels, if any)"
        raise InputError(f"{name} must be images [B, C, H, W] (or one image [C, H, W]); got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty: it needs at least one image")
    return x


def _same_images(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise InputError(
            f"{name_a} images are {tuple(a.shape[1:])} but {name_b} images are {tuple(b.shape[1:])}; "
            "resize them to the same [C, H, W]"
        )


def _resolve_naflow(
    model: nn.Module | NAFlow,
    example: Tensor,
    layers: object,
    compile_options: dict | None,
    caller: str,
) -> NAFlow:
    """``model`` itself when it is a compiled :class:`NAFlow` (never recompiled), else compile it."""
    if isinstance(model, NAFlow):
        if layers is not None or compile_options:
            raise ConfigError(
                f"{caller} got an already compiled NAFlow together with layers= or compile_options=; "
                "those only apply when compiling. Compile it with the options you want "
                "(compile_naflow(encoder, example, layers=...)) or pass the nn.Module instead"
            )
        return model
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"{caller} expects an nn.Module encoder or a compiled NAFlow, got {type(model).__name__}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise InputTypeError(
            f"compile_options must be a dict of compile_naflow keyword arguments, e.g. {{'damping': 3e-2}}, got "
            f"{type(compile_options).__name__}"
        )
    options = dict(compile_options or {})
    if "layers" in options:
        raise ConfigError(f"pass layers= to {caller} directly, not inside compile_options")
    known = [p for p in inspect.signature(compile_naflow).parameters if p not in ("model", "example_input", "layers")]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"compile_options has {unknown}, which compile_naflow does not take; it takes {known}")
    return compile_naflow(model, example[:1], layers="all" if layers is None else layers, **options)


def _unexplainable(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For pairs of embeddings (rows of ``a`` and ``b``): their cosine contributions ``c``, whether
    the cosine is 0 (ω undefined), and whether it is 0 or ±1 (zero gradient), as
    :class:`~naflow_fx.SimilarityTarget` judges them."""
    c = METRICS["cosine"](a, b)
    zero = similarity_is_zero(c)
    return c, zero, zero | cosine_at_extremum(a, b)


def _check_pairs(support: Tensor, refs: Tensor, support_index: Tensor, query_index: Tensor, label: int) -> None:
    """Refuse a (support, query) pair whose cosine cannot be explained, naming both images.

    ``support`` and ``refs`` are the pairs' embeddings as the batched call explains them
    (query-major: row ``r`` is query ``r // K`` and support ``r % K``). A cosine of 0 (orthogonal
    embeddings, common with non-negative ReLU features) makes the weights ω = c / |Σ c|
    undefined; ±1 (a support image that is the query) has zero gradient. The
    :class:`~naflow_fx.SimilarityTarget` of that call refuses both by the same criteria, but
    names a row of the batch.
    """
    c, zero, bad = _unexplainable(support, refs)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        k = support_index.shape[0]
        why = (
            "their embeddings are orthogonal, so the weights ω = c / |Σ c| are undefined"
            if bool(zero[r])
            else "the support image is the query itself (or a copy), where the cosine's gradient is 0"
        )
        raise TargetError(
            f"support image {int(support_index[r % k])} (class {label}) has cosine {float(c[r].sum()):.3g} with query "
            f"{int(query_index[r // k])}: {why}; remove that support image, or pass explain_support=False to skip "
            "the support flows"
        )


def _check_prototypes(queries: Tensor, protos: Tensor, labels: Tensor, shots: Tensor) -> None:
    """Refuse a (query, prototype) pair whose cosine cannot be explained, naming the query and the class.

    Row ``q`` of ``queries`` is explained against ``protos[q]``, the mean of the ``shots[q]``
    support embeddings of class ``labels[q]``. The criteria are :func:`_check_pairs`'s.
    """
    c, zero, bad = _unexplainable(queries, protos)
    if bool(bad.any()):
        q = int(bad.nonzero()[0])
        label, k = int(labels[q]), int(shots[q])
        if bool(zero[q]):
            why = "their embeddings are orthogonal, so the weights ω = c / |Σ c| are undefined"
        elif k == 1:
            why = "the query is that class's only support image (or a copy), where the cosine's gradient is 0"
        else:
            why = "the query embeds to the mean of that class's support embeddings, where the cosine's gradient is 0"
        raise TargetError(
            f"query image {q} has cosine {float(c[q].sum()):.8g} with the prototype of class {label} (the mean of "
            f"its {k} support embedding{'s' if k != 1 else ''}): {why}; leave the query out of the support images"
        )


def _first(index: Tensor, n: int = 5) -> str:
    """The first ``n`` entries of a 1-D index tensor, for error messages: ``[0, 3, 4, ...]``."""
    shown = index[:n].tolist()
    return str(shown) if index.numel() <= n else str(shown)[:-1] + ", ...]"


def _scalar(value: object) -> object:
    """A one-element tensor (``torch.tensor(0.1)``) as its Python number; anything else unchanged."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
        return value.item()
    return value


def _count(value: object, message: str, hint: str, error: type[Exception], *, high: int | None = None) -> int:
    """``value`` as an int in ``1..high`` (any integer type such as numpy's or a one-element integer
    tensor, but not bool), else ``error(f"{message}, got {value!r}{hint}")``."""
    value = _scalar(value) if not (isinstance(value, Tensor) and value.is_floating_point()) else value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if 1 <= int(value) and (high is None or int(value) <= high):
            return int(value)
    raise error(f"{message}, got {value!r}{hint}")


def _index(i: object, n: int, message: str) -> int:
    """``i`` as an index in ``0..n-1`` (an int, a numpy integer or a one-element integer tensor), else a
    :class:`TargetError` with ``message``."""
    if isinstance(i, Tensor) and i.numel() == 1 and not (i.is_floating_point() or i.is_complex()):
        i = int(i) if i.dtype != torch.bool else i
    if isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= int(i) < n:
        return int(i)
    raise TargetError(message)


def _nonzero_rows(emb: Tensor, what: str, subject: str | None = None) -> None:
    """A :class:`TargetError` if any row of ``emb`` is the zero vector (its cosine similarity is undefined).

    ``subject`` names the zero rows in the message (default: "the model embeds {what} [i, ...]").
    """
    zero = ~emb.any(1)
    if bool(zero.any()):
        if subject is None:
            subject = f"the model embeds {what} {_first(zero.nonzero()[:, 0])} to"
        raise TargetError(
            f"{subject} the zero vector, so the cosine similarity to it is undefined; check those images (e.g. "
            "blank or wrongly normalised), or explain a model whose embedding is not zero"
        )


def _embed(nf: NAFlow, x: Tensor, batch_size: int | None = None, what: str = "images", stream: bool = False) -> Tensor:
    """The model's output for ``x`` (eval semantics, no grad, in chunks of ``batch_size``): ``[B, D]``.

    ``stream``: ``x`` may be on another device than the model (a gallery kept on the CPU for a
    model on a GPU); each chunk is moved to the model's device as it is embedded.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be a positive int or None, got {batch_size!r}")
    outs, start = [], 0
    with torch.no_grad(), nf._running():  # the caller's modes off, the model checked, leaves in eval mode
        for chunk in x.split(int(batch_size)) if batch_size else (x,):
            try:
                chunk = nf._check_input(chunk.to(nf._device) if stream else chunk)
            except InputError as exc:  # name the images: a call embeds several sets
                rows = ""
                if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
                    rows = f" {_first(start + (~torch.isfinite(chunk.flatten(1)).all(1)).nonzero()[:, 0])}"
                raise InputError(f"{what}{rows}: {exc}") from None
            start += chunk.shape[0]
            try:
                out = nf.graph_module.forward(chunk)  # not __call__: fx would print a traceback
            except Exception as exc:  # the model itself rejected these images
                first_line = str(exc).partition("\n")[0]  # torch.fx appends the generated code
                raise InputError(
                    f"the model failed on the {what} (shape {tuple(chunk.shape)}; it was compiled for "
                    f"{tuple(nf._example_shape)}): {type(exc).__name__}: {first_line}"
                ) from None
            if not isinstance(out, Tensor) or out.dim() != 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise TargetError(
                    f"embedding the {what} needs a model that outputs embeddings [B, D]; it returned {shape}. "
                    "Explain the embedding network (e.g. the encoder up to its pooled, flattened features)"
                )
            outs.append(out.detach())
    emb = torch.cat(outs)
    bad = (
        ~torch.isfinite(emb).all(1) if emb.is_floating_point() else torch.zeros(0, dtype=torch.bool, device=emb.device)
    )
    if bool(bad.any()):
        raise InputError(
            f"the model's embedding of the {what} {_first(bad.nonzero()[:, 0])} contains NaN or Inf values: "
            "check the model's weights and the images' scale (normalised images are about -2.5 to 2.5)"
        )
    return emb


def _take(flow: FlowResult, index: Tensor) -> FlowResult:
    """The rows ``index`` (LongTensor) of a batched flow (``diagnostics`` are the whole call's)."""
    idx = index.to(flow.output.device)

    def rows(t: Tensor) -> Tensor:
        return t.index_select(0, idx.to(t.device))

    return FlowResult(
        layers=list(flow.layers),
        maps={k: rows(v) for k, v in flow.maps.items()},
        output=rows(flow.output),
        scores=rows(flow.scores),
        classes=None if flow.classes is None else rows(flow.classes),
        input_size=flow.input_size,
        method=flow.method,
        bpfm=_joined(flow.bpfm, lambda k: rows(flow.bpfm[k])),
        coefficients=_joined(flow.coefficients, lambda k: rows(flow.coefficients[k])),
        diagnostics=dict(flow.diagnostics),
    )


def _stack_rows(flows: Sequence[LayerMaps]) -> LayerMaps:
    """Concatenate the maps of several results (same layers) along the batch, for one figure."""
    first = flows[0]
    return LayerMaps(
        layers=list(first.layers),
        maps={n: torch.cat([f.maps[n] for f in flows]) for n in first.layers},
        output=torch.cat([f.output for f in flows]),
        scores=torch.cat([f.scores for f in flows]),
        classes=None,
        input_size=first.input_size,
        method=first.method,
    )


def _check_figure(path: object, layers: object, flow: LayerMaps, fn: str) -> tuple[str | None, list[str]]:
    """Check a plot's ``path`` and ``layers`` before any flow is computed or anything drawn.

    Returns the figure format (None without a path) and the layer names; a bad path (not a path, a
    folder, an unknown extension, a parent that is a file) is an :class:`InputError` naming ``fn``.
    """
    from .viz import _check_layers, _figure_format

    names = _check_layers(layers, [flow], fn)
    if path is None:
        return None, names
    fmt = _figure_format(path, fn)
    check_parent(path, fn)
    return fmt, names


def _labelled_grid(
    images: Tensor,
    flows: Sequence[LayerMaps],
    labels: Sequence[str],
    path: str | os.PathLike[str] | None,
    layers: Sequence[str] | None,
    dpi: int = 150,
    fmt: str | None = None,
    fn: str = "plot",
):
    """:func:`naflow_fx.viz.flow_grid` with one row per (image, flow) pair and one label per row.

    ``path`` and ``layers`` should have been checked by :func:`_check_figure` (which gives ``fmt``).
    A folder that cannot be written is an :class:`InputError` starting with ``fn``; another failed
    write (a full disk) an ``OSError`` naming ``path``. No file is left half-written.
    """
    from .viz import _finish_figure, flow_grid

    fig = flow_grid(images, _stack_rows(flows), None, layers=layers)

    def label_rows() -> None:
        cols = len(fig.axes) // images.shape[0]
        for r, label in enumerate(labels):
            fig.axes[r * cols].set_ylabel(label, fontsize=6)
        fig.tight_layout(pad=0.2)

    return _finish_figure(fig, label_rows, path, dpi, fmt, fn)


def _labels_tensor(labels: object, n: int, device: torch.device, what: str, images: str) -> Tensor:
    if isinstance(labels, Tensor):
        t = labels.detach()
    elif isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            fix = f"{what}.astype(int)" if labels.dtype.kind in "fb" else "np.unique(labels, return_inverse=True)[1]"
            raise InputError(f"{what} must be integer class labels, got a numpy {labels.dtype} array; use {fix}")
        t = torch.from_numpy(labels.astype(np.int64))
    elif isinstance(labels, Sequence) and not isinstance(labels, str):
        if any(isinstance(v, (Sequence, Tensor)) and not isinstance(v, str) for v in labels):
            raise InputError(
                f"{what} must be a flat list of class labels, one per image, got nested lists; flatten them "
                f"(e.g. torch.tensor({what}).reshape(-1))"
            )
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
            raise InputError(f"{what} must be integer class labels, got {list(labels)!r}")
        t = torch.tensor([int(v) for v in labels], dtype=torch.long, device="cpu")
    else:
        raise InputTypeError(
            f"{what} must be a LongTensor [{n}], an integer numpy array or a list of ints, got "
            f"{type(labels).__name__}; convert it with torch.as_tensor(labels)"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} must be integer class labels, got a {t.dtype} tensor; use labels.long()")
    if t.dim() != 1 or t.shape[0] != n:
        hint = f" (flatten them with {what}.reshape(-1), in the images' order)" if t.numel() == n else ""
        raise InputError(
            f"{what} has shape {tuple(t.shape)} but there are {n} {images}: pass one label per image, shape [{n}]{hint}"
        )
    return t.long().to(device)


# ---------------------------------------------------------------------------- episodes


@dataclass
class EpisodeExplanation:
    """The explained prediction of one few-shot episode (returned by :func:`explain_episode`).

    Attributes:
        classes: ``LongTensor[N]``, the episode's class labels (sorted); column ``i`` of
            ``logits`` and row ``i`` of ``prototypes`` belong to ``classes[i]``.
        logits: ``Tensor[Q, N]``, ``temperature · cos(query embedding, prototype)``.
        prediction: ``LongTensor[Q]``, the predicted class label of each query.
        prototypes: ``Tensor[N, D]``, the mean support embedding of each class.
        query_embeddings: ``Tensor[Q, D]``; ``support_embeddings``: ``Tensor[S, D]``.
        flow: the queries' flow (batch Q), each query w.r.t. its predicted prototype
            (``SimilarityTarget(prototype)``; ``flow.scores`` is ``Σ_d ω_d = ±1``).
        support_indices: per query, ``LongTensor[K]``: the supports of its predicted class.
        support_flows: per query, the flow (batch K) of those supports, each w.r.t. the query
            embedding (``SimilarityTarget(query embedding)``), rows in ``support_indices`` order
            (empty with ``explain_support=False``; :meth:`support_flow` then computes on demand).
        class_flows: class label → the queries' flow w.r.t. that class's prototype (filled by
            ``classes=`` and by :meth:`query_flow`).
        naflow: the compiled :class:`~naflow_fx.NAFlow` (reuse it for the next episode).
        query, support, support_labels, temperature: the inputs.
    """

    classes: Tensor
    logits: Tensor
    prediction: Tensor
    prototypes: Tensor
    query_embeddings: Tensor
    support_embeddings: Tensor
    flow: FlowResult
    support_indices: list[Tensor]
    support_flows: list[FlowResult]
    naflow: NAFlow = field(repr=False)
    query: Tensor = field(repr=False)
    support: Tensor = field(repr=False)
    support_labels: Tensor = field(repr=False)
    temperature: float = 10.0
    class_flows: dict[int, FlowResult] = field(default_factory=dict, repr=False)
    _support_cache: dict[tuple[int, int], FlowResult] = field(default_factory=dict, repr=False)

    def _column(self, c: object) -> int:
        if isinstance(c, Tensor) and c.numel() == 1 and not (c.is_floating_point() or c.is_complex()):
            c = int(c) if c.dtype != torch.bool else c
        if not isinstance(c, numbers.Integral) or isinstance(c, bool):
            raise TargetError(f"a class must be an int label, got {c!r}")
        c = int(c)
        hits = (self.classes == c).nonzero()
        if hits.numel() == 0:
            raise TargetError(f"class {c} is not in this episode; its classes are {self.classes.tolist()}")
        return int(hits[0])

    def query_flow(self, c: _Integer | None = None) -> FlowResult:
        """All queries' flow w.r.t. the prototype of class ``c`` (None: each query's prediction).

        Computed on first request (one batched call) and cached in :attr:`class_flows`.
        """
        if c is None:
            return self.flow
        col = self._column(c)
        label = int(self.classes[col])
        if label not in self.class_flows:
            proto = self.prototypes[col].expand_as(self.query_embeddings)
            shots = (self.support_labels == label).sum().expand(self.query.shape[0])
            _check_prototypes(self.query_embeddings, proto, self.classes[col].expand(self.query.shape[0]), shots)
            self.class_flows[label] = self.naflow(self.query, SimilarityTarget(self.prototypes[col]))
        return self.class_flows[label]

    def support_flow(self, q: _Integer, c: _Integer | None = None) -> FlowResult:
        """The flow of the supports of class ``c`` (None: query ``q``'s prediction) w.r.t. query ``q``.

        Rows are the supports ``(support_labels == c).nonzero()`` in order (for the predicted
        class: :attr:`support_indices` ``[q]``).
        """
        q = _index(
            q,
            self.query.shape[0],
            f"query index {q!r} is out of range: the episode has "
            f"{self.query.shape[0]} queries (0..{self.query.shape[0] - 1})",
        )
        label = int(self.prediction[q]) if c is None else int(self.classes[self._column(c)])
        if label == int(self.prediction[q]) and self.support_flows:
            return self.support_flows[q]
        if (q, label) not in self._support_cache:
            idx = (self.support_labels == label).nonzero()[:, 0]
            ref = self.query_embeddings[q]
            _check_pairs(
                self.support_embeddings[idx], ref.expand(idx.shape[0], -1), idx, torch.tensor([q], device="cpu"), label
            )
            self._support_cache[q, label] = self.naflow(self.support[idx], SimilarityTarget(ref))
        return self._support_cache[q, label]

    def plot(
        self, q: _Integer = 0, path: str | os.PathLike[str] | None = None, *, layers: Sequence[str] | None = None
    ) -> Figure:
        """Query ``q`` (w.r.t. its predicted prototype) above the supports of the predicted class
        (each w.r.t. the query): one row per image, one column per layer (``layers``, default: all
        of the flow's). Saves a PNG when ``path`` is given; returns the matplotlib figure. Needs
        matplotlib (``vision`` extra)."""
        q = _index(
            q,
            self.query.shape[0],
            f"query index {q!r} is out of range: the episode has "
            f"{self.query.shape[0]} queries (0..{self.query.shape[0] - 1})",
        )
        fmt, layers = _check_figure(path, layers, self.flow, "EpisodeExplanation.plot")
        pred, col = int(self.prediction[q]), self._column(int(self.prediction[q]))
        idx = self.support_indices[q]
        images = torch.cat([self.query[q : q + 1], self.support[idx]])
        flows = [_take(self.flow, torch.tensor([q], device="cpu")), self.support_flow(q)]
        labels = [f"query {q}→proto {pred}\nlogit {float(self.logits[q, col]):.2f}"]
        labels += [f"support {int(i)} (c={pred})\n→query {q}" for i in idx]
        return _labelled_grid(images, flows, labels, path, layers, fmt=fmt, fn="EpisodeExplanation.plot")


def explain_episode(
    encoder: nn.Module | NAFlow,
    support: Tensor,
    support_labels: Tensor | np.ndarray | Sequence[int | np.integer],
    query: Tensor,
    *,
    temperature: float = 10.0,
    classes: int | np.integer | Sequence[int | np.integer] | Tensor | str | None = None,
    explain_support: bool = True,
    layers: str | nn.Module | Iterable[str | nn.Module] | None = None,
    compile_options: dict | None = None,
) -> EpisodeExplanation:
    """Classify the queries of an N-way K-shot episode (MetaBaseline) and explain it with NAFlow.

    Args:
        encoder: the embedding network (an ``nn.Module`` whose output is ``[B, D]``), or a
            :class:`~naflow_fx.NAFlow` compiled from one (used as is, never recompiled: compile
            once and reuse ``result.naflow`` across episodes).
        support: ``Tensor[S, C, H, W]``, the support images (any number per class).
        support_labels: ``LongTensor[S]`` (or an integer numpy array, or a list of ints), any integer class labels.
        query: ``Tensor[Q, C, H, W]`` (or one image ``[C, H, W]``).
        temperature: the logit scale of MetaBaseline's cosine classifier (must be > 0; it does
            not change the prediction or the flows).
        classes: class labels whose prototype every query is also explained against, or
            ``"all"``; the flows are in :attr:`EpisodeExplanation.class_flows` (request more later
            with :meth:`EpisodeExplanation.query_flow`).
        explain_support: compute the support flows (one batched call per predicted class).
        layers: the explained layers when compiling (``compile_naflow``'s ``layers``; default
            ``"all"``). Not allowed with a compiled NAFlow.
        compile_options: other ``compile_naflow`` keyword arguments (``solver``, ``damping``, …).

    Returns:
        an :class:`EpisodeExplanation`.

    Raises:
        InputError: malformed images, a label count that differs from the support count, query
            and support images of different shapes, images the encoder fails on, or NaN / Inf
            embeddings.
        TargetError: the encoder does not output ``[B, D]`` embeddings, a requested class is
            not in the episode (checked before any work), or a query or a class prototype embeds
            to the zero vector (its cosine similarity is undefined).
        ConfigError: ``temperature`` not a positive finite number, or compile options given with
            a compiled NAFlow.

    Labels, ``classes`` and the indices of :meth:`EpisodeExplanation.plot` may be numpy integers.
    ``plot`` checks its ``path`` and ``layers`` before computing or drawing anything.
    """
    support = _as_batch(support, "support")
    query = _as_batch(query, "query")
    _same_images(query, support, "query", "support")
    temperature = _scalar(temperature)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not temperature > 0
        or not math.isfinite(temperature)
    ):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature!r}")
    labels = _labels_tensor(support_labels, support.shape[0], support.device, "support_labels", "support images")
    episode_classes, shots = torch.unique(labels, return_counts=True)  # sorted
    classes = _requested_classes(classes, episode_classes)
    nf = _resolve_naflow(encoder, support, layers, compile_options, "explain_episode")

    sup_emb = _embed(nf, support, what="support images")
    qry_emb = _embed(nf, query, what="query images")
    _nonzero_rows(qry_emb, "query images")
    protos = torch.stack([sup_emb[labels == c].mean(0) for c in episode_classes])
    zero = episode_classes[~protos.any(1)].tolist()
    _nonzero_rows(protos, "", f"the prototype of class(es) {zero} (the mean of their support embeddings) is")
    logits = float(temperature) * F.normalize(qry_emb, dim=1) @ F.normalize(protos, dim=1).T
    cols = logits.argmax(1)
    prediction = episode_classes[cols]

    _check_prototypes(qry_emb, protos[cols], prediction, shots[cols])
    flow = nf(query, SimilarityTarget(protos[cols]))
    support_indices = [(labels == prediction[q]).nonzero()[:, 0] for q in range(query.shape[0])]
    support_flows: list[FlowResult] = [None] * query.shape[0]  # type: ignore[list-item]
    if explain_support:
        for c in torch.unique(prediction):
            qs = (prediction == c).nonzero()[:, 0]
            idx = (labels == c).nonzero()[:, 0]
            k = idx.shape[0]
            batch = support[idx].repeat(qs.shape[0], 1, 1, 1)  # [|qs|·K]: query-major
            refs = qry_emb[qs].repeat_interleave(k, dim=0)
            _check_pairs(sup_emb[idx].repeat(qs.shape[0], 1), refs, idx, qs, int(c))
            out = nf(batch, SimilarityTarget(refs))
            for j, q in enumerate(qs.tolist()):
                support_flows[q] = _take(out, torch.arange(j * k, (j + 1) * k, device="cpu"))
    else:
        support_flows = []

    result = EpisodeExplanation(
        classes=episode_classes,
        logits=logits,
        prediction=prediction,
        prototypes=protos,
        query_embeddings=qry_emb,
        support_embeddings=sup_emb,
        flow=flow,
        support_indices=support_indices,
        support_flows=support_flows,
        naflow=nf,
        query=query,
        support=support,
        support_labels=labels,
        temperature=float(temperature),
    )
    for c in classes:
        result.query_flow(c)
    return result


def _requested_classes(classes: object, episode_classes: Tensor) -> list[int]:
    """``explain_episode``'s ``classes=`` as a list of class labels of the episode (checked before any work)."""
    if classes is None:
        return []
    if isinstance(classes, str):
        if classes != "all":
            raise TargetError(f"classes must be 'all' or a list of class labels, got {classes!r}")
        return episode_classes.tolist()
    if isinstance(classes, Tensor):
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise TargetError(f"classes must be integer class labels, got a {classes.dtype} tensor")
        classes = classes.reshape(-1).tolist()
    elif isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        classes = [classes]
    elif not isinstance(classes, Sequence):
        raise TargetError(
            f"classes must be 'all', a class label or a list of class labels, got {type(classes).__name__} {classes!r}"
        )
    known = episode_classes.tolist()
    out = []
    for c in classes:
        if not isinstance(c, numbers.Integral) or isinstance(c, bool):
            raise TargetError(f"a class must be an int label, got {c!r}")
        if int(c) not in known:
            raise TargetError(f"class {int(c)} is not in this episode; its classes are {known}")
        out.append(int(c))
    return out

"""Similarity targets: explain an embedding model's similarity to a reference (paper §III-C, spec §5).

For a query embedding ``v^Q = f(x)`` (the model's output, ``Tensor[B, D]``) and a reference
embedding ``v^S``, a *metric* splits the similarity into per-channel contributions ``c_d`` with
``Σ_d c_d = sim(v^Q, v^S)``. The channel contribution weights are

    ω_d = c_d / |Σ_d c_d|                                   (paper Eq. 17/20)

with the denominator treated as a constant (detached), so ``Σ_d ω_d = sign(sim)`` and the
explained score's gradient is the similarity's gradient scaled by ``1/|sim|`` (Eq. 21).

Built-in metrics (:data:`METRICS`; add one with :func:`register_metric`):

* ``"cosine"`` (default): ``c_d = q̂_d ŝ_d`` with ``q̂ = v^Q/||v^Q||``, ``ŝ = v^S/||v^S||``. It
  works whether or not the model L2-normalises its output: normalising an already normalised
  embedding again changes neither its value nor its gradient (the projection ``I − q̂q̂ᵀ`` is
  idempotent).
* ``"dot"``: ``c_d = v^Q_d v^S_d`` (the paper's Eq. 17 literally; equals cosine for normalised
  embeddings up to the gradient's normalisation).
* ``"euclidean"`` (negative squared Euclidean distance): ``c_d = −(v^Q_d − v^S_d)²``, so
  ``Σ_d ω_d = −1`` and the explained score rises as the query moves towards the reference.

Example:
    >>> import torch
    >>> target = SimilarityTarget(torch.tensor([1.0, 0.0, 1.0]))
    >>> out = torch.tensor([[2.0, 5.0, 2.0]])
    >>> target.weights(out).sum(1)  # Σ_d ω_d = sign(v^Q·v^S)
    tensor([1.])
    >>> target.similarity(out)  # the cosine similarity itself
    tensor([0.4924])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, InputTypeError, TargetError

__all__ = ["SimilarityTarget", "METRICS", "register_metric"]

Metric = Callable[[Tensor, Tensor], Tensor]
METRICS: dict[str, Metric] = {}


def register_metric(name: str, contributions: Metric) -> Metric:
    """Register ``contributions(query [B, D], reference [B, D]) -> Tensor[B, D]``: the per-channel
    terms ``c_d`` whose sum is the similarity. Gradients must flow through ``query``."""
    if not isinstance(name, str):
        raise InputTypeError(f"register_metric: the metric name must be a str, got {type(name).__name__} {name!r}")
    if not name:
        raise ConfigError("register_metric: the metric name is empty; give the metric a name")
    if not callable(contributions):
        raise InputTypeError(
            f"register_metric: contributions must be a function (query [B, D], reference [B, D]) -> Tensor[B, D], "
            f"got {type(contributions).__name__}"
        )
    if name in METRICS:
        raise ConfigError(f"a similarity metric named {name!r} is already registered")
    METRICS[name] = contributions
    return contributions


register_metric("cosine", lambda q, s: F.normalize(q, dim=1) * F.normalize(s, dim=1))


def similarity_is_zero(c: Tensor) -> Tensor:
    """Per pair (``c``: contributions ``[B, D]``): ``Σ c`` is 0 up to rounding, ``|Σ c| ≤ 1e-6 Σ |c|``.

    Then the weights ω = c / |Σ c| are undefined (orthogonal embeddings, for the cosine).
    """
    return c.sum(1).abs() <= 1e-6 * c.abs().sum(1)


def cosine_at_extremum(query: Tensor, reference: Tensor, stored: torch.dtype | None = None) -> Tensor:
    """Per pair of embeddings (``Tensor[B, D]`` each): the same or opposite directions up to float rounding.

    That is ``min(‖q̂ − r̂‖, ‖q̂ + r̂‖) ≤ √eps`` for the unit vectors (3.5e-4 in float32): the query
    is the reference (or a copy), as when an image is compared with itself. There the cosine is at
    its extremum, its gradient is 0, and ω would explain rounding. The same image embedded in
    another batch moves by about 1e-6; distinct images are further apart, however close their
    cosine is to 1 (decision 23). The test is on the distance, not on ``1 − |cos|``, which float32
    rounds to 0 for directions up to about 3e-4 apart. ``stored``: the dtype the reference was
    kept in, if coarser (a bfloat16 copy of an embedding is about 2e-3 from it): then the
    threshold is at least 4 of its eps.
    """
    q, r = F.normalize(query.detach(), dim=1), F.normalize(reference.detach(), dim=1)
    distance = torch.minimum((q - r).norm(dim=1), (q + r).norm(dim=1))
    limit = torch.finfo(distance.dtype).eps ** 0.5
    if stored is not None and stored.is_floating_point:
        limit = max(limit, 4 * torch.finfo(stored).eps)
    return distance <= limit


register_metric("dot", lambda q, s: q * s)
register_metric("euclidean", lambda q, s: -((q - s) ** 2))


class SimilarityTarget:
    """The channel-contribution score ``Σ_d ω_d`` of the output embedding against ``reference``.

    Args:
        reference: ``Tensor[D]`` (one reference for every sample) or ``Tensor[B, D]`` (one per
            sample). It is detached and moved to the output's device and dtype.
        metric: ``"cosine"`` (default), ``"dot"``, ``"euclidean"`` or a registered name (a str;
            register your own function with :func:`register_metric` first).

    Use it as a flow target: ``nf(x, SimilarityTarget(v_s))``. ``flow.scores`` is ``Σ_d ω_d``
    (``±1``); :meth:`similarity` gives the similarity itself and :meth:`weights` the ω.
    """

    def __init__(self, reference: Tensor, metric: str = "cosine") -> None:
        if not isinstance(reference, Tensor):
            raise TargetError(
                f"the reference must be an embedding tensor [D] or [B, D], got {type(reference).__name__}"
            )
        if reference.dim() not in (1, 2) or reference.shape[-1] == 0:
            raise TargetError(f"the reference must be an embedding [D] or [B, D], got shape {tuple(reference.shape)}")
        if not reference.is_floating_point():
            raise TargetError(f"the reference must be a floating-point tensor, got {reference.dtype}")
        if not bool(torch.isfinite(reference).all()):
            raise TargetError("the reference embedding contains NaN or Inf values")
        if not isinstance(metric, str):
            raise InputTypeError(
                f"metric must be the name (a str) of a similarity metric, one of {sorted(METRICS)}, got "
                f"{type(metric).__name__}; to use your own function, register it first with "
                "naflow_fx.similarity.register_metric(name, contributions) and pass the name"
            )
        if metric not in METRICS:
            raise ConfigError(f"unknown similarity metric {metric!r}; choose one of {sorted(METRICS)}")
        self.reference = reference.detach()
        self.metric = metric

    def __repr__(self) -> str:
        return f"SimilarityTarget(reference={tuple(self.reference.shape)}, metric={self.metric!r})"

    def _pair(self, output: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(output, Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TargetError(
                f"a similarity target needs the model to output embeddings of shape [B, D]; got {shape}. "
                "Explain the embedding model (e.g. the network up to its pooled features)."
            )
        if not output.is_floating_point():
            raise TargetError(
                f"a similarity target needs floating-point embeddings, but the model's output is {output.dtype}"
            )
        batch, dim = output.shape
        ref = self.reference.to(device=output.device, dtype=output.dtype)
        if ref.is_inference():  # made under the caller's torch.inference_mode(): autograd cannot save it
            ref = ref.clone()  # (a flow runs outside inference mode, so the clone is an ordinary tensor)
        if not bool(torch.isfinite(ref).all()):
            raise TargetError(
                f"the reference embedding overflows the model's {output.dtype} (its largest magnitude is "
                f"{float(self.reference.abs().max()):.3g}): rescale it"
            )
        if ref.shape[-1] != dim:
            raise TargetError(f"the reference has {ref.shape[-1]} dimensions but the model's embedding has {dim}")
        if ref.dim() == 1:
            ref = ref.expand(batch, dim)
        elif ref.shape[0] == 1 and batch != 1:
            ref = ref.expand(batch, dim)
        elif ref.shape[0] != batch:
            raise TargetError(f"got {ref.shape[0]} references for a batch of {batch}: pass one per sample, or one [D]")
        return output, ref

    def contributions(self, output: Tensor) -> Tensor:
        """``c_d`` per sample (``Tensor[B, D]``), with gradients through ``output``."""
        query, ref = self._pair(output)
        c = METRICS[self.metric](query, ref)
        if not isinstance(c, Tensor) or c.shape != query.shape:
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise TargetError(
                f"the similarity metric {self.metric!r} returned {got}; a metric must return the per-channel "
                f"contributions c_d as a Tensor [B, D] = {list(query.shape)} (see register_metric)"
            )
        return c

    def similarity(self, output: Tensor) -> Tensor:
        """``sim(v^Q, v^S) = Σ_d c_d`` per sample (``Tensor[B]``, detached)."""
        return self.contributions(output).detach().sum(1)

    def weights(self, output: Tensor) -> Tensor:
        """The channel contribution weights ω (``Tensor[B, D]``, detached) for inspection."""
        return self._omega(output).detach()

    def _omega(self, output: Tensor) -> Tensor:
        c = self.contributions(output)
        sim = c.detach().sum(1, keepdim=True)
        zero = similarity_is_zero(c.detach())
        if self.metric == "euclidean":
            # Every c_d ≤ 0, so |Σ c| = Σ |c| and the test above never fires: compare the distance
            # with the embeddings' size instead. Closer than about 1e-4 of their norm, the query is
            # the reference up to float rounding (the same image embedded in another batch moves
            # by ~1e-6), and ω would explain that rounding.
            query, ref = self._pair(output)
            zero = sim[:, 0].abs() <= 1e-8 * ((query.detach() ** 2).sum(1) + (ref**2).sum(1))
        if self._cosine_to_reference():
            # At cosine ±1 (the query is the reference, or its mirror image, up to float rounding)
            # the cosine is at its extremum: its gradient is 0, and ω would explain rounding.
            query, ref = self._pair(output)
            flat = cosine_at_extremum(query, ref, self.reference.dtype)
            if bool(flat.any()):
                i = int(flat.nonzero()[0])
                raise TargetError(
                    self._extremum_message(i, float(F.cosine_similarity(query[i].detach(), ref[i], dim=0)))
                )
        if bool(zero.any()):
            i = int(zero.reshape(-1).nonzero()[0])
            raise TargetError(
                f"the {self.metric} similarity of sample {i} to its reference is 0, so the channel contribution "
                f"weights ω = c / |Σ c| are undefined; {self._zero_reason(output, i)}"
            )
        return c / sim.abs()

    def _cosine_to_reference(self) -> bool:
        """The score is a positive multiple of ``cos(output, reference)`` (its gradient is 0 at ±1)."""
        return self.metric == "cosine"

    def _extremum_message(self, i: int, cos: float) -> str:
        """The error for sample ``i``, whose cosine ``cos`` to its reference is ±1 up to rounding."""
        return (
            f"the cosine similarity of sample {i} to its reference is {cos:.8g}, ±1 up to float rounding, as when "
            "the query image is the reference itself: the cosine is at its extremum there, so its gradient is 0 "
            "and there is nothing to explain; choose another reference"
        )

    def _zero_reason(self, output: Tensor, i: int) -> str:
        """Why sample ``i``'s similarity is 0, and what to do (for the error message)."""
        query, ref = self._pair(output)
        q, r = query[i].detach(), ref[i]
        if self.metric in ("cosine", "dot") and not bool(r.any()):
            return "the reference embedding is all zeros: pass a non-zero reference"
        if self.metric in ("cosine", "dot") and not bool(q.any()):
            return (
                "the model embeds this input to the zero vector, so it is not similar or dissimilar to anything: "
                "check the input, or explain an embedding that is not zero"
            )
        if self.metric == "euclidean" and bool((q == r).all()):
            return "the query embedding equals the reference (distance 0): choose another reference"
        if self.metric == "euclidean":
            distance, norm = float((q - r).norm()), float(max(q.norm(), r.norm()))
            return (
                f"the query embedding is within float rounding of the reference (distance {distance:.2g}, norm "
                f"{norm:.2g}), as when the query image is the reference itself: choose another reference"
            )
        return "choose another reference"

    def __call__(self, output: Tensor) -> Tensor:
        """The explained score ``Σ_d ω_d`` per sample (``Tensor[B]``), denominator detached."""
        return self._omega(output).sum(1)

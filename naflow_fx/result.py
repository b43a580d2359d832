"""Per-layer results: ``LayerMaps`` (any method) and ``FlowResult`` (NAFlow, with BPFMs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, InputTypeError
from .solvers import SolveRecord

__all__ = ["LayerMaps", "FlowResult", "normalize_maps", "concat"]


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each ``[h, w]`` map of a ``[..., h, w]`` tensor to [0, 1] (constant maps → 0)."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / torch.where(span > eps, span, 1), torch.zeros_like(flat))
    return out.reshape(maps.shape)


@dataclass
class LayerMaps:
    """One attention map per layer: ``maps[name]`` is ``Tensor[B, h, w]`` at the layer's resolution.

    Attributes:
        layers: layer names, shallow → deep.
        maps: layer name → ``Tensor[B, h, w]`` (float32, on the input's device).
        output: the model's output for the batch.
        scores: the explained score per sample, ``Tensor[B]``.
        classes: the explained class per sample (``LongTensor[B]``) for class targets, else None.
        input_size: ``(H, W)`` of the input batch.
        method: ``"naflow"``, ``"gradcam"`` or ``"layercam"``.
    """

    layers: list[str]
    maps: dict[str, Tensor]
    output: Tensor
    scores: Tensor
    classes: Tensor | None
    input_size: tuple[int, int]
    method: str

    def upsample(self, size: tuple[int, int] | None = None, normalize: bool = True) -> Tensor:
        """All maps as ``Tensor[B, L, H, W]``: bilinear to ``size`` (default: the input size), each
        map min-max normalised to [0, 1] when ``normalize``."""
        size = tuple(size) if size is not None else self.input_size
        ups = [
            F.interpolate(self.maps[name][:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
            for name in self.layers
        ]
        out = torch.stack(ups, 1)
        return normalize_maps(out) if normalize else out


@dataclass
class FlowResult(LayerMaps):
    """A NAFlow result: maps plus the back-propagated feature maps, coefficients and diagnostics.

    Attributes:
        bpfm: layer name → ``Tensor[B, C, h, w]``, the back-propagated feature map ``B_v``.
        coefficients: layer name → ``Tensor[B, C, h, w]``, ``Λ_v = ∂s/∂a_v``.
        diagnostics: one :class:`~naflow_fx.solvers.SolveRecord` per inverse step, keyed by the
            layer whose inverse it is (deep → shallow).
    """

    bpfm: dict[str, Tensor] = field(default_factory=dict)
    coefficients: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, SolveRecord] = field(default_factory=dict)

    def format_diagnostics(self) -> str:
        """The diagnostics as an aligned text table."""
        head = (
            f"{'inverse of':<28} {'rule':<26} {'method':<12} {'iters':>5} {'residual':>10} {'damping λ':>10} {'sec':>7}"
        )
        rows = [head, "-" * len(head)]
        for layer, r in self.diagnostics.items():
            rows.append(
                f"{layer:<28} {r.rule:<26} {r.method:<12} {r.iterations:>5} {r.residual:>10.2e} "
                f"{r.damping:>10.2e} {r.seconds:>7.3f}" + ("" if r.converged else "  (not converged)")
            )
        return "\n".join(rows)


def concat(results: list[LayerMaps]) -> LayerMaps:
    """Join per-batch results of the same explainer along the batch dimension.

    For flows, BPFMs and coefficients are joined too, and each step's diagnostics are merged:
    iterations, residual and damping are the worst over the parts, seconds their sum.
    """
    if not results:
        raise ValueError("concat needs at least one result")
    first = results[0]
    cat = lambda field_: torch.cat([getattr(r, field_) for r in results])  # noqa: E731
    classes = None if first.classes is None else torch.cat([r.classes for r in results])
    common = dict(
        layers=list(first.layers),
        maps={n: torch.cat([r.maps[n] for r in results]) for n in first.layers},
        output=cat("output"),
        scores=cat("scores"),
        classes=classes,
        input_size=first.input_size,
        method=first.method,
    )
    if not isinstance(first, FlowResult):
        return LayerMaps(**common)
    diagnostics = {}
    for key, rec in first.diagnostics.items():
        parts = [r.diagnostics[key] for r in results]
        diagnostics[key] = replace(
            rec,
            iterations=max(p.iterations for p in parts),
            residual=max(p.residual for p in parts),
            damping=max(p.damping for p in parts),
            converged=all(p.converged for p in parts),
            seconds=sum(p.seconds for p in parts),
        )
    return FlowResult(
        **common,
        bpfm={n: torch.cat([r.bpfm[n] for r in results]) for n in first.bpfm},
        coefficients={n: torch.cat([r.coefficients[n] for r in results]) for n in first.coefficients},
        diagnostics=diagnostics,
    )


def non_finite_layers(maps: dict[str, Tensor], layers: list[str]) -> list[str]:
    """The layers (in ``layers``' order) whose map holds a NaN or Inf, with one device sync."""
    finite = torch.stack([torch.isfinite(maps[n]).all() for n in layers]).tolist() if layers else []
    return [n for n, ok in zip(layers, finite) if not ok]


def check_layer_maps(result: object, fn: str, what: str = "result") -> LayerMaps:
    """``result`` if it is a :class:`LayerMaps` (a :class:`FlowResult` is one), else an :class:`InputTypeError`."""
    if not isinstance(result, LayerMaps):
        raise InputTypeError(
            f"{fn}: {what} must be a LayerMaps (a FlowResult is one: what nf(x), nf.gradcam(x) or "
            f"nf.layercam(x) return), got {type(result).__name__}"
        )
    return result


def check_maps(res: LayerMaps, layers, batch: int, fn: str, what: str, per: str, hint: str) -> None:
    """Each of ``layers``' maps in ``res`` is a finite real ``Tensor[batch, h, w]``, else an :class:`InputError`.

    ``per`` names what there is one of per map (``"images"``, ``"masks"``); ``hint`` says what to pass.
    """
    for name in layers:
        if name not in res.maps:
            raise InputError(f"{fn}: {what} lists layer {name!r} but has no map for it")
        m = res.maps[name]
        if not isinstance(m, Tensor) or m.dim() != 3 or 0 in m.shape[1:] or m.is_complex():
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise InputError(f"{fn}: the map of layer {name!r} in {what} must be a Tensor [B, h, w], got {got}")
        if m.shape[0] != batch:
            raise InputError(
                f"{fn}: there are {batch} {per} but {what} has {m.shape[0]} maps for layer {name!r}; {hint}"
            )
        if m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise InputError(f"{fn}: the map of layer {name!r} in {what} contains NaN or Inf values")

"""Scores of maps against ground truth: how much of each layer's attention lies on the object.

Example:
    >>> import torch
    >>> from naflow_fx import LayerMaps
    >>> maps = torch.zeros(2, 4, 4); maps[0] = 1.0; maps[1, :, 2:] = 1.0   # uniform; all on the right half
    >>> res = LayerMaps(["a"], {"a": maps}, torch.zeros(2, 2), torch.zeros(2), None, (8, 8), "naflow")
    >>> mask = torch.zeros(2, 8, 8, dtype=torch.bool); mask[:, :, 4:] = True   # the object: the right half
    >>> [round(v, 3) for v in energy_on_mask(res, mask)["a"].tolist()]
    [0.5, 0.938]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, InputTypeError
from .result import LayerMaps, check_layer_maps, check_maps

__all__ = ["energy_on_mask", "mask_energy"]


def _check_masks(masks: object, fn: str) -> Tensor:
    """``masks`` as ``float32 [B, H, W]`` in [0, 1]: ``[B, 1, H, W]`` loses its channel; anything else is an error."""
    if not isinstance(masks, Tensor):
        raise InputTypeError(f"{fn}: masks must be a torch.Tensor [B, H, W], got {type(masks).__name__}")
    shape = tuple(masks.shape)
    if masks.dim() == 4 and shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        hint = " (for one mask add a batch dimension with mask.unsqueeze(0))" if masks.dim() == 2 else ""
        raise InputError(f"{fn}: masks must be [B, H, W] or [B, 1, H, W], got shape {shape}{hint}")
    if 0 in shape:
        raise InputError(f"{fn}: masks is empty, shape {shape}")
    if masks.is_complex():
        raise InputError(f"{fn}: masks must be real (bool or values in [0, 1]), got {masks.dtype}")
    m = masks.to(torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise InputError(f"{fn}: masks contains NaN or Inf values")
    lo, hi = float(m.min()), float(m.max())
    if lo < 0 or hi > 1:
        raise InputError(
            f"{fn}: masks must be bool or in [0, 1], got values in [{lo:g}, {hi:g}]; "
            "for a 0–255 mask use masks > 127 (or masks / 255 for a soft mask)"
        )
    return m


def _check_result_maps(result: object, batch: int, fn: str, what: str = "result") -> LayerMaps:
    check_layer_maps(result, fn, what)
    hint = "pass one mask per image, in the order of the batch the result was computed for"
    check_maps(result, result.layers, batch, fn, what, "masks", hint)
    return result


def energy_on_mask(result: LayerMaps, masks: Tensor) -> dict[str, Tensor]:
    """Per layer, the share of each map's mass that falls on the mask: ``Tensor[B]`` in [0, 1].

    Each map (non-negative) is upsampled bilinearly to the mask's size; the share is
    ``Σ map·mask / Σ map`` (0 for an all-zero map). A uniform map scores the mask's area.

    Args:
        result: per-layer maps (a flow or a baseline).
        masks: ``bool Tensor[B, H, W]``, the object's pixels (or a soft mask with values in
            [0, 1]; ``[B, 1, H, W]`` is taken as ``[B, H, W]``). One mask per image of the
            result's batch; anything else is an :class:`~naflow_fx.InputError` (an
            :class:`~naflow_fx.InputTypeError` if not a tensor).

    Example:
        >>> from naflow_fx import LayerMaps
        >>> ones = torch.ones(1, 2, 2)   # a uniform map
        >>> res = LayerMaps(["a"], {"a": ones}, torch.zeros(1, 2), torch.zeros(1), None, (4, 4), "naflow")
        >>> mask = torch.zeros(1, 1, 4, 4); mask[..., :2] = 1.0   # [B, 1, H, W], the left half
        >>> energy_on_mask(res, mask)["a"].tolist()
        [0.5]
        >>> energy_on_mask(res, mask * 255)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        naflow_fx.errors.InputError: energy_on_mask: masks must be bool or in [0, 1], got values in [0, 255]; ...
    """
    m = _check_masks(masks, "energy_on_mask")
    _check_result_maps(result, m.shape[0], "energy_on_mask")
    size = tuple(m.shape[-2:])
    out = {}
    for name in result.layers:
        up = F.interpolate(result.maps[name][:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        up = up.clamp_min(0).to(m.device)
        total = up.flatten(1).sum(1)
        share = (up * m).flatten(1).sum(1) / torch.where(total > 0, total, torch.ones_like(total))
        out[name] = torch.where(total > 0, share, torch.zeros_like(share))
    return out


def mask_energy(results: LayerMaps | Sequence[LayerMaps], masks: Tensor, labels: Sequence[str] | None = None) -> str:
    """A text table: one row per layer, one column per result, the mean share of mass on the mask.

    The last row gives the mask's mean area, the share a uniform map would get. ``results`` is a
    list of :class:`~naflow_fx.LayerMaps` (or one), all over the same layers; ``labels`` gives
    one column title per result (default: their ``method``); ``masks`` as in :func:`energy_on_mask`.
    """
    fn = "mask_energy"
    if isinstance(results, LayerMaps):
        results = [results]
    elif isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise InputTypeError(f"{fn}: results must be a list of LayerMaps, got {type(results).__name__}")
    results = list(results)
    if not results:
        raise InputError(f"{fn}: results is empty; pass a list of LayerMaps, e.g. [flow, gradcam]")
    m = _check_masks(masks, fn)
    for i, r in enumerate(results):
        _check_result_maps(r, m.shape[0], fn, f"results[{i}]")
        missing = [name for name in results[0].layers if name not in r.maps]
        if missing:
            raise InputError(f"{fn}: results[{i}] ({r.method}) has no map for layer(s) {missing} of results[0]")
    if labels is None:
        labels = [r.method for r in results]
    else:
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise InputTypeError(f"{fn}: labels must be a list of str, one per result, got {type(labels).__name__}")
        labels = list(labels)
        if len(labels) != len(results):
            raise InputError(f"{fn}: labels has {len(labels)} entries for {len(results)} results; pass one per result")
    shares = [energy_on_mask(r, m) for r in results]
    head = f"{'layer':<28}" + "".join(f"{lab:>10}" for lab in labels)
    rows = [head, "-" * len(head)]
    for name in results[0].layers:
        rows.append(f"{name:<28}" + "".join(f"{float(s[name].mean()):>10.2f}" for s in shares))
    area = float(m.flatten(1).mean(1).mean())
    rows.append(f"{'(uniform map: mask area)':<28}" + "".join(f"{area:>10.2f}" for _ in labels))
    return "\n".join(rows)

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

from .result import LayerMaps

__all__ = ["energy_on_mask", "mask_energy"]


def energy_on_mask(result: LayerMaps, masks: Tensor) -> dict[str, Tensor]:
    """Per layer, the share of each map's mass that falls on the mask: ``Tensor[B]`` in [0, 1].

    Each map (non-negative) is upsampled bilinearly to the mask's size; the share is
    ``Σ map·mask / Σ map`` (0 for an all-zero map). A uniform map scores the mask's area.

    Args:
        result: per-layer maps (a flow or a baseline).
        masks: ``bool Tensor[B, H, W]``, the object's pixels.
    """
    size = tuple(masks.shape[-2:])
    m = masks.to(torch.float32)
    out = {}
    for name in result.layers:
        up = F.interpolate(result.maps[name][:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        up = up.clamp_min(0).to(m.device)
        total = up.flatten(1).sum(1)
        share = (up * m).flatten(1).sum(1) / torch.where(total > 0, total, torch.ones_like(total))
        out[name] = torch.where(total > 0, share, torch.zeros_like(share))
    return out


def mask_energy(results: Sequence[LayerMaps], masks: Tensor, labels: Sequence[str] | None = None) -> str:
    """A text table: one row per layer, one column per result, the mean share of mass on the mask.

    The last row gives the mask's mean area, the share a uniform map would get.
    """
    labels = list(labels) if labels is not None else [r.method for r in results]
    shares = [energy_on_mask(r, masks) for r in results]
    head = f"{'layer':<28}" + "".join(f"{lab:>10}" for lab in labels)
    rows = [head, "-" * len(head)]
    for name in results[0].layers:
        rows.append(f"{name:<28}" + "".join(f"{float(s[name].mean()):>10.2f}" for s in shares))
    area = float(masks.float().flatten(1).mean(1).mean())
    rows.append(f"{'(uniform map: mask area)':<28}" + "".join(f"{area:>10.2f}" for _ in labels))
    return "\n".join(rows)

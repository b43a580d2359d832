"""Figures: per-layer map grids and overlays (matplotlib, headless).

Requires the ``vision`` extra (matplotlib).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .result import LayerMaps, normalize_maps

__all__ = ["overlay", "flow_grid", "short_layer_name", "atomic_savefig"]


def short_layer_name(name: str, width: int = 14) -> str:
    """A compact column title: ``"features.10"`` stays, ``"layer1.0.conv1"`` → ``"l1.0.conv1"``."""
    short = name.replace("features.", "f.").replace("layer", "l").replace("classifier.", "c.")
    return short if len(short) <= width else "…" + short[-(width - 1) :]


def _image_to_numpy(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` tensor (any range) → ``[H, W, 3]`` float array in [0, 1] for display."""
    img = image.detach().float().cpu()
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    img = img.numpy()
    if img.ndim == 2 or img.shape[-1] == 1:
        img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def overlay(image: Tensor, heatmap: Tensor, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """Blend a map (any resolution, any range) onto an image: ``[H, W, 3]`` float array in [0, 1].

    Example:
        >>> overlay(torch.rand(3, 8, 8), torch.rand(4, 4)).shape
        (8, 8, 3)
    """
    import matplotlib

    img = _image_to_numpy(image)
    h, w = img.shape[:2]
    m = heatmap.detach().float()
    m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = normalize_maps(m).cpu().numpy()
    colored = matplotlib.colormaps[cmap](m)[..., :3]
    return (1 - alpha) * img + alpha * colored


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> None:
    """Save a figure through a temporary file and an atomic rename (no half-written PNGs)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=os.path.splitext(path)[1] or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def flow_grid(
    images: Tensor,
    results: LayerMaps | Sequence[LayerMaps],
    path: str | os.PathLike | None = None,
    *,
    layers: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    cell: float = 1.15,
    dpi: int = 150,
):
    """One row per image (and per method), one column per layer, maps overlaid on the image.

    Args:
        images: ``Tensor[B, C, H, W]`` (displayed min-max scaled).
        results: one :class:`~naflow_fx.LayerMaps` (e.g. a flow) or several (e.g. NAFlow and
            Grad-CAM on the same layers); each image gets one row per result.
        path: where to save the PNG (atomically); None to only return the figure.
        layers: the columns (default: every layer of the first result).
        row_labels: one label per result (default: the results' ``method``).

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, LayerMaps) else list(results)
    layers = list(layers) if layers is not None else list(results[0].layers)
    labels = list(row_labels) if row_labels is not None else [r.method for r in results]
    batch = images.shape[0]
    rows, cols = batch * len(results), len(layers) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.3), squeeze=False)
    for b in range(batch):
        for k, res in enumerate(results):
            r = b * len(results) + k
            ax = axes[r, 0]
            ax.imshow(_image_to_numpy(images[b]))
            cls = "" if res.classes is None else f" c={int(res.classes[b])}"
            ax.set_ylabel(f"{labels[k]}{cls}", fontsize=6)
            for j, name in enumerate(layers):
                axes[r, j + 1].imshow(overlay(images[b], res.maps[name][b], alpha=alpha, cmap=cmap))
                if r == 0:
                    axes[r, j + 1].set_title(short_layer_name(name), fontsize=6)
            if r == 0:
                axes[r, 0].set_title("input", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
        plt.close(fig)
    return fig

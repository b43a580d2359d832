"""Figures: per-layer map grids and overlays (matplotlib, headless).

Requires the ``vision`` extra (matplotlib).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._io import atomic_write
from .result import LayerMaps, normalize_maps

__all__ = ["overlay", "flow_grid", "flow_gif", "short_layer_name", "atomic_savefig"]


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))


def flow_grid(
    images: Tensor,
    results: LayerMaps | Sequence[LayerMaps],
    path: str | os.PathLike | None = None,
    *,
    layers: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
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
        class_names: class index → name, to label each row with the explained class.

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
            cls = ""
            if res.classes is not None:
                c = int(res.classes[b])
                cls = f"\n{class_names[c]}" if class_names is not None and 0 <= c < len(class_names) else f" c={c}"
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


def flow_gif(
    images: Tensor,
    result: LayerMaps,
    path: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    size: int = 192,
    alpha: float = 0.55,
    cmap: str = "inferno",
    duration: int = 350,
) -> str:
    """An animated GIF of the flow: one frame per layer (shallow → deep), the batch side by side.

    Each frame shows every image with that layer's map overlaid and the layer's name on top.

    Args:
        images: ``Tensor[B, C, H, W]``.
        result: the per-layer maps (a flow or a baseline).
        path: the ``.gif`` to write (atomically).
        layers: the frames (default: every layer of ``result``).
        size: side of each image in the GIF, in pixels.
        duration: milliseconds per frame (the last frame is held three times as long).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> from naflow_fx import LayerMaps
        >>> res = LayerMaps(["a", "b"], {"a": torch.rand(2, 4, 4), "b": torch.rand(2, 2, 2)}, torch.zeros(2, 3),
        ...                 torch.zeros(2), None, (16, 16), "naflow")
        >>> from PIL import Image
        >>> gif = flow_gif(torch.rand(2, 3, 16, 16), res, tempfile.mkdtemp() + "/flow.gif", size=32)
        >>> Image.open(gif).n_frames, Image.open(gif).size
        (2, (64, 46))
    """
    from PIL import Image, ImageDraw

    layers = list(layers) if layers is not None else list(result.layers)
    if not layers:
        raise ValueError("flow_gif needs at least one layer")
    batch = images.shape[0]
    header = 14
    frames = []
    small = torch.nn.functional.interpolate(images.detach().float().cpu(), size=(size, size), mode="bilinear")
    for name in layers:
        frame = Image.new("RGB", (size * batch, size + header), "white")
        for b in range(batch):
            rgb = overlay(small[b], result.maps[name][b].cpu(), alpha=alpha, cmap=cmap)
            frame.paste(Image.fromarray((rgb * 255).round().astype(np.uint8)), (b * size, header))
        ImageDraw.Draw(frame).text((3, 1), f"{result.method}: {name}", fill="black")
        frames.append(frame)
    durations = [duration] * (len(frames) - 1) + [duration * 3]

    def save(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    return atomic_write(path, save)

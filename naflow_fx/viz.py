"""Figures: per-layer map grids and overlays (matplotlib, headless).

Requires the ``vision`` extra (matplotlib).
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ._io import atomic_write, check_parent, existing_folder, write_target
from .errors import InputError, InputTypeError, optional
from .result import LayerMaps, _check_room, _varies, check_layer_maps, check_maps, resized_normalized

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["overlay", "flow_grid", "flow_gif", "short_layer_name", "spread_layers", "atomic_savefig"]


def _abbreviate(name: str) -> str:
    """Whole dotted parts only: a leading ``features`` / ``classifier`` → ``f`` / ``c``, ``layer3`` → ``l3``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in ("features", "classifier"):
        parts[0] = parts[0][0]
    return ".".join(re.sub(r"^layer(\d+)$", r"l\1", part) for part in parts)


def _truncate(short: str, width: int) -> str:
    """``short`` if it fits in ``width``, else "…" and its end: the whole dotted parts that fit
    (``"…l1.0.relu#2"``, not ``"…l.l1.0.relu#2"``), or the last characters when no part does."""
    if len(short) <= width:
        return short
    parts = short.split(".")
    for k in range(len(parts) - 1, 0, -1):
        tail = ".".join(parts[-k:])
        if len(tail) <= width - 1:
            return "…" + tail
    return "…" + short[-(width - 1) :]


def short_layer_name(name: str, width: int = 14, *, others: Iterable[str] = ()) -> str:
    """A compact column title: ``"features.10"`` stays, ``"layer1.0.conv1"`` → ``"l1.0.conv1"``.

    A name longer than ``width`` keeps its end, in whole dotted parts where one fits
    (``"…downsample.0"``). ``others`` are the other names of the same figure: when the short name
    of ``name`` would equal that of one of them, it keeps more of its leading path, one dotted part
    at a time, until it differs from theirs (the same parts count of every other name), so the
    titles of one figure are unique.

    Example:
        >>> short_layer_name("layer2.0.downsample.0"), short_layer_name("layer1.0.conv1")
        ('…downsample.0', 'l1.0.conv1')
        >>> names = ["layer2.0.downsample.0", "layer4.0.downsample.0", "layer4.1.conv2"]
        >>> [short_layer_name(n, others=names) for n in names]
        ['l2.0.downsample.0', 'l4.0.downsample.0', 'l4.1.conv2']
    """
    short = _abbreviate(name)
    label = _truncate(short, width)
    others = {_abbreviate(o) for o in others if o != name}
    if label not in {_truncate(o, width) for o in others}:
        return label  # no collision: the usual title
    # "…" + the last k dotted parts: longer than every usual title, so it can only equal the title
    # of another name cut at the same k parts (same count of dots), which is what is compared
    parts = short.split(".")
    for k in range(1, len(parts)):
        tail = ".".join(parts[-k:])
        if len(tail) >= len(label) and all(tail != ".".join(o.split(".")[-k:]) for o in others if o.count(".") >= k):
            return "…" + tail
    return short if short not in others else name  # the whole abbreviation; the name itself if another has it


def _column_titles(layers: Sequence[str]) -> list[str]:
    """The titles of a figure's layer columns: :func:`short_layer_name`, unique across the figure."""
    titles = [short_layer_name(name, others=layers) for name in layers]
    return titles if len(set(titles)) == len(set(layers)) else list(layers)


# ------------------------------------------------------------------ argument checks
# Every public function checks its arguments up front, before any figure or frame is made, so bad
# input is one InputError / InputTypeError saying what was passed and what is expected.


def _check_number(
    value: object, name: str, fn: str, *, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    """``value`` is a real number (not a bool) in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{fn}: {name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        hi = "" if high == math.inf else f" and <= {high:g}"
        raise InputError(f"{fn}: {name} must be {lo}{hi}, got {value!r}")


def _check_cmap(cmap: object, fn: str) -> None:
    matplotlib = optional("matplotlib", "naflow_fx.viz")

    if not isinstance(cmap, str):
        raise InputTypeError(f"{fn}: cmap must be a matplotlib colormap name (a str), got {type(cmap).__name__}")
    if cmap not in matplotlib.colormaps:
        raise InputError(
            f"{fn}: unknown cmap {cmap!r}: use a matplotlib colormap name such as 'inferno', 'viridis', 'magma' or "
            "'jet' (the full list is matplotlib.colormaps)"
        )


def _check_finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{what} contains NaN or Inf values")


def _check_images(images: object, fn: str) -> Tensor:
    """A displayable batch ``[B, C, H, W]`` with C = 1 or 3, B, H, W > 0, finite."""
    if not isinstance(images, Tensor):
        raise InputTypeError(f"{fn}: images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dim() != 4:
        hint = " (for one image add a batch dimension with image.unsqueeze(0))" if images.dim() == 3 else ""
        raise InputError(f"{fn}: images must be a batch [B, C, H, W], got shape {shape}{hint}")
    if images.shape[1] not in (1, 3):
        hint = "; for RGBA drop the alpha channel with images[:, :3]" if images.shape[1] == 4 else ""
        raise InputError(f"{fn}: images must have 1 (grey) or 3 (RGB) channels, got shape {shape}{hint}")
    if 0 in shape:
        raise InputError(f"{fn}: images is empty, shape {shape}")
    if images.is_complex():
        raise InputError(f"{fn}: images must be real, got {images.dtype}")
    _check_finite(images, f"{fn}: images")
    return images


def _check_layers(layers: object, results: Sequence[LayerMaps], fn: str) -> list[str]:
    """The column / frame names: every one must be a layer of every result."""
    if isinstance(layers, str):
        raise InputTypeError(f"{fn}: layers must be a list of layer names, got the str {layers!r}; use [{layers!r}]")
    if layers is None:
        layers = list(results[0].layers)
    else:
        try:
            layers = list(layers)
        except TypeError:
            raise InputTypeError(f"{fn}: layers must be a list of layer names, got {type(layers).__name__}") from None
    for name in layers:
        if not isinstance(name, str):
            raise InputTypeError(f"{fn}: layers must be layer names (str), got {type(name).__name__} {name!r}")
    for i, res in enumerate(results):
        missing = [name for name in layers if name not in res.maps]
        if missing:
            which = "the result" if len(results) == 1 else f"results[{i}] ({res.method})"
            raise InputError(f"{fn}: unknown layer(s) {missing} for {which}; its layers are {list(res.layers)}")
    return layers


def _check_maps(res: LayerMaps, layers: Sequence[str], batch: int, fn: str, what: str = "the result") -> None:
    """Each map is a finite ``Tensor[batch, h, w]`` (one map per image)."""
    hint = "pass the images the result was computed for (same batch, same order)"
    check_maps(res, layers, batch, fn, what, "images", hint)
    if res.classes is not None and (not isinstance(res.classes, Tensor) or res.classes.numel() != batch):
        if isinstance(res.classes, Tensor):
            n = res.classes.numel()
            raise InputError(f"{fn}: {what} has {n} classes for {batch} images; pass the images it was computed for")
        raise InputTypeError(
            f"{fn}: {what}'s classes must be a Tensor of class indices (one per image) or None, got "
            f"{type(res.classes).__name__}"
        )


def _check_shape(res: LayerMaps, image_hw: tuple[int, int], fn: str, what: str = "the result") -> None:
    """The images have the shape (height to width) of the inputs the maps were computed for, so the maps fit them."""
    if res.input_size is None:
        return
    big_h, big_w = (int(v) for v in res.input_size)
    h, w = image_hw
    if abs(h * big_w - w * big_h) > 0.02 * max(h * big_w, w * big_h):  # more than rounding apart
        raise InputError(
            f"{fn}: the images are {h}×{w} but {what} was computed for {big_h}×{big_w} inputs, so its maps would be "
            "stretched onto them; pass the images it was computed for (the same images resized to the same "
            "shape are fine)"
        )


def _check_labels(labels: object, name: str, count: int, per: str, fn: str) -> None:
    """``labels`` is None or a list of ``count`` labels, one per ``per`` (a result, an image)."""
    if labels is None:
        return
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        got = f"{type(labels).__name__} {labels!r}"
        raise InputTypeError(f"{fn}: {name} must be a list of str, one per {per}, got {got}")
    if len(labels) != count:
        raise InputError(f"{fn}: {name} has {len(labels)} label(s) for {count} {per}(s); pass one label per {per}")


def _check_path(path: object, fn: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"{fn}: path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise InputError(f"{fn}: path must be a non-empty file path, got {path!r}")
    if os.path.isdir(path):
        raise InputError(f"{fn}: path {path!r} is a folder; pass a file inside it, e.g. {os.path.join(path, 'x')!r}")
    if path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise InputError(f"{fn}: path {path!r} ends with a separator, so it names a folder; pass a file inside it")
    check_parent(path, fn)
    try:
        write_target(path)  # a device, pipe or read-only file, refused before anything is drawn
    except InputError as exc:
        raise InputError(f"{fn}: {exc}") from None
    return path


def _write_file(path: str, write: Callable[[str], None], fn: str, what: str) -> str:
    """:func:`~naflow_fx._io.atomic_write` with errors that name the user's file, not the hidden temporary one.

    A folder that cannot be written (no permission, read-only file system) or a parent that is a
    file is an :class:`InputError`; any other failure (disk full, I/O error) an ``OSError`` whose
    message says it was writing ``what``. No file is half-written either way.
    """
    try:
        return atomic_write(path, write)
    except InputError as exc:  # the target became a device, a pipe or read-only since _check_path
        raise InputError(f"{fn}: {exc}") from None
    except OSError as exc:
        if exc.errno is None:
            raise
        folder = existing_folder(path)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
            raise InputError(
                f"{fn}: cannot write {path}: {why} in {folder}; choose a folder you can write to"
            ) from None
        if exc.errno in (errno.ENOTDIR, errno.EEXIST) and not os.path.isdir(folder):
            raise InputError(
                f"{fn}: cannot write {path}: {folder} is a file, not a folder; choose another path"
            ) from None
        if exc.errno == errno.EISDIR:
            raise InputError(f"{fn}: cannot write {path}: it is a folder; pass a file inside it") from None
        raise OSError(exc.errno, f"cannot write {what}: {exc.strerror}", path) from exc


def _figure_format(path: str | os.PathLike[str], fn: str = "atomic_savefig") -> str:
    """The matplotlib format of ``path``: its extension, or ``rcParams["savefig.format"]`` (PNG) if it has none.

    Example:
        >>> _figure_format("out/grid.PDF"), _figure_format("out/grid")
        ('pdf', 'png')
    """
    matplotlib = optional("matplotlib", "naflow_fx.viz")
    from matplotlib.backend_bases import FigureCanvasBase

    path = _check_path(path, fn)
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        return str(matplotlib.rcParams["savefig.format"])
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext not in supported:
        raise InputError(
            f"{fn}: cannot save a figure as {path!r}: '.{ext}' is not a supported format; "
            f"use one of {', '.join('.' + e for e in sorted(supported))} (e.g. .png)"
        )
    return ext


# The figures are drawn in memory: their size is checked (against the free memory, and the largest
# picture the format can hold) before anything is allocated, so a huge ``cell``, ``dpi`` or ``size``
# is one InputError saying what to pass instead, not a MemoryError from deep inside matplotlib or torch.
_VECTOR_FORMATS = frozenset({"pdf", "svg", "svgz", "eps", "ps", "pgf"})  # not drawn on an Agg canvas when saved
_AGG_MAX_SIDE = 2**23 - 1  # matplotlib's Agg renderer draws less than 2^23 pixels per side
_GIF_MAX_SIDE = 2**16 - 1  # a GIF stores its width and height in 16 bits
_GIF_HEADER = 14  # pixels above the images of a GIF frame, for the layer's name
_GIF_MAX_DELAY_MS = 655350  # a GIF frame's delay: 16 bits of hundredths of a second


def _pixels(x: float) -> str:
    return f"{x:.0f}" if x < 1e15 else f"{x:.3g}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: MemoryError (numpy, PIL, matplotlib) or torch's "can't allocate memory"."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "alloc" in str(exc))


def _cell_size(cell: float, image_hw: tuple[int, int]) -> tuple[float, float]:
    """``(width, height)`` in inches of one grid cell: the image's longer side is ``cell``, its shape kept."""
    h, w = image_hw
    return cell * w / max(h, w), cell * h / max(h, w)


_COLORBAR_INCHES = 0.55  # the width a grid's colour bar and its label add to the figure


def _figure_size(
    rows: int, cols: int, cell: float, image_hw: tuple[int, int], colorbar: bool = False
) -> tuple[float, float]:
    """A grid figure's ``(width, height)`` in inches, with room for the column titles (and the colour bar)."""
    cell_w, cell_h = _cell_size(cell, image_hw)
    return cell_w * cols + (_COLORBAR_INCHES if colorbar else 0.0), cell_h * rows + 0.3


def _check_grid_room(
    rows: int,
    cols: int,
    cell: float,
    dpi: float,
    fmt: str | None,
    image_hw: tuple[int, int],
    fn: str,
    colorbar: bool = False,
) -> tuple[str, str, float]:
    """Refuse a grid figure that matplotlib cannot draw or that cannot fit in memory.

    Returns ``(what, todo, nbytes)`` for the message of an allocation that fails anyway (where the
    free memory is unknown). The estimate is generous: every pixel buffer the drawing may hold at once.
    """
    matplotlib = optional("matplotlib", "naflow_fx.viz")

    fig_dpi = float(matplotlib.rcParams["figure.dpi"])  # tight_layout renders at the figure's dpi
    width, height = _figure_size(rows, cols, cell, image_hw, colorbar)
    dpis = [fig_dpi] + ([float(dpi)] if fmt is not None and fmt not in _VECTOR_FORMATS else [])
    h, w = image_hw
    nbytes = 4 * width * height * fig_dpi**2  # the RGBA canvas of tight_layout
    if fmt is not None:  # saved: its RGBA canvas and a copy to encode it (a vector format keeps every cell's
        # image, resampled at dpi, until the file is written), one cell's image being resampled
        nbytes += 8 * width * height * dpi**2 + 96 * (cell * dpi) ** 2
    nbytes += 24 * rows * cols * h * w + 256 * h * w  # every cell's float RGB image, one overlay being made
    what = f"{fn}: a figure of {rows}×{cols} cells of {cell:g} inches"
    todo = (
        "pass a smaller cell (inches per image, e.g. the default 1.15) or a lower dpi, or show fewer layers "
        "(layers=[...]) or images per figure"
    )
    for d in dpis:
        px_w, px_h = width * d, height * d
        if max(px_w, px_h) > _AGG_MAX_SIDE:
            need = f" and {_gib(nbytes)} of memory" if math.isfinite(nbytes) else ""
            raise InputError(
                f"{what} at dpi {d:g} would be {_pixels(px_w)}×{_pixels(px_h)} pixels{need}, but matplotlib "
                f"draws at most {_AGG_MAX_SIDE} pixels per side: {todo}"
            )
    _check_room(int(nbytes), torch.device("cpu"), f"{what} at dpi {dpi if fmt is not None else fig_dpi:g}", todo)
    return what, todo, nbytes


def _gif_image_size(image_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """``(h, w)`` of each image in a GIF: its longer side ``size``, its shape kept."""
    h, w = image_hw
    return max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))


def _check_gif_room(
    batch: int, frames: int, size: int, fn: str, image_hw: tuple[int, int] = (1, 1)
) -> tuple[str, str, int]:
    """Refuse a GIF larger than the format allows or than the free memory; returns ``(what, todo, nbytes)``.

    ``image_hw`` is the images' shape (square by default): their longer side becomes ``size``."""
    h, w = _gif_image_size(image_hw, size)
    width, height = w * batch, h + _GIF_HEADER
    largest = min(_GIF_MAX_SIDE // batch, _GIF_MAX_SIDE - _GIF_HEADER)
    # the resized images (float32), every frame (RGB, and its palette copy while the GIF is encoded,
    # with room to spare), one overlay being made (float64 RGBA and blends)
    nbytes = 12 * batch * h * w + 8 * frames * width * height + 256 * h * w
    what = f"{fn}: {frames} frame(s) of {batch} image(s) of {h}×{w} pixels"
    todo = f"pass a smaller size (pixels per image side, e.g. the default 192; at most {largest} here), or fewer layers"
    if max(width, height) > _GIF_MAX_SIDE:
        raise InputError(
            f"{what} would be {width}×{height} pixels per frame ({batch} image(s) side by side) and need "
            f"{_gib(nbytes)} of memory, but a GIF has at most {_GIF_MAX_SIDE} pixels per side: {todo}"
        )
    _check_room(nbytes, torch.device("cpu"), what, todo)
    return what, todo, nbytes


def _check_image(image: object) -> Tensor:
    """One displayable image: ``[C, H, W]`` or ``[H, W, C]`` with C = 1 or 3, or ``[H, W]``."""
    if not isinstance(image, Tensor):
        raise InputTypeError(f"overlay: image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    shape = tuple(image.shape)
    ok = image.dim() == 2 or image.dim() == 3 and (shape[0] in (1, 3) or shape[-1] in (1, 3))
    if not ok:
        hint = ""
        if image.dim() == 4:
            hint = "; pass one image of the batch, e.g. images[0]"
        elif image.dim() == 3 and shape[0] == 4:
            hint = "; for RGBA drop the alpha channel with image[:3]"
        raise InputError(f"overlay: image must be [C, H, W] with 1 or 3 channels (or [H, W]), got shape {shape}{hint}")
    if 0 in shape or image.is_complex():
        raise InputError(f"overlay: image must be a non-empty real tensor, got shape {shape} {image.dtype}")
    _check_finite(image, "overlay: image")
    return image


def _check_heatmap(heatmap: object) -> Tensor:
    if not isinstance(heatmap, Tensor):
        raise InputTypeError(f"overlay: heatmap must be a torch.Tensor [h, w], got {type(heatmap).__name__}")
    if heatmap.dim() != 2 or 0 in heatmap.shape or heatmap.is_complex():
        hint = "; pass one map, e.g. result.maps[name][0]" if heatmap.dim() == 3 else ""
        raise InputError(f"overlay: heatmap must be one real map [h, w], got shape {tuple(heatmap.shape)}{hint}")
    _check_finite(heatmap, "overlay: heatmap")
    return heatmap


def _image_to_numpy(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` tensor → ``[H, W, 3]`` float array in [0, 1] for display.

    An image in [0, 1] is shown as it is, a ``uint8`` one divided by 255. Any other range (an image
    normalised for the model) is min-max scaled over the whole image, all channels together.
    """
    img = image.detach().cpu()
    scale_255 = img.dtype == torch.uint8
    img = img.float()
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    img = img.numpy()
    if img.ndim == 2 or img.shape[-1] == 1:
        img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
    if scale_255:
        return img / 255.0
    lo, hi = float(img.min()), float(img.max())
    if lo >= -1e-3 and hi <= 1 + 1e-3:  # [0, 1] up to rounding (a resized image)
        return img.clip(0, 1)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def overlay(image: Tensor, heatmap: Tensor, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """Blend a map (any resolution, any range) onto an image: ``[H, W, 3]`` float array in [0, 1].

    ``image`` is ``[C, H, W]`` (C = 1 or 3) or ``[H, W]``, shown as it is in [0, 1] (or ``uint8``)
    and min-max scaled otherwise; ``heatmap`` is one map ``[h, w]``, scaled to [0, 1] on its own;
    ``alpha`` in [0, 1] is the map's weight (torchcam's ``overlay_mask`` weighs the image instead);
    ``cmap`` is a matplotlib colormap name. Bad arguments raise :class:`~naflow_fx.InputError`, or
    :class:`~naflow_fx.InputTypeError` when of the wrong type.

    Example:
        >>> overlay(torch.rand(3, 8, 8), torch.rand(4, 4)).shape
        (8, 8, 3)
        >>> overlay(torch.rand(4, 8, 8), torch.rand(4, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        naflow_fx.errors.InputError: overlay: image must be [C, H, W] with 1 or 3 channels ...; for RGBA drop ...
    """
    matplotlib = optional("matplotlib", "naflow_fx.viz")

    _check_image(image)
    _check_heatmap(heatmap)
    _check_number(alpha, "alpha", "overlay", low=0.0, high=1.0)
    _check_cmap(cmap, "overlay")
    img = _image_to_numpy(image)
    h, w = img.shape[:2]
    m = resized_normalized(_display_dtype(heatmap.detach()), (h, w)).float().cpu().numpy()
    colored = matplotlib.colormaps[cmap](m)[..., :3]
    return (1 - alpha) * img + alpha * colored


def _flat_mark(heatmap: Tensor) -> str:
    """``"empty"`` for an all-zero map, ``"uniform"`` for another constant one, else ``""``.

    :func:`overlay` draws every constant map alike, in the colormap's lowest colour, so the figures
    mark them: an abandoned layer (nothing of the decision passes through it) is then not mistaken for
    a layer whose attention is merely low, or for a drawing fault.
    """
    if not bool(heatmap.any()):
        return "empty"
    return "" if bool(_varies(_display_dtype(heatmap).flatten(), 1e-12)[2]) else "uniform"


def _display_dtype(heatmap: Tensor) -> Tensor:
    """A map in a dtype to scale it in: float64 kept (maps of 1e-60 or 1e300 keep their shape, decision 41),
    anything else as float32."""
    return heatmap if heatmap.dtype == torch.float64 else heatmap.float()


def atomic_savefig(fig: Figure, path: str | os.PathLike[str], **kwargs) -> None:
    """Save a figure through a temporary file and an atomic rename (no half-written PNGs).

    The format is ``kwargs["format"]`` if given, else the path's extension (a path without one
    gets a PNG, written to exactly that path); an unsupported extension is an
    :class:`~naflow_fx.InputError` naming the path and the supported formats. So is a path that
    cannot be written: under a file, or in a folder without write permission. Any other failed
    write (e.g. a full disk) is an ``OSError`` naming ``path``; no file is left half-written.
    """
    _save_figure(fig, path, "atomic_savefig", **kwargs)


def _save_figure(fig, path: str | os.PathLike[str], fn: str, **kwargs) -> None:
    """:func:`atomic_savefig`, with errors that start with ``fn``."""
    path = _check_path(path, fn)
    if kwargs.get("format") is None:
        kwargs["format"] = _figure_format(path, fn)
    _write_file(path, lambda tmp: fig.savefig(tmp, **kwargs), fn, "the figure")


def _finish_figure(
    fig,
    draw: Callable[[], None],
    path: str | os.PathLike[str] | None,
    dpi: float,
    fmt: str | None,
    fn: str = "atomic_savefig",
):
    """Call ``draw()``, then save ``fig`` to ``path`` (if given) with :func:`atomic_savefig`.

    The figure is closed once saved, and on any failure (the caller never gets it then); without a
    path it is returned open. Errors start with ``fn``.
    """
    plt = optional("matplotlib.pyplot", "naflow_fx.viz")

    try:
        draw()
        if path is not None:
            _save_figure(fig, path, fn, dpi=dpi, format=fmt)
    except BaseException:
        plt.close(fig)  # the caller never gets this figure: do not leak it
        raise
    if path is not None:
        plt.close(fig)
    return fig


def flow_grid(
    images: Tensor,
    results: LayerMaps | Sequence[LayerMaps],
    path: str | os.PathLike[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    cell: float = 1.15,
    dpi: float = 150,
    colorbar: bool = False,
    image_labels: Sequence[str] | None = None,
    max_columns: int | None = None,
) -> Figure:
    """One row per image (and per method), one column per layer, maps overlaid on the image.

    Args:
        images: ``Tensor[B, C, H, W]``, the images the result was computed for, or the same
            images at another size of the same shape (e.g. before resizing). Images in [0, 1]
            (or ``uint8``) are shown as they are; any other range, such as images normalised for
            the model, is min-max scaled per image.
        results: one :class:`~naflow_fx.LayerMaps` (e.g. a flow) or several (e.g. NAFlow and
            Grad-CAM on the same layers); each image gets one row per result.
        path: where to save the PNG (atomically); None to only return the figure. Another
            extension matplotlib can write (``.pdf``, ``.svg``, ``.jpg`` ...) picks that format;
            a path without an extension gets a PNG.
        layers: the columns (default: every layer of the first result).
        row_labels: one label per result (default: the results' ``method``).
        class_names: class index → name, to label each row with the explained class.
        alpha: the maps' weight in [0, 1]; cmap: a matplotlib colormap name; cell: inches of
            each image's longer side (its shape is kept); dpi: the saved figure's resolution.
        colorbar: add the colormap's scale at the right. Each map is min-max scaled to [0, 1] on
            its own (decision 41), so the bar reads within one map, not across maps. A constant
            map has no scale: it is drawn in the colormap's lowest colour and marked ``empty``
            (all zeros, e.g. a layer where every neuron was abandoned) or ``uniform``.
        image_labels: one name per image (e.g. its file), written above the labels of its first row.
        max_columns: at most this many layer columns (≥ 2), evenly spaced over ``layers`` with the
            first and the last kept, as ``naflow explain --max-columns`` does: a flow over every layer
            of a ResNet-18 has 66, too many for one figure. None (the default) shows every layer.

    Every argument is checked before any drawing: bad input raises
    :class:`~naflow_fx.InputError` or :class:`~naflow_fx.InputTypeError`, and no figure is
    left open when anything fails. So is a path under a file or in a folder that cannot be written,
    and a figure too large to draw (``cell`` × ``dpi`` beyond matplotlib's limit or the free memory).
    Column titles are :func:`short_layer_name`, lengthened where two would be the same.

    Returns:
        The matplotlib figure (already closed when ``path`` is given).

    Example:
        >>> import tempfile
        >>> from naflow_fx import LayerMaps
        >>> res = LayerMaps(["a", "b"], {"a": torch.rand(2, 4, 4), "b": torch.rand(2, 2, 2)}, torch.zeros(2, 3),
        ...                 torch.zeros(2), None, (16, 16), "naflow")
        >>> fig = flow_grid(torch.rand(2, 3, 16, 16), res, tempfile.mkdtemp() + "/grid.png", dpi=50)
        >>> len(fig.axes)
        6
        >>> flow_grid(torch.rand(2, 3, 16, 16), res, layers=["c"])
        Traceback (most recent call last):
        ...
        naflow_fx.errors.InputError: flow_grid: unknown layer(s) ['c'] for the result; its layers are ['a', 'b']
    """
    fn = "flow_grid"
    images = _check_images(images, fn)
    batch = images.shape[0]
    if isinstance(results, LayerMaps):
        results = [results]
    elif isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise InputTypeError(f"{fn}: results must be a LayerMaps or a list of them, got {type(results).__name__}")
    results = [check_layer_maps(r, fn, f"results[{i}]") for i, r in enumerate(results)]
    if not results:
        raise InputError(f"{fn}: results is empty; pass a LayerMaps (e.g. nf(x)) or a list of them")
    layers = _check_layers(layers, results, fn)
    if max_columns is not None:
        layers = spread_layers(layers, _check_columns(max_columns, "max_columns", fn))
    for i, res in enumerate(results):
        what = "the result" if len(results) == 1 else f"results[{i}] ({res.method})"
        _check_maps(res, layers, batch, fn, what)
        _check_shape(res, tuple(images.shape[-2:]), fn, what)
    _check_labels(row_labels, "row_labels", len(results), "result", fn)
    labels = [r.method for r in results] if row_labels is None else list(row_labels)
    if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)):
        raise InputTypeError(
            f"{fn}: class_names must be a list of str (index → name), got {type(class_names).__name__}"
        )
    _check_labels(image_labels, "image_labels", batch, "image", fn)
    _check_number(alpha, "alpha", fn, low=0.0, high=1.0)
    _check_cmap(cmap, fn)
    _check_number(cell, "cell", fn, low=0.0, low_open=True)
    _check_number(dpi, "dpi", fn, low=0.0, low_open=True)
    if not isinstance(colorbar, (bool, np.bool_)):
        raise InputTypeError(f"{fn}: colorbar must be True or False, got {type(colorbar).__name__} {colorbar!r}")
    if cell * dpi < 8:
        raise InputError(
            f"{fn}: cell={cell:g} inches at dpi={dpi:g} draws each image on {cell * dpi:.2g} pixels; pass a cell "
            "and dpi whose product is at least 8 (the defaults: 1.15 inches at 150 dpi)"
        )
    fmt = _figure_format(path, fn) if path is not None else None

    # the user's backend, untouched (matplotlib picks Agg on a headless machine)
    plt = optional("matplotlib.pyplot", "naflow_fx.viz")

    rows, cols = batch * len(results), len(layers) + 1
    what, todo, nbytes = _check_grid_room(rows, cols, cell, dpi, fmt, tuple(images.shape[-2:]), fn, bool(colorbar))

    def draw() -> None:
        axes = fig.subplots(rows, cols, squeeze=False)
        args = (labels, class_names, image_labels, alpha, cmap, cell, bool(colorbar))
        _draw_grid(fig, axes, images, results, layers, *args)

    try:
        fig = plt.figure(figsize=_figure_size(rows, cols, cell, tuple(images.shape[-2:]), bool(colorbar)))
        return _finish_figure(fig, draw, path, dpi, fmt, fn)
    except (MemoryError, RuntimeError) as exc:  # where the free memory is unknown
        if not _out_of_memory(exc):
            raise
        raise InputError(f"{what} would need about {_gib(nbytes)}, more than can be allocated: {todo}") from None


def _check_columns(value: object, name: str, fn: str) -> int:
    """``value`` as a number of layer columns, at least 2 (the first and the last layer), else a library error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < 2:
        raise InputError(f"{fn}: {name} must be at least 2 (the first and the last layer), got {value}")
    return int(value)


def spread_layers(layers: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` (≥ 2) of ``layers``, evenly spaced, always with the first and the last.

    Example:
        >>> spread_layers([f"l{i}" for i in range(10)], 4)
        ['l0', 'l3', 'l6', 'l9']
    """
    limit = _check_columns(limit, "limit", "spread_layers")
    if len(layers) <= limit:
        return list(layers)
    idx = sorted({round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)})
    return [layers[i] for i in idx]


def _wrap(text: str, width: int, max_lines: int, sep: str) -> str:
    """``text`` on lines of at most ``width`` characters, broken after ``sep`` where possible (else anywhere),
    at most ``max_lines`` of them (the last one cut with "…"); ``$`` escaped (matplotlib's mathtext)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for piece in re.findall(rf"[^{re.escape(sep)}]*(?:{re.escape(sep)}|$)", paragraph):
            while len(line) + len(piece) > width and (line or len(piece) > width):
                if line:
                    lines.append(line.rstrip(" "))
                    line = ""
                else:
                    lines.append(piece[:width])
                    piece = piece[width:]
            line += piece
        lines.append(line.rstrip(" "))
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: max(1, width - 1)] + "…"]
    return "\n".join(lines).replace("$", r"\$")


def _draw_grid(fig, axes, images, results, layers, labels, class_names, image_labels, alpha, cmap, cell, colorbar):
    batch = images.shape[0]
    titles = _column_titles(layers)
    fontsize = min(max(6 * cell / 1.15, 4.0), 14.0)  # 6 pt at the default cell, growing with it
    cell_w, cell_h = _cell_size(cell, tuple(images.shape[-2:]))
    chars = max(6, int(cell_w * 72 / (0.6 * fontsize)))  # characters across one cell at that size
    label_chars = max(6, int(cell_h * 72 / (0.6 * fontsize)))  # and along its side, for the row labels
    for b in range(batch):
        for k, res in enumerate(results):
            r = b * len(results) + k
            ax = axes[r, 0]
            ax.imshow(_image_to_numpy(images[b]))
            cls = ""
            if res.classes is not None:
                c = int(res.classes[b])
                cls = f"\n{class_names[c]}" if class_names is not None and 0 <= c < len(class_names) else f" c={c}"
            named = image_labels is not None and k == 0
            label = _wrap(f"{labels[k]}{cls}", label_chars, 3 if named else 4, " ")
            if named:  # the image's name on a line of its own, its end kept
                who = str(image_labels[b])
                who = who if len(who) <= label_chars else "…" + who[len(who) - label_chars + 1 :]
                label = who.replace("$", r"\$") + "\n" + label
            ax.set_ylabel(label, fontsize=fontsize)
            for j, name in enumerate(layers):
                ax = axes[r, j + 1]
                ax.imshow(overlay(images[b], res.maps[name][b], alpha=alpha, cmap=cmap))
                mark = _flat_mark(res.maps[name][b])
                if mark:
                    box = {"facecolor": "white", "alpha": 0.8, "pad": 1.0, "linewidth": 0}
                    ax.text(0.03, 0.03, mark, transform=ax.transAxes, fontsize=fontsize, va="bottom", bbox=box)
                if r == 0:
                    ax.set_title(_wrap(titles[j], chars, 3, "."), fontsize=fontsize)
            if r == 0:
                axes[r, 0].set_title("input", fontsize=fontsize)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if not colorbar:
        fig.tight_layout(pad=0.2)
        return
    matplotlib = optional("matplotlib", "naflow_fx.viz")

    width = fig.get_figwidth()
    fig.tight_layout(pad=0.2, rect=(0.0, 0.0, 1.0 - _COLORBAR_INCHES / width, 1.0))
    top, bottom = axes[0, -1].get_position().y1, axes[-1, -1].get_position().y0
    cax = fig.add_axes((1.0 - 0.78 * _COLORBAR_INCHES / width, bottom, 0.1 / width, top - bottom))
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, 1.0), matplotlib.colormaps[cmap])
    bar = fig.colorbar(scale, cax=cax, ticks=[0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=fontsize, length=2, pad=1)
    room = (top - bottom) * fig.get_figheight() * 72 / (0.6 * fontsize)  # characters along the bar
    label = next((t for t in ("each map, min-max scaled", "min-max scaled") if len(t) <= room), "")
    bar.set_label(label, fontsize=fontsize, labelpad=2)


def flow_gif(
    images: Tensor,
    result: LayerMaps,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    size: int = 192,
    alpha: float = 0.55,
    cmap: str = "inferno",
    duration: int = 350,
) -> str:
    """An animated GIF of the flow: one frame per layer (shallow → deep), the batch side by side.

    Each frame shows every image with that layer's map overlaid and the layer's name on top; a
    constant map is marked ``empty`` (all zeros) or ``uniform``, as in :func:`flow_grid`.

    Args:
        images: ``Tensor[B, C, H, W]``.
        result: the per-layer maps (a flow or a baseline).
        path: the ``.gif`` to write (atomically).
        layers: the frames (default: every layer of ``result``).
        size: the longer side of each image in the GIF, in pixels (a positive int); the images
            keep their shape.
        alpha: the maps' weight over the images, in [0, 1] (as in :func:`overlay`).
        cmap: a matplotlib colormap name.
        duration: milliseconds per frame (the last frame is held three times as long).

    Every argument is checked before any frame is drawn (:class:`~naflow_fx.InputError`,
    :class:`~naflow_fx.InputTypeError`), including a path under a file or in a folder that cannot be
    written, and a ``size`` too large for a GIF (65535 pixels per side, the images side by side) or
    for the free memory. The GIF is written to ``path`` whatever its extension.

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
    Image, ImageDraw = optional("PIL.Image", "naflow_fx.viz"), optional("PIL.ImageDraw", "naflow_fx.viz")

    fn = "flow_gif"
    images = _check_images(images, fn)
    batch = images.shape[0]
    result = check_layer_maps(result, fn)
    layers = _check_layers(layers, [result], fn)
    if not layers:
        raise InputError(f"{fn}: needs at least one layer (one frame per layer), got none")
    _check_maps(result, layers, batch, fn)
    _check_shape(result, tuple(images.shape[-2:]), fn)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise InputTypeError(f"{fn}: size must be an int (pixels per image side), got {type(size).__name__} {size!r}")
    if size < 1:
        raise InputError(f"{fn}: size must be a positive number of pixels, e.g. 192, got {size}")
    size = int(size)
    _check_number(alpha, "alpha", fn, low=0.0, high=1.0)
    _check_cmap(cmap, fn)
    # a GIF stores a frame's delay in hundredths of a second, 16 bits, and the last frame is held 3 times as long
    _check_number(duration, "duration", fn, low=0.0, high=_GIF_MAX_DELAY_MS // 3)
    path = _check_path(path, fn)
    image_hw = tuple(images.shape[-2:])
    what, todo, nbytes = _check_gif_room(batch, len(layers), size, fn, image_hw)
    h, w = _gif_image_size(image_hw, size)
    header = _GIF_HEADER
    frames = []
    try:
        # resized in the display range (uint8 → [0, 1]), so that overlay shows them as they are
        pixels = images.detach().cpu()
        pixels = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        small = torch.nn.functional.interpolate(
            pixels, size=(h, w), mode="bilinear", antialias=h < image_hw[0] or w < image_hw[1], align_corners=False
        )
        lo, hi = pixels.amin((1, 2, 3)), pixels.amax((1, 2, 3))
        small = torch.stack([small[b].clamp(lo[b], hi[b]) for b in range(batch)])  # no overshoot out of [0, 1]
        for name in layers:
            frame = Image.new("RGB", (w * batch, h + header), "white")
            for b in range(batch):
                heatmap = result.maps[name][b].cpu()
                rgb = overlay(small[b], heatmap, alpha=alpha, cmap=cmap)
                frame.paste(Image.fromarray((rgb * 255).round().astype(np.uint8)), (b * w, header))
                mark = _flat_mark(heatmap)
                if mark:  # as in flow_grid: a constant map is marked, not drawn as a dark image
                    draw = ImageDraw.Draw(frame)
                    box = draw.textbbox((b * w + 3, header + h - 14), mark)
                    if box[2] < (b + 1) * w and h >= 16:  # where the image has room for it
                        draw.rectangle(box, fill="white")
                        draw.text((b * w + 3, header + h - 14), mark, fill="black")
            ImageDraw.Draw(frame).text((3, 1), f"{result.method}: {name}", fill="black")
            frames.append(frame)
    except (MemoryError, RuntimeError) as exc:  # where the free memory is unknown
        if not _out_of_memory(exc):
            raise
        frames.clear()
        raise InputError(f"{what} would need about {_gib(nbytes)}, more than can be allocated: {todo}") from None
    durations = [duration] * (len(frames) - 1) + [duration * 3]

    def save(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    return _write_file(path, save, fn, "the GIF")

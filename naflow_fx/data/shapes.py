"""Synthetic shapes with ground truth: one target shape per image on a cluttered, textured background.

Every image holds exactly one object of one of :data:`CLASSES`, drawn last (nothing covers it) at a
random position, scale, rotation and colour, over a background made of a smooth colour field, a
texture (stripes or checks), soft distractor blobs and thin strokes. The object's pixel mask is
returned with every image, so attention on the background is measurable, not only visible.

Everything is generated deterministically from a seed (a ``torch.Generator`` per image, seeded
from ``(seed, index)``), on the CPU, without any download.

Example:
    >>> from naflow_fx.data.shapes import CLASSES, make_shapes
    >>> batch = make_shapes(4, seed=0)
    >>> batch.images.shape, batch.images.dtype, batch.masks.shape, batch.labels.tolist()
    (torch.Size([4, 3, 96, 96]), torch.uint8, torch.Size([4, 96, 96]), [4, 5, 8, 6])
    >>> [CLASSES[c] for c in batch.labels.tolist()]
    ['cross', 'ring', 'crescent', 'heart']
    >>> bool((make_shapes(4, seed=0).images == batch.images).all())  # same seed, same pixels
    True
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, InputError, InputTypeError, optional

__all__ = [
    "CLASSES",
    "SIZE",
    "MEAN",
    "STD",
    "ShapesBatch",
    "make_shapes",
    "render_shape",
    "normalize",
    "denormalize",
    "samples",
    "sample_paths",
    "write_samples",
]

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow", "crescent", "pentagon")
SIZE = 96
# the embedded model's fixed input standardisation (:func:`normalize`); the generated images
# measure mean ≈ 0.49 and std ≈ 0.19 per channel (500 images of seed 0)
MEAN = (0.486, 0.486, 0.486)
STD = (0.214, 0.214, 0.214)


@dataclass
class ShapesBatch:
    """Images with their ground truth.

    Attributes:
        images: ``uint8 Tensor[N, 3, H, W]`` (RGB).
        labels: ``LongTensor[N]``, indices into :data:`CLASSES`.
        masks: ``bool Tensor[N, H, W]``, the object's pixels.
        params: ``float Tensor[N, 7]``: centre x, centre y (pixels), radius (pixels), rotation
            (radians) and the object's RGB colour in [0, 1].
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    params: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def float_images(self) -> Tensor:
        """The images as ``float32`` in [0, 1]."""
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8:
            got = self.images.dtype if isinstance(self.images, Tensor) else type(self.images).__name__
            raise InputTypeError(
                f"ShapesBatch.float_images: images must be a uint8 tensor (0..255, as make_shapes gives), got {got}; "
                "images that are already float in [0, 1] need no conversion"
            )
        return self.images.float() / 255.0


# Image ``i`` of seed ``s`` comes from the generator seeded ``s * _SEED_STRIDE + i``: indices stay below
# the stride so that two seeds never share an image, and the seed stays in torch's 64-bit seed range.
_SEED_STRIDE = 1_000_003
_MAX_SEED = (2**63 - 1) // _SEED_STRIDE - 1


def _integer(value: object, name: str, fn: str, low: int, high: int, what: str = "") -> int:
    """``value`` as an int in ``low..high`` (numpy integers too, not bools or floats), else a :class:`ConfigError`."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= int(value) <= high:
        return int(value)
    raise ConfigError(f"{fn}: {name} must be an int from {low} to {high}{what}, got {value!r}")


def _check_images(images: object, fn: str) -> Tensor:
    """``images`` as a tensor ``[..., 3, H, W]`` (or 1 channel, used for all three) of uint8 or float."""
    if not isinstance(images, Tensor):
        raise InputTypeError(
            f"{fn}: images must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}; convert with "
            "torch.as_tensor(...).permute(0, 3, 1, 2) for [N, H, W, 3] arrays"
        )
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise InputTypeError(f"{fn}: images must be uint8 (0..255) or float ([0, 1]), got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] not in (1, 3):
        raise InputError(
            f"{fn}: images must be [N, 3, H, W] or [3, H, W] (channels first; 1 channel is used for all three), got "
            f"shape {tuple(images.shape)}"
        )
    return images


def normalize(images: Tensor) -> Tensor:
    """``uint8`` or [0, 1] images → the embedded model's input (per-channel standardised).

    Float images must be in [0, 1] (a little over- or undershoot, from resampling say, is fine):
    float images in 0..255, or images normalised already, raise an :class:`~naflow_fx.errors.InputError`.
    """
    images = _check_images(images, "normalize")
    if images.is_floating_point() and images.numel() and images.device.type != "meta":
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if lo < -0.5 or hi > 2.0:  # NaN passes: the model's input check reports it
            raise InputError(
                f"normalize: float images must be in [0, 1], got values from {lo:.4g} to {hi:.4g}: pass 0..255 pixel "
                "values as a uint8 tensor (or divide them by 255), and do not normalize images twice"
            )
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """Inverse of :func:`normalize`: model input → [0, 1] images."""
    x = _check_images(x, "denormalize")
    mean = torch.tensor(MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def _polygon(u: Tensor, v: Tensor, points: list[tuple[float, float]]) -> Tensor:
    """Even-odd point-in-polygon test of every pixel ``(u, v)`` against a closed polygon."""
    pts = torch.tensor(points, dtype=u.dtype)
    x1, y1 = pts[:, 0].view(-1, 1, 1), pts[:, 1].view(-1, 1, 1)
    x2, y2 = pts.roll(-1, 0)[:, 0].view(-1, 1, 1), pts.roll(-1, 0)[:, 1].view(-1, 1, 1)
    straddles = (y1 > v) != (y2 > v)
    dy = torch.where(y2 == y1, torch.ones_like(y2), y2 - y1)
    crossing = u < (x2 - x1) * (v - y1) / dy + x1
    return ((straddles & crossing).sum(0) % 2).bool()


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


_STAR = [
    p
    for k in range(5)
    for p in (
        (math.cos(-math.pi / 2 + 2 * math.pi * k / 5), math.sin(-math.pi / 2 + 2 * math.pi * k / 5)),
        (
            0.45 * math.cos(-math.pi / 2 + math.pi * (2 * k + 1) / 5),
            0.45 * math.sin(-math.pi / 2 + math.pi * (2 * k + 1) / 5),
        ),
    )
]
_ARROW = [(-1.0, -0.28), (0.15, -0.28), (0.15, -0.7), (1.0, 0.0), (0.15, 0.7), (0.15, 0.28), (-1.0, 0.28)]


def render_shape(name: str, u: Tensor, v: Tensor) -> Tensor:
    """The bool mask of shape ``name`` in local coordinates (the shape fits the disc of radius 1.1).

    Example:
        >>> v, u = torch.meshgrid(torch.linspace(-1.2, 1.2, 9), torch.linspace(-1.2, 1.2, 9), indexing="ij")
        >>> render_shape("square", u, v).sum().item(), render_shape("circle", u, v)[4, 4].item()
        (25, True)
    """
    if not isinstance(u, Tensor) or not isinstance(v, Tensor) or u.shape != v.shape:
        got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (u, v)]
        raise InputError(
            f"render_shape: u and v must be tensors of one shape (pixel coordinates), got {got[0]} and {got[1]}"
        )
    r2 = u * u + v * v
    if name == "circle":
        return r2 <= 1.0
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if name == "triangle":
        return _polygon(u, v, _regular(3))
    if name == "star":
        return _polygon(u, v, _STAR)
    if name == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.15  # the classic implicit heart, point down
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if name == "arrow":
        return _polygon(u, v, _ARROW)
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8**2)
    if name == "pentagon":
        return _polygon(u, v, _regular(5))
    raise InputError(f"unknown shape {name!r}; choose one of {', '.join(CLASSES)}")


def _smooth_field(gen: Tensor, size: int, cells: int) -> Tensor:
    """A smooth random ``[3, size, size]`` field in [0, 1]: a bicubic upsampling of a coarse grid."""
    coarse = torch.rand(1, 3, cells, cells, generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    return field.clamp(0, 1)


def _random_colour(gen: torch.Generator) -> Tensor:
    """A saturated RGB colour: random hue, saturation 0.5–1, value 0.45–1."""
    h, s, val = torch.rand(3, generator=gen).tolist()
    s, val = 0.5 + 0.5 * s, 0.45 + 0.55 * val
    k = torch.tensor([5.0, 3.0, 1.0])
    kk = (k + h * 6) % 6
    return val - val * s * torch.clamp(torch.minimum(kk, 4 - kk), 0, 1)


def _background(gen: torch.Generator, size: int, xx: Tensor, yy: Tensor) -> Tensor:
    field = _smooth_field(gen, size, 4)
    img = 0.25 + 0.5 * (0.6 * field + 0.4 * field.mean(0, keepdim=True))  # a partly desaturated colour field
    # texture: stripes or checks at a random angle, frequency and contrast
    theta = float(torch.rand(1, generator=gen)) * math.pi
    freq = 0.15 + 0.35 * float(torch.rand(1, generator=gen))
    a = math.cos(theta) * xx + math.sin(theta) * yy
    if float(torch.rand(1, generator=gen)) < 0.5:
        pattern = torch.sin(freq * a)
    else:
        b = -math.sin(theta) * xx + math.cos(theta) * yy
        pattern = torch.sign(torch.sin(freq * a) * torch.sin(freq * b))
    tint = torch.rand(3, 1, 1, generator=gen) - 0.5
    img = img + (0.08 + 0.12 * float(torch.rand(1, generator=gen))) * pattern * (1 + tint)
    # soft distractor blobs (anisotropic Gaussians, never hard-edged)
    for _ in range(int(torch.randint(3, 7, (1,), generator=gen))):
        cx, cy = (torch.rand(2, generator=gen) * size).tolist()
        sx, sy = (3 + 9 * torch.rand(2, generator=gen)).tolist()
        rot = float(torch.rand(1, generator=gen)) * math.pi
        dx, dy = xx - cx, yy - cy
        pu, pv = math.cos(rot) * dx + math.sin(rot) * dy, -math.sin(rot) * dx + math.cos(rot) * dy
        weight = 0.85 * torch.exp(-0.5 * ((pu / sx) ** 2 + (pv / sy) ** 2))
        img = img * (1 - weight) + _random_colour(gen).view(3, 1, 1) * weight
    # thin strokes: line segments and arcs, 1–3 px wide
    for _ in range(int(torch.randint(2, 6, (1,), generator=gen))):
        width = 0.5 + float(torch.rand(1, generator=gen))
        if float(torch.rand(1, generator=gen)) < 0.5:
            x1, y1, x2, y2 = (torch.rand(4, generator=gen) * size).tolist()
            ex, ey = x2 - x1, y2 - y1
            t = (((xx - x1) * ex + (yy - y1) * ey) / max(ex * ex + ey * ey, 1e-6)).clamp(0, 1)
            dist = torch.sqrt((xx - x1 - t * ex) ** 2 + (yy - y1 - t * ey) ** 2)
        else:
            cx, cy = (torch.rand(2, generator=gen) * size).tolist()
            rad = 8 + 25 * float(torch.rand(1, generator=gen))
            start = float(torch.rand(1, generator=gen)) * 2 * math.pi
            span = (0.3 + 0.4 * float(torch.rand(1, generator=gen))) * 2 * math.pi
            ang = (torch.atan2(yy - cy, xx - cx) - start) % (2 * math.pi)
            dist = torch.where(
                ang <= span, (torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - rad).abs(), torch.full_like(xx, 1e3)
            )
        img = torch.where(dist <= width, _random_colour(gen).view(3, 1, 1), img)
    return img


def _make_one(gen: torch.Generator, size: int) -> tuple[Tensor, int, Tensor, Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    label = int(torch.randint(len(CLASSES), (1,), generator=gen))
    img = _background(gen, size, xx, yy)
    radius = size * (0.14 + 0.14 * float(torch.rand(1, generator=gen)))
    margin = radius + 2
    cx, cy = (margin + torch.rand(2, generator=gen) * (size - 2 * margin)).tolist()
    rot = float(torch.rand(1, generator=gen)) * 2 * math.pi
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u, v = math.cos(rot) * dx + math.sin(rot) * dy, -math.sin(rot) * dx + math.cos(rot) * dy
    mask = render_shape(CLASSES[label], u, v)
    # an object colour that stands out from the background it covers
    under = img[:, mask].mean(1)
    colour = _random_colour(gen)
    for _ in range(20):
        if float((colour - under).norm()) >= 0.45:
            break
        colour = _random_colour(gen)
    img = torch.where(mask, colour.view(3, 1, 1), img)
    img = (img + 0.02 * torch.randn(3, size, size, generator=gen)).clamp(0, 1)
    # the object's own pixels keep their exact colour (no noise), so the mask is exact ground truth
    img = torch.where(mask, colour.view(3, 1, 1), img)
    params = torch.tensor([cx, cy, radius, rot, *colour.tolist()])
    return img, label, mask, params


def make_shapes(n: int, seed: int = 0, size: int = SIZE, start: int = 0) -> ShapesBatch:
    """``n`` images of the shapes dataset: image ``i`` depends only on ``(seed, start + i, size)``.

    Args:
        n: number of images.
        seed: dataset seed (the training split uses seed 0, the held-out split seed 1).
        size: side in pixels (96 for the embedded model).
        start: index of the first image (``make_shapes(5, start=10)`` is images 10–14); the images'
            indices ``start .. start + n - 1`` must stay below 1,000,003 (the seeds' stride).

    Returns:
        A :class:`ShapesBatch` (``uint8`` images, labels, masks, parameters).
    """
    fn = "make_shapes"
    n = _integer(n, "n", fn, 0, _SEED_STRIDE, " (the number of images)")
    size = _integer(size, "size", fn, 16, 4096, " (the side in pixels; 96 for the embedded model)")
    seed = _integer(seed, "seed", fn, -_MAX_SEED, _MAX_SEED)
    start = _integer(start, "start", fn, 0, _SEED_STRIDE - 1, " (the index of the first image)")
    if start + n > _SEED_STRIDE:
        raise ConfigError(
            f"{fn}: images {start}..{start + n - 1} run past index {_SEED_STRIDE - 1}, where seed {seed}'s images "
            f"end (index {_SEED_STRIDE} of seed {seed} is image 0 of seed {seed + 1}); use another seed for more images"
        )
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    params = torch.empty(n, 7)
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + start + i)
        img, label, mask, p = _make_one(gen, size)
        images[i] = (img * 255).round().to(torch.uint8)
        labels[i], masks[i], params[i] = label, mask, p
    return ShapesBatch(images, labels, masks, params)


SAMPLES_SEED = 2


def sample_indices() -> list[int]:
    """Indices (in ``make_shapes(..., seed=SAMPLES_SEED)``) of the bundled samples: the first image of each class."""
    labels = make_shapes(60, seed=SAMPLES_SEED).labels.tolist()
    first = {c: labels.index(c) for c in range(len(CLASSES)) if c in labels}
    if len(first) != len(CLASSES):  # pragma: no cover - the seed is fixed
        raise RuntimeError("the sample seed does not cover every class")
    return [first[c] for c in range(len(CLASSES))]


def samples() -> ShapesBatch:
    """The bundled sample images with their ground truth, one per class in :data:`CLASSES` order.

    The PNG files (:func:`sample_paths`) are exactly these images.

    Example:
        >>> s = samples()
        >>> len(s), [CLASSES[c] for c in s.labels[:3].tolist()]
        (10, ['circle', 'square', 'triangle'])
    """
    idx = sample_indices()
    parts = [make_shapes(1, seed=SAMPLES_SEED, start=i) for i in idx]
    return ShapesBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "labels", "masks", "params")))


def sample_paths() -> list[str]:
    """Paths of the bundled sample PNGs (``naflow_fx/data/samples/<class>.png``), in :data:`CLASSES` order."""
    from importlib import resources

    folder = resources.files(__package__).joinpath("samples")
    return [str(folder.joinpath(f"{name}.png")) for name in CLASSES]


def write_samples(folder: str | os.PathLike[str]) -> list[str]:
    """Write the sample PNGs (how the bundled files were made), each atomically (never half-written)."""
    Image = optional("PIL.Image", "write_samples")

    from .._io import atomic_write

    if not isinstance(folder, (str, os.PathLike)):
        raise InputTypeError(f"write_samples: folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"write_samples: {folder} is a file, not a folder; pass a folder to write the PNGs into")
    s = samples()
    paths = []
    try:
        os.makedirs(folder, exist_ok=True)
        for img, label in zip(s.images, s.labels.tolist()):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            paths.append(atomic_write(os.path.join(folder, f"{CLASSES[label]}.png"), pil.save))
    except OSError as exc:
        raise InputError(
            f"write_samples: cannot write to {folder} ({exc.strerror or exc}); pass a writable folder"
        ) from None
    return paths

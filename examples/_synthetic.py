"""Images shared by the examples, from one of two sources, both deterministic and offline.

* The package's shapes dataset (:mod:`naflow_fx.data.shapes`), for the embedded trained model
  (``--arch shapes``): :func:`shapes_by_class` picks the first images of each requested class from
  ``make_shapes(..., seed=SHAPES_SEED)``, a split used neither for training (seed 0) nor for the
  held-out accuracy (seed 1); ``naflow_fx.data.shapes.normalize`` makes them the model's input.
* Simple coloured shapes on a noisy background (:func:`make_images`), for the random-weight
  encoders (``--arch conv4`` / ``resnet18``): class ``c`` has shape ``SHAPES[c]`` and colour
  ``COLOURS[c]``; images are normalised with ``MEAN`` and ``STD``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from naflow_fx.data.shapes import CLASSES, make_shapes

# the shapes dataset split the examples draw from (0 trains the embedded model, 1 measures it)
SHAPES_SEED = 7

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "dot")
COLOURS = (
    (0.90, 0.20, 0.20),
    (0.20, 0.75, 0.30),
    (0.20, 0.40, 0.95),
    (0.95, 0.85, 0.20),
    (0.80, 0.30, 0.90),
    (0.20, 0.85, 0.85),
    (0.95, 0.55, 0.15),
    (0.95, 0.95, 0.95),
)
MEAN, STD = 0.45, 0.25


# ------------------------------------------------------------------ the shapes dataset (trained model)


def pick_classes(n: int, seed: int) -> list[int]:
    """``n`` distinct classes of :data:`~naflow_fx.data.shapes.CLASSES` drawn with ``seed`` (sorted)."""
    if not 1 <= n <= len(CLASSES):
        raise ValueError(f"pick between 1 and {len(CLASSES)} classes, got {n}")
    order = torch.randperm(len(CLASSES), generator=torch.Generator().manual_seed(seed))
    return sorted(order[:n].tolist())


def shapes_by_class(
    classes: Sequence[int], n: int, seed: int = SHAPES_SEED, chunk: int = 64
) -> tuple[Tensor, list[list[int]]]:
    """The first ``n`` images of each of ``classes`` in the shapes dataset ``make_shapes(..., seed)``.

    The dataset is generated in chunks until every class has ``n`` images; image ``i`` depends only
    on ``(seed, i)``, so the selection is deterministic.

    Returns:
        ``uint8 Tensor[len(classes), n, 3, 96, 96]`` (row ``j`` holds class ``classes[j]``) and,
        per class, the dataset indices of its images.
    """
    found: dict[int, list[int]] = {c: [] for c in classes}
    images: dict[int, Tensor] = {}
    start = 0
    while any(len(found[c]) < n for c in found):
        batch = make_shapes(chunk, seed=seed, start=start)
        for i, label in enumerate(batch.labels.tolist()):
            if label in found and len(found[label]) < n:
                found[label].append(start + i)
                images[start + i] = batch.images[i]
        start += chunk
    grid = torch.stack([torch.stack([images[i] for i in found[c]]) for c in classes])
    return grid, [found[c] for c in classes]


# ------------------------------------------------------------------ coloured shapes (random-weight encoders)


def shape_mask(shape: str, size: int, gen: torch.Generator) -> Tensor:
    """A ``[size, size]`` {0, 1} mask of ``shape`` at a random position and scale."""
    u = torch.rand(3, generator=gen)
    cx, cy = (0.3 + 0.4 * u[0]) * size, (0.3 + 0.4 * u[1]) * size
    r = (0.16 + 0.1 * u[2]) * size
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = (xx - cx) / r, (yy - cy) / r
    dist = torch.sqrt(dx**2 + dy**2)
    masks = {
        "circle": dist <= 1,
        "square": torch.maximum(dx.abs(), dy.abs()) <= 0.85,
        "triangle": (dy <= 0.8) & (dx.abs() <= (dy + 1) / 1.8),
        "cross": ((dx.abs() <= 0.3) & (dy.abs() <= 1)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1)),
        "ring": (dist <= 1) & (dist >= 0.55),
        "diamond": dx.abs() + dy.abs() <= 1,
        "bar": (dx.abs() <= 1.1) & (dy.abs() <= 0.35),
        "dot": dist <= 0.5,
    }
    return masks[shape].float()


def make_image(cls: int, size: int, gen: torch.Generator) -> Tensor:
    """One normalised image ``[3, size, size]`` of class ``cls`` (shape and colour of the class)."""
    tint = 0.35 + 0.08 * torch.randn(3, 1, 1, generator=gen)
    background = tint + 0.06 * torch.randn(3, size, size, generator=gen)
    colour = torch.tensor(COLOURS[cls % len(COLOURS)]) + 0.05 * torch.randn(3, generator=gen)
    mask = shape_mask(SHAPES[cls % len(SHAPES)], size, gen)
    img = background * (1 - mask) + colour[:, None, None] * mask + 0.03 * torch.randn(3, size, size, generator=gen)
    return (img.clamp(0, 1) - MEAN) / STD


def make_images(labels: list[int], size: int, gen: torch.Generator) -> Tensor:
    return torch.stack([make_image(c, size, gen) for c in labels])


def resolve_arch_args(parser, args) -> int:
    """Fill the per-arch defaults of ``--seed`` and ``--size`` and check ``--size``; return the class count.

    ``shapes``: seed :data:`SHAPES_SEED`, size 96 (the embedded model's; anything else is a parser
    error). Random-weight archs: seed 0, size 48, a positive multiple of 16.
    """
    from naflow_fx.data.shapes import SIZE

    shapes = args.arch == "shapes"
    if args.seed is None:
        args.seed = SHAPES_SEED if shapes else 0
    if args.size is None:
        args.size = SIZE if shapes else 48
    if shapes and args.size != SIZE:
        parser.error(f"--arch shapes needs --size {SIZE} (the embedded model's input size), got {args.size}")
    if not shapes and (args.size < 16 or args.size % 16):
        parser.error(f"--size must be a positive multiple of 16 for --arch {args.arch}")
    return len(CLASSES) if shapes else len(SHAPES)


def describe_source(args) -> str:
    """One line saying where the images and the encoder come from."""
    if args.arch == "shapes":
        return f"shapes dataset (seed {args.seed}), trained shapes model (pooled 128-d features)"
    return f"synthetic shapes (seed {args.seed}), random-weight {args.arch}"


def save_relabelled(fig, path: str, relabel) -> None:
    """Rewrite each row label of ``fig`` with ``relabel(label) -> str`` (empty labels kept), save and close."""
    import matplotlib.pyplot as plt

    from naflow_fx.viz import atomic_savefig

    for ax in fig.axes:
        label = ax.get_ylabel()
        if label:
            ax.set_ylabel(relabel(label), fontsize=6)
    fig.tight_layout(pad=0.2)
    atomic_savefig(fig, path, dpi=150)
    plt.close(fig)

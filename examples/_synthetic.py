"""Synthetic images shared by the examples: one coloured shape per image on a noisy background.

Deterministic from a ``torch.Generator``; nothing is downloaded. Class ``c`` has shape
``SHAPES[c]`` and colour ``COLOURS[c]``; images are normalised with ``MEAN`` and ``STD``.
"""

from __future__ import annotations

import torch
from torch import Tensor

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

"""Explain image retrieval with NAFlow: the query and its top-k gallery matches, each w.r.t. the other.

By default (``--arch shapes``) the encoder is the package's embedded trained model
(:func:`naflow_fx.zoo.shapes.shapes_embedding`: the shapes ResNet's globally pooled 128-d
features) and the images come from its dataset (:func:`naflow_fx.data.shapes.make_shapes`, split
seed 7 by default, neither the training nor the held-out split): ``--classes`` classes of
:data:`~naflow_fx.data.shapes.CLASSES` picked with the seed, the first ``--per-class`` images of
each class as the gallery and later images of the same classes as queries, at the model's 96 px.
The gallery is ranked by cosine similarity of the embeddings, so the matches are meaningful (mostly
the query's class), and each match is explained from both sides (the query w.r.t. the match's
embedding, the match w.r.t. the query's embedding).

``--arch conv4`` keeps the older, purely synthetic set-up: a random-weight Conv-4 encoder with a
linear projection and L2 normalisation, on simple coloured shapes on a noisy background; the
ranking is then whatever the random features make it, and the point is only the explanation
machinery. Everything runs offline.

    python examples/retrieval.py                        # 40 gallery images, 2 queries, top-3 (~20 s on CPU)
    python examples/retrieval.py --arch conv4           # random-weight Conv-4 at 48 px (~7 s)
    python examples/retrieval.py --k 5 --seed 3 --out /tmp/naflow-retrieval

For each query it writes ``retrieval_query{q}.png``: for every match, a row of the query and a row
of the match; one column per block.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the examples' shared images (examples/_synthetic.py), importable however the script is run
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _synthetic import (
    SHAPES,
    SHAPES_SEED,
    describe_source,
    make_images,
    pick_classes,
    resolve_arch_args,
    save_relabelled,
    shapes_by_class,
)

from naflow_fx.data.shapes import CLASSES, SIZE, normalize

ARCHS = ("shapes", "conv4")


class Encoder(nn.Module):
    """Conv-4 trunk (4 × conv3×3 → BN → ReLU → max-pool) → flatten → linear → L2 normalisation."""

    def __init__(self, size: int, hidden: int = 32, dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(3 if i == 0 else hidden, hidden, 3, padding=1),
                    nn.BatchNorm2d(hidden),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
                for i in range(4)
            ]
        )
        self.proj = nn.Linear(hidden * (size // 16) ** 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(torch.flatten(self.trunk(x), 1)), dim=1)


def _calibrated(encoder: nn.Module, calibration: Tensor) -> nn.Module:
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    encoder.train()
    with torch.no_grad():
        for _ in range(2):
            encoder(calibration)
    return encoder.eval()


def build_encoder(size: int, calibration: Tensor, seed: int = 0) -> nn.Module:
    """A random-weight encoder seeded with ``seed``; BatchNorm statistics from train-mode passes
    over ``calibration`` (random weights with default statistics give badly scaled features)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        return _calibrated(Encoder(size), calibration)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples-out", help="output folder for the PNGs (default: examples-out/)")
    p.add_argument(
        "--arch", default="shapes", choices=ARCHS, help="encoder: the embedded trained shapes model or a random conv4"
    )
    p.add_argument("--classes", type=int, default=5, help=f"number of classes (≤ {len(CLASSES)} for shapes, else ≤ 8)")
    p.add_argument("--per-class", type=int, default=8, help="gallery images per class")
    p.add_argument("--queries", type=int, default=2, help="number of query images")
    p.add_argument("--k", type=int, default=3, help="matches per query")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"image size (shapes: {SIZE}, the default; conv4: a multiple of 16, default 48)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"shapes: the dataset split and the classes (default {SHAPES_SEED}); "
        "conv4: the images and weights (default 0)",
    )
    args = p.parse_args(argv)
    classes = resolve_arch_args(p, args)
    if not 1 <= args.classes <= classes:
        p.error(f"--classes must be between 1 and {classes} for --arch {args.arch}")
    if args.per_class < 1 or args.queries < 1:
        p.error("--per-class and --queries must be at least 1")
    if not 1 <= args.k <= args.classes * args.per_class:
        p.error("--k must be between 1 and the gallery size (--classes × --per-class)")
    return args


def make_data(args: argparse.Namespace) -> tuple[nn.Module, Tensor, list[int], Tensor, list[int], list[str]]:
    """``(encoder, gallery, gallery_labels, query, query_labels, class names)`` for ``args``."""
    if args.arch == "shapes":
        from naflow_fx.zoo.shapes import shapes_embedding

        classes = pick_classes(args.classes, args.seed)
        extra = -(-args.queries // args.classes)  # query images per class, after the gallery's
        grid, _ = shapes_by_class(classes, args.per_class + extra, seed=args.seed)
        gallery = normalize(grid[:, : args.per_class].flatten(0, 1))
        slots = [(q % args.classes, args.per_class + q // args.classes) for q in range(args.queries)]
        query = normalize(torch.stack([grid[c, i] for c, i in slots]))
        gallery_labels = [c for c in classes for _ in range(args.per_class)]
        query_labels = [classes[c] for c, _ in slots]
        # the trained model's globally pooled features (the cosine ranking normalises them)
        return shapes_embedding(), gallery, gallery_labels, query, query_labels, list(CLASSES)
    gen = torch.Generator().manual_seed(args.seed)
    gallery_labels = [c for c in range(args.classes) for _ in range(args.per_class)]
    query_labels = [q % args.classes for q in range(args.queries)]
    gallery = make_images(gallery_labels, args.size, gen)
    query = make_images(query_labels, args.size, gen)
    return build_encoder(args.size, gallery, args.seed), gallery, gallery_labels, query, query_labels, list(SHAPES)


def plot_query(match, q: int, path: str, names: list[str], query_label: int, gallery_labels: list[int]) -> None:
    """``match.plot(q)`` with class names in the row labels, saved to ``path``."""
    rename = {}
    for r, i in enumerate(match.indices[q].tolist()):
        rename[f"query {q}→#{i}"] = f"query {q}: {names[query_label]}\n→#{i}"
        rename[f"match {r + 1}: #{i}"] = f"match {r + 1}: #{i} ({names[gallery_labels[i]]})"

    def relabel(label: str) -> str:
        first, *rest = label.split("\n")
        return "\n".join([rename.get(first, first), *rest])

    save_relabelled(match.plot(q), path, relabel)


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the paths of the written figures."""
    import matplotlib

    matplotlib.use("Agg")
    from naflow_fx import compile_naflow
    from naflow_fx.retrieval import explain_match

    args = parse_args(argv)
    start = time.perf_counter()
    encoder, gallery, gallery_labels, query, query_labels, names = make_data(args)

    nf = compile_naflow(encoder, query[:1], layers="blocks")
    classes = ", ".join(names[c] for c in sorted(set(gallery_labels)))
    source = describe_source(args)
    print(f"gallery: {len(gallery_labels)} images of {args.classes} classes; {args.queries} queries; top-{args.k}")
    print(f"{source} at {args.size} px; classes: {classes}")
    print(f"explained layers: {', '.join(nf.layers)}")
    match = explain_match(nf, query, gallery, k=args.k)
    same = sum(gallery_labels[int(i)] == query_labels[q] for q in range(args.queries) for i in match.indices[q])
    print(f"matches of the query's class: {same}/{args.queries * args.k}")

    os.makedirs(args.out, exist_ok=True)
    paths = []
    for q in range(args.queries):
        ranked = ", ".join(
            f"#{int(i)} ({names[gallery_labels[int(i)]]}, cos {float(s):.3f})"
            for i, s in zip(match.indices[q], match.similarities[q])
        )
        print(f"query {q} ({names[query_labels[q]]}): {ranked}")
        path = os.path.join(args.out, f"retrieval_query{q}.png")
        plot_query(match, q, path, names, query_labels[q], gallery_labels)
        paths.append(path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()

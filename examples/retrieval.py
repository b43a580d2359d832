"""Explain image retrieval with NAFlow: the query and its top-k gallery matches, each w.r.t. the other.

Everything is synthetic and offline: a random-weight Conv-4 encoder with a linear projection and
L2 normalisation, and a gallery of coloured shapes on a noisy background drawn with torch from a
seed. The gallery is ranked by cosine similarity of the embeddings; each match is explained from
both sides (the query w.r.t. the match's embedding, the match w.r.t. the query's embedding).

    python examples/retrieval.py                        # 40 gallery images, 2 queries, top-3 (~15 s on CPU)
    python examples/retrieval.py --k 5 --out /tmp/naflow-retrieval

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

# the examples' shared synthetic images (examples/_synthetic.py), importable however the script is run
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _synthetic import SHAPES, make_images  # noqa: E402


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
    p.add_argument("--classes", type=int, default=5, help="number of shape classes (≤ 8)")
    p.add_argument("--per-class", type=int, default=8, help="gallery images per class")
    p.add_argument("--queries", type=int, default=2, help="number of query images")
    p.add_argument("--k", type=int, default=3, help="matches per query")
    p.add_argument("--size", type=int, default=48, help="image size (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.classes <= len(SHAPES):
        p.error(f"--classes must be between 1 and {len(SHAPES)}")
    if args.size < 16 or args.size % 16:
        p.error("--size must be a positive multiple of 16")
    if not 1 <= args.k <= args.classes * args.per_class:
        p.error("--k must be between 1 and the gallery size (--classes × --per-class)")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the paths of the written figures."""
    import matplotlib

    matplotlib.use("Agg")
    from naflow_fx import compile_naflow
    from naflow_fx.retrieval import explain_match

    args = parse_args(argv)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    gallery_labels = [c for c in range(args.classes) for _ in range(args.per_class)]
    query_labels = [q % args.classes for q in range(args.queries)]
    gallery = make_images(gallery_labels, args.size, gen)
    query = make_images(query_labels, args.size, gen)
    encoder = build_encoder(args.size, gallery, args.seed)

    nf = compile_naflow(encoder, query[:1], layers="blocks")
    print(f"gallery: {len(gallery_labels)} images of {args.classes} classes; {args.queries} queries; top-{args.k}")
    print(f"explained layers: {', '.join(nf.layers)}")
    match = explain_match(nf, query, gallery, k=args.k)

    os.makedirs(args.out, exist_ok=True)
    paths = []
    for q in range(args.queries):
        ranked = ", ".join(
            f"#{int(i)} (class {gallery_labels[int(i)]}, cos {float(s):.3f})"
            for i, s in zip(match.indices[q], match.similarities[q])
        )
        print(f"query {q} (class {query_labels[q]}): {ranked}")
        path = os.path.join(args.out, f"retrieval_query{q}.png")
        match.plot(q, path)
        paths.append(path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()

"""Explain a few-shot episode (MetaBaseline prototypes) with NAFlow: query and support flows side by side.

By default (``--arch shapes``) the encoder is the package's embedded trained model
(:func:`naflow_fx.zoo.shapes.shapes_embedding`: the shapes ResNet's globally pooled 128-d
features) and the episode is drawn from its dataset (:func:`naflow_fx.data.shapes.make_shapes`,
split seed 7 by default, neither the training nor the held-out split): ``--ways`` classes of
:data:`~naflow_fx.data.shapes.CLASSES` picked with the seed, the first ``--shots`` images of each
class as supports and the next ``--queries`` as queries, at the model's 96 px. The classifier is
MetaBaseline's: prototypes are the mean support embeddings, logits are 10 × cosine. The
predictions are meaningful (the embedding separates the shapes; the classes were seen in training,
so this is a prototype classifier on a trained embedding, not novel-class few-shot learning), and
the flows show which parts of the query and of the supports make them alike (paper Fig. 10–11).

``--arch conv4`` / ``resnet18`` keep the older, purely synthetic set-up: a random-weight encoder
(Conv-4, or a torchvision ResNet-18 trunk) with a linear projection and L2 normalisation, on simple
coloured shapes on a noisy background; the prediction is then whatever the random features make it,
and the point is only the explanation machinery. Everything runs offline.

    python examples/fewshot.py                          # 5-way 3-shot, trained shapes model (~40 s on CPU)
    python examples/fewshot.py --arch conv4             # random-weight Conv-4 at 48 px (~10 s)
    python examples/fewshot.py --ways 3 --shots 1 --seed 3 --out /tmp/naflow-fewshot

(Residual networks are slower on CPU: every residual block is a multi-branch region solved by least
squares; the small shapes ResNet takes under two seconds per explained image, the random-weight
ResNet-18 trunk a few seconds per image and block, so expect minutes.)

For each plotted query it writes ``fewshot_query{q}.png``: the first row is the query explained
w.r.t. its predicted prototype, the next rows are the supports of that class, each explained
w.r.t. the query; one column per block.
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

ARCHS = ("shapes", "conv4", "resnet18")


class Encoder(nn.Module):
    """``trunk`` → flatten → linear projection → L2 normalisation: an embedding ``[B, dim]``."""

    def __init__(self, trunk: nn.Module, features: int, dim: int = 64):
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Linear(features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(torch.flatten(self.trunk(x), 1)), dim=1)


def _new_encoder(arch: str, size: int) -> nn.Module:
    if arch == "conv4":
        hidden = 32
        blocks = [
            nn.Sequential(
                nn.Conv2d(3 if i == 0 else hidden, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            for i in range(4)
        ]
        return Encoder(nn.Sequential(*blocks), hidden * (size // 16) ** 2)
    if arch == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        trunk = nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
            nn.AdaptiveAvgPool2d(1),
        )
        return Encoder(trunk, 512)
    raise SystemExit(f"unknown random-weight --arch {arch!r}: choose conv4 or resnet18")


def _calibrated(encoder: nn.Module, calibration: Tensor) -> nn.Module:
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    encoder.train()
    with torch.no_grad():
        for _ in range(2):
            encoder(calibration)
    return encoder.eval()


def build_encoder(arch: str, size: int, calibration: Tensor, seed: int = 0) -> nn.Module:
    """A random-weight encoder (``"conv4"`` or ``"resnet18"``) seeded with ``seed``.

    BatchNorm running statistics are filled by a few train-mode passes over ``calibration``
    (random weights with default statistics give badly scaled features).
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        return _calibrated(_new_encoder(arch, size), calibration)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples-out", help="output folder for the PNGs (default: examples-out/)")
    p.add_argument(
        "--arch",
        default="shapes",
        choices=ARCHS,
        help="encoder: the embedded trained shapes model (default) or a random-weight conv4 / resnet18",
    )
    p.add_argument("--ways", type=int, default=5, help=f"N classes per episode (≤ {len(CLASSES)} for shapes, else ≤ 8)")
    p.add_argument("--shots", type=int, default=3, help="K support images per class")
    p.add_argument("--queries", type=int, default=1, help="query images per class")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"image size (shapes: {SIZE}, the default; conv4: a multiple of 16, default 48)",
    )
    p.add_argument("--plot", type=int, default=2, help="how many queries to plot")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"shapes: the dataset split and the episode's classes (default {SHAPES_SEED}); "
        "conv4 / resnet18: the images and weights (default 0)",
    )
    args = p.parse_args(argv)
    classes = resolve_arch_args(p, args)
    if not 1 <= args.ways <= classes:
        p.error(f"--ways must be between 1 and {classes} for --arch {args.arch}")
    if args.shots < 1 or args.queries < 1:
        p.error("--shots and --queries must be at least 1")
    return args


def make_episode(args: argparse.Namespace) -> tuple[nn.Module, Tensor, list[int], Tensor, list[int], list[str]]:
    """``(encoder, support, support_labels, query, query_labels, class names)`` for ``args``."""
    if args.arch == "shapes":
        from naflow_fx.zoo.shapes import shapes_embedding

        classes = pick_classes(args.ways, args.seed)
        grid, _ = shapes_by_class(classes, args.shots + args.queries, seed=args.seed)
        support = normalize(grid[:, : args.shots].flatten(0, 1))
        query = normalize(grid[:, args.shots :].flatten(0, 1))
        support_labels = [c for c in classes for _ in range(args.shots)]
        query_labels = [c for c in classes for _ in range(args.queries)]
        # the trained model's globally pooled features; the prototype classifier's cosine normalises them
        return shapes_embedding(), support, support_labels, query, query_labels, list(CLASSES)
    gen = torch.Generator().manual_seed(args.seed)
    support_labels = [c for c in range(args.ways) for _ in range(args.shots)]
    query_labels = [c for c in range(args.ways) for _ in range(args.queries)]
    support = make_images(support_labels, args.size, gen)
    query = make_images(query_labels, args.size, gen)
    calibration = make_images([i % args.ways for i in range(32)], args.size, gen)
    encoder = build_encoder(args.arch, args.size, calibration, args.seed)
    return encoder, support, support_labels, query, query_labels, list(SHAPES)


def plot_query(episode, q: int, path: str, names: list[str], true: int) -> None:
    """``episode.plot(q)`` with class names in the row labels, saved to ``path``."""
    pred = int(episode.prediction[q])

    def relabel(label: str) -> str:
        label = label.replace(f"query {q}→proto {pred}", f"query {q}: {names[true]}\n→proto {names[pred]}")
        return label.replace(f"(c={pred})", f"({names[pred]})")

    save_relabelled(episode.plot(q), path, relabel)


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the paths of the written figures."""
    import matplotlib

    matplotlib.use("Agg")
    from naflow_fx import compile_naflow
    from naflow_fx.fewshot import explain_episode

    args = parse_args(argv)
    start = time.perf_counter()
    encoder, support, support_labels, query, query_labels, names = make_episode(args)

    # compile once (one column per block: 5 for shapes, 4 for conv4, 9 for resnet18), reuse for every episode
    nf = compile_naflow(encoder, support[:1], layers="blocks")
    classes = ", ".join(names[c] for c in sorted(set(support_labels)))
    source = describe_source(args)
    print(f"{args.ways}-way {args.shots}-shot, {len(query_labels)} queries, {source} at {args.size} px")
    print(f"classes: {classes}")
    print(f"explained layers: {', '.join(nf.layers)}")
    episode = explain_episode(nf, support, torch.tensor(support_labels), query)
    correct = (episode.prediction == torch.tensor(query_labels)).float().mean().item()
    what = "the trained shapes embedding" if args.arch == "shapes" else "the random-weight encoder"
    print(f"accuracy of {what}: {correct:.0%} (chance: {1 / args.ways:.0%})")

    os.makedirs(args.out, exist_ok=True)
    paths = []
    columns = episode.classes.tolist()
    for q in range(min(args.plot, len(query_labels))):
        logits = ", ".join(f"{names[c]} {v:.2f}" for c, v in zip(columns, episode.logits[q].tolist()))
        pred = int(episode.prediction[q])
        print(f"query {q}: true {names[query_labels[q]]}, predicted {names[pred]}, logits [{logits}]")
        path = os.path.join(args.out, f"fewshot_query{q}.png")
        plot_query(episode, q, path, names, query_labels[q])
        paths.append(path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()

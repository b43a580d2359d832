"""Explain a few-shot episode (MetaBaseline prototypes) with NAFlow: query and support flows side by side.

Everything is synthetic and offline: a random-weight encoder (Conv-4, or a torchvision ResNet-18
trunk) with a linear projection and L2 normalisation, and images of coloured shapes on a noisy
background drawn with torch from a seed. The classifier is MetaBaseline's: prototypes are the
mean support embeddings, logits are 10 × cosine. With random weights the prediction is whatever
the random features make it; the point is the explanation machinery (paper Fig. 10–11).

    python examples/fewshot.py                          # 5-way 3-shot, Conv-4, 48 px (~10 s on CPU)
    python examples/fewshot.py --arch resnet18 --ways 3 --shots 1 --out /tmp/naflow-fewshot

(The ResNet-18 trunk is much slower on CPU: every residual block is a multi-branch region solved
by least squares, a few seconds per image and block; expect minutes.)

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

# the examples' shared synthetic images (examples/_synthetic.py), importable however the script is run
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _synthetic import SHAPES, make_images  # noqa: E402


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
    raise SystemExit(f"unknown --arch {arch!r}: choose conv4 or resnet18")


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
    p.add_argument("--arch", default="conv4", choices=("conv4", "resnet18"), help="random-weight encoder")
    p.add_argument("--ways", type=int, default=5, help="N classes per episode (≤ 8)")
    p.add_argument("--shots", type=int, default=3, help="K support images per class")
    p.add_argument("--queries", type=int, default=1, help="query images per class")
    p.add_argument("--size", type=int, default=48, help="image size (a multiple of 16 for conv4)")
    p.add_argument("--plot", type=int, default=2, help="how many queries to plot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.ways <= len(SHAPES):
        p.error(f"--ways must be between 1 and {len(SHAPES)}")
    if args.arch == "conv4" and (args.size < 16 or args.size % 16):
        p.error("--size must be a positive multiple of 16 for conv4")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the paths of the written figures."""
    import matplotlib

    matplotlib.use("Agg")
    from naflow_fx import compile_naflow
    from naflow_fx.fewshot import explain_episode

    args = parse_args(argv)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    support_labels = [c for c in range(args.ways) for _ in range(args.shots)]
    query_labels = [c for c in range(args.ways) for _ in range(args.queries)]
    support = make_images(support_labels, args.size, gen)
    query = make_images(query_labels, args.size, gen)
    calibration = make_images([i % args.ways for i in range(32)], args.size, gen)
    encoder = build_encoder(args.arch, args.size, calibration, args.seed)

    # compile once (one column per block: 4 for conv4, 9 for resnet18), reuse for every episode
    nf = compile_naflow(encoder, support[:1], layers="blocks")
    print(f"{args.ways}-way {args.shots}-shot, {len(query_labels)} queries, {args.arch} at {args.size} px")
    print(f"explained layers: {', '.join(nf.layers)}")
    episode = explain_episode(nf, support, torch.tensor(support_labels), query)
    correct = (episode.prediction == torch.tensor(query_labels)).float().mean().item()
    print(f"accuracy of the random-weight encoder: {correct:.0%} (chance: {1 / args.ways:.0%})")

    os.makedirs(args.out, exist_ok=True)
    paths = []
    for q in range(min(args.plot, len(query_labels))):
        logits = ", ".join(f"{v:.2f}" for v in episode.logits[q].tolist())
        print(f"query {q}: true {query_labels[q]}, predicted {int(episode.prediction[q])}, logits [{logits}]")
        path = os.path.join(args.out, f"fewshot_query{q}.png")
        episode.plot(q, path)
        paths.append(path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()

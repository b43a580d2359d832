"""Train the embedded shapes ResNet from the seed: ``python -m naflow_fx.zoo.train_shapes --out DIR``.

The recipe (the defaults below) is what produced the shipped weights: a fixed training split of
the shapes dataset (seed 0), random horizontal and vertical flips, SGD with Nesterov momentum and
a one-cycle learning rate, batch 128, on the CPU. It writes ``DIR/shapes_resnet.pt`` (the state
dict) and ``DIR/shapes_resnet.json`` (recipe, held-out accuracy on the seed-1 split, training
time, versions), both atomically. Copy them into ``naflow_fx/zoo/`` to ship new weights.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .._io import atomic_write
from ..data.shapes import CLASSES, SIZE, make_shapes, normalize
from .shapes import INFO_FILE, WEIGHTS_FILE, ShapesResNet

__all__ = ["train", "evaluate", "main"]


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    """Top-1 accuracy of ``model`` on ``uint8`` images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            correct += int((model(normalize(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum())
    return correct / max(len(labels), 1)


def train(
    train_size: int = 30_000,
    test_size: int = 2_000,
    epochs: int = 14,
    batch: int = 128,
    lr: float = 0.2,
    weight_decay: float = 5e-4,
    seed: int = 0,
    log=print,
) -> tuple[ShapesResNet, dict]:
    """Train a :class:`ShapesResNet` with the shipped recipe; returns the model and its record."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = make_shapes(train_size, seed=seed)
    held_out = make_shapes(test_size, seed=seed + 1)
    gen_s = time.perf_counter() - start
    log(f"generated {train_size} training and {test_size} held-out images in {gen_s:.0f}s")
    model = ShapesResNet()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    steps = epochs * (train_size // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train_size, generator=gen)
        total, seen = 0.0, 0
        for i in range(train_size // batch):
            idx = order[i * batch : (i + 1) * batch]
            x = normalize(data.images[idx])
            flips = torch.rand(2, generator=gen)
            if flips[0] < 0.5:
                x = x.flip(3)
            if flips[1] < 0.5:
                x = x.flip(2)
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        acc = evaluate(model, held_out.images, held_out.labels)
        elapsed = time.perf_counter() - start
        log(f"epoch {epoch + 1:>2}/{epochs}: loss {total / seen:.4f}, held-out accuracy {acc:.2%}, {elapsed:.0f}s")
    seconds = time.perf_counter() - start
    record = {
        "model": "ShapesResNet(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1))",
        "classes": list(CLASSES),
        "input_size": SIZE,
        "held_out_accuracy": evaluate(model, held_out.images, held_out.labels),
        "held_out": {"seed": seed + 1, "images": test_size},
        "train_accuracy_first_2000": evaluate(model, data.images[:2000], data.labels[:2000]),
        "training_seconds": round(seconds, 1),
        "recipe": {
            "train_images": train_size,
            "train_seed": seed,
            "epochs": epochs,
            "batch": batch,
            "optimizer": "SGD(momentum=0.9, nesterov=True)",
            "lr": f"OneCycle(max_lr={lr}, pct_start=0.2)",
            "weight_decay": weight_decay,
            "augmentation": "random horizontal and vertical flips",
        },
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "command": "python -m naflow_fx.zoo.train_shapes --out DIR",
    }
    return model.eval(), record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m naflow_fx.zoo.train_shapes",
        description="Reproduce the embedded shapes ResNet's weights from the seed (about 11 min on 2 CPU cores).",
        epilog="example:\n  python -m naflow_fx.zoo.train_shapes --out /tmp/shapes-weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for shapes_resnet.pt and shapes_resnet.json")
    parser.add_argument("--train-size", type=int, default=30_000, help="training images (default 30000)")
    parser.add_argument("--epochs", type=int, default=14, help="epochs (default 14)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and initialisation seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    batch = inspect.signature(train).parameters["batch"].default
    if args.train_size < batch or args.epochs < 1:
        parser.error(f"--train-size must be at least the batch size {batch} and --epochs at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, record = train(train_size=args.train_size, epochs=args.epochs, seed=args.seed)
    buffer = io.BytesIO()  # saved from memory: the archive's inner name does not depend on the temporary file
    torch.save(model.state_dict(), buffer)
    atomic_write(os.path.join(args.out, WEIGHTS_FILE), lambda p: Path(p).write_bytes(buffer.getvalue()))
    atomic_write(os.path.join(args.out, INFO_FILE), lambda p: open(p, "w").write(json.dumps(record, indent=2) + "\n"))
    print(
        f"held-out accuracy {record['held_out_accuracy']:.2%} after {record['training_seconds']:.0f}s; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

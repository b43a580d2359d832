"""How much of each layer's attention lies on the object: NAFlow against Grad-CAM and LayerCAM.

The embedded shapes ResNet on held-out images of the shapes dataset (seed 1), each explained for
its predicted class; per layer, the mean share of the map's mass on the ground-truth mask
(``naflow_fx.metrics.energy_on_mask``; a uniform map scores the mask's area). Prints a Markdown
table (the one in ``docs/demo.md``).

    python benchmarks/shapes_mask_energy.py --images 60
"""

from __future__ import annotations

import argparse
import time

import torch

from naflow_fx import compile_naflow
from naflow_fx.data.shapes import make_shapes, normalize
from naflow_fx.metrics import energy_on_mask
from naflow_fx.zoo.shapes import shapes_resnet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="held-out images (default 60)")
    parser.add_argument("--batch", type=int, default=10, help="images per flow call (default 10)")
    parser.add_argument("--layers", default="all", help="all, conv or blocks (default all)")
    args = parser.parse_args(argv)
    model = shapes_resnet()
    data = make_shapes(args.images, seed=1)
    x = normalize(data.images)
    nf = compile_naflow(model, x[:1], layers=args.layers)
    methods = {"NAFlow": nf, "Grad-CAM": nf.gradcam, "LayerCAM": nf.layercam}
    shares: dict[str, dict[str, list[torch.Tensor]]] = {m: {n: [] for n in nf.layers} for m in methods}
    correct, start = 0, time.perf_counter()
    for i in range(0, args.images, args.batch):
        xb, masks = x[i : i + args.batch], data.masks[i : i + args.batch]
        for method, fn in methods.items():
            res = fn(xb)
            for name, s in energy_on_mask(res, masks).items():
                shares[method][name].append(s)
        correct += int((res.classes == data.labels[i : i + args.batch]).sum())
    seconds = time.perf_counter() - start
    area = float(data.masks.float().flatten(1).mean(1).mean())
    print(f"{args.images} held-out images (seed 1), {correct}/{args.images} correctly classified, {seconds:.0f} s\n")
    print("| layer | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for name in nf.layers:
        cells = [f"{float(torch.cat(shares[m][name]).mean()):.2f}" for m in methods]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    print("| uniform map (mask area) | " + " | ".join(f"{area:.2f}" for _ in methods) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

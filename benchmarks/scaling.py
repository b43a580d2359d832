"""Time and peak memory of a full NAFlow flow against input size and batch size (pytorch-grad-cam beside it).

Every point is measured by ``bench_vs_gradcam.run_one`` with the same conventions: random
weights, every layer explained, maps only (``keep="maps"``), time and peak memory from separate
processes. Writes a figure (time and memory against size, and against batch) and the numbers as
JSON.

    python benchmarks/scaling.py          # ResNet-50, sizes 64–448, batches 1–32: rewrites docs/performance_scaling.*
    python benchmarks/scaling.py --sizes 64,128,224 --batches 1,2,4 --out /tmp/scaling   # a shorter sweep

It prints a Markdown table of every point when done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_gradcam import check_device, run_one


def measure(model: str, size: int, batch: int, device: str) -> dict:
    out = {"size": size, "batch": batch}
    for method in ("pgc", "naflow"):
        spec = dict(model=model, batch=batch, size=size, device=device, method=method, repeats=3, keep="maps")
        out[method] = run_one({**spec, "options": {}})
        out[method]["peak_mib"] = run_one({**spec, "options": {}, "memory": True}).get("peak_mib", float("nan"))
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def _measured(point: dict) -> bool:
    return all(isinstance(point[m].get(f), (int, float)) for m in ("naflow", "pgc") for f in ("seconds", "peak_mib"))


def table(points: list[dict]) -> str:
    """Every point as a Markdown row; a failed one shows its error."""
    rows = [
        "| size | batch | pgc s | NAFlow s | NAFlow / pgc | pgc peak MiB | NAFlow peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        pgc, nf = p["pgc"], p["naflow"]
        if "seconds" not in pgc or "seconds" not in nf:
            error = nf.get("error") or pgc.get("error") or "?"
            rows.append(f"| {p['size']} | {p['batch']} | {error} | | | | |")
            continue
        rows.append(
            f"| {p['size']} | {p['batch']} | {pgc['seconds']:.3f} | {nf['seconds']:.2f} | "
            f"{nf['seconds'] / pgc['seconds']:.0f}× | {pgc['peak_mib']:.0f} | {nf['peak_mib']:.0f} |"
        )
    return "\n".join(rows)


def plot(sizes: list[dict], batches: list[dict], model: str, path: str, batch_side: int = 224) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from naflow_fx.viz import atomic_savefig

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for col, (points, key, label) in enumerate(((sizes, "size", "input side (px)"), (batches, "batch", "batch size"))):
        ok = [p for p in points if _measured(p)]
        xs = [p[key] for p in ok]
        if not ok:
            for row in range(2):
                axes[row, col].text(0.5, 0.5, "no point measured", ha="center", va="center")
            continue
        for row, (field, unit) in enumerate((("seconds", "time (s)"), ("peak_mib", "peak memory (MiB)"))):
            ax = axes[row, col]
            ax.plot(xs, [p["naflow"][field] for p in ok], "o-", label="NAFlow (every layer)")
            ax.plot(xs, [p["pgc"][field] for p in ok], "s--", label="pytorch-grad-cam (every conv)")
            ax.set_xlabel(label)
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(f"{model}, batch 1")
    axes[0, 1].set_title(f"{model}, {batch_side}×{batch_side}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sizes", default="64,128,224,320,448", help="input sides at batch 1")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes at --batch-side")
    parser.add_argument("--batch-side", type=int, default=224, help="input side of the batch sweep (default 224)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/performance_scaling", help="stem of the .png and .json")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    start = time.perf_counter()
    sizes = [measure(args.model, int(s), 1, args.device) for s in args.sizes.split(",")]
    batches = [measure(args.model, args.batch_side, int(b), args.device) for b in args.batches.split(",")]
    from naflow_fx._io import atomic_write_text

    data = {
        "model": args.model,
        "device": args.device,
        "batch_side": args.batch_side,
        "sizes": sizes,
        "batches": batches,
    }
    atomic_write_text(args.out + ".json", json.dumps(data, indent=2) + "\n")  # first: the numbers are kept
    print(table(sizes + batches))
    if not any(_measured(p) for p in sizes + batches):
        print(f"wrote {args.out}.json; no point was measured, so no figure", file=sys.stderr)
        return 1
    plot(sizes, batches, args.model, args.out + ".png", args.batch_side)
    print(f"wrote {args.out}.png and .json in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

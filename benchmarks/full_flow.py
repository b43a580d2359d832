"""One full flow over every layer of a torchvision model: time, peak memory and solver statistics.

    python benchmarks/full_flow.py                           # ResNet-50, 224×224, batch 1, CPU
    python benchmarks/full_flow.py --model resnet18 --size 128 --batch 4

Prints a Markdown table. Peak memory is the process's peak resident set size (``ru_maxrss``), so
run it in a fresh process; "before flow" is the resident size after compiling, before the flow.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import torch
import torchvision

from naflow_fx import compile_naflow


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=500)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(args.model, weights=None).eval().to(args.device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    start = time.perf_counter()
    nf = compile_naflow(model, x, max_iter=args.max_iter)
    compile_s = time.perf_counter() - start
    before = rss_mib()
    start = time.perf_counter()
    flow = nf(x)
    flow_s = time.perf_counter() - start
    finite = all(bool(torch.isfinite(m).all()) for m in flow.maps.values())
    records = list(flow.diagnostics.values())
    solved = [r for r in records if r.method == "cgls"]
    rows = [
        ("model", f"{args.model} {args.size}×{args.size}, batch {args.batch}, {args.device}"),
        ("machine", f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"),
        ("layers with maps", f"{len(flow.layers)} (all finite: {finite})"),
        ("compile s", f"{compile_s:.1f}"),
        ("flow s", f"{flow_s:.1f}"),
        ("RSS before flow MiB", f"{before:.0f}"),
        ("peak RSS MiB", f"{peak_mib():.0f}"),
        ("CGLS solves", f"{len(solved)}, {sum(r.iterations for r in solved)} iterations in total"),
        ("unconverged solves", f"{sum(not r.converged for r in records)} (max_iter={args.max_iter})"),
        ("max relative residual", f"{max((r.residual for r in records), default=0.0):.2e}"),
    ]
    print("| quantity | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

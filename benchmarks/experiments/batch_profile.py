"""Experiment: where does batching stop paying off? Per-region cost per sample and iteration.

Prediction: a batch of B runs B solves together, so each CGLS iteration costs about B times a
batch-1 iteration, minus what batching saves in per-call overhead. That saving should be largest
on the small late feature maps (7×7) and vanish on the large early ones (56×56), whose
activation-sized tensors no longer fit in the caches. Each new tensor of several MiB is also
fresh memory from the system, paid for in page faults.

Each run is a fresh process with one flow over every layer (default ``resnet50`` at 224, random
weights and inputs as in ``bench_vs_gradcam.py``, maps only unless ``--keep all``). It prints,
per batch size: the flow time, the time per image and its fraction of batch 1, the minor page
faults and system CPU time of the flow, then the cost of one CGLS iteration per sample for each
group of regions (``layer1`` …).
With ``--tuned-malloc`` every batch is run a second time with glibc told to keep freed memory
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), a process-wide
setting that the library does not make for its users.

    python benchmarks/experiments/batch_profile.py --batches 1,8 --tuned-malloc   # 10 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build

TUNED = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest: tensors up to 32 MiB come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),  # and freed memory stays in the process
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def worker(model_name: str, batch: int, size: int, keep: str) -> dict:
    from naflow_fx import compile_naflow

    model, x, _ = _build(model_name, batch, size, "cpu")
    nf = compile_naflow(model, x)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    flow = nf(x, keep=keep)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    groups: dict[str, list[float]] = {}
    for rec in flow.diagnostics.values():
        if rec.method == "cgls" and rec.iterations:
            group = rec.layer.split(".")[0] + (" (downsampling)" if ".0." in rec.layer else "")
            groups.setdefault(group, [0.0, 0])
            groups[group][0] += rec.seconds
            groups[group][1] += rec.iterations
    return {
        "seconds": seconds,
        "faults": after.ru_minflt - before.ru_minflt,
        "system_s": after.ru_stime - before.ru_stime,
        "ms_per_sample_iteration": {g: 1e3 * s / n / batch for g, (s, n) in groups.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--keep", default="maps", choices=["maps", "all"], help="what the flow returns (default maps)")
    parser.add_argument("--tuned-malloc", action="store_true", help="also run with glibc keeping memory")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.model, int(args.worker), args.size, args.keep)))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    variants = [("default", {})] + ([("tuned malloc", TUNED)] if args.tuned_malloc else [])
    rows = []
    for label, extra in variants:
        for batch in batches:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **extra}
            cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--size", str(args.size)]
            cmd += ["--keep", args.keep]
            proc = subprocess.run([*cmd, "--worker", str(batch)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append((label, batch, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"done: {label}, batch {batch}", file=sys.stderr, flush=True)
    base = {label: r["seconds"] for label, b, r in rows if b == 1}
    groups = list(rows[0][2]["ms_per_sample_iteration"])
    machine = f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{args.model} {args.size}×{args.size}, keep={args.keep!r}, {machine}\n")
    head = ["malloc", "batch", "flow s", "s per image", "fraction of batch 1", "minor faults", "system CPU s"]
    print("| " + " | ".join(head + [f"{g} ms" for g in groups]) + " |")
    print("|" + "---|" * (len(head) + len(groups)))
    for label, batch, r in rows:
        per_image = r["seconds"] / batch
        frac = f"{per_image / base[label]:.2f}" if label in base else "–"
        cells = [label, str(batch), f"{r['seconds']:.1f}", f"{per_image:.1f}", frac, f"{r['faults']:,}"]
        cells += [f"{r['system_s']:.1f}"] + [f"{r['ms_per_sample_iteration'].get(g, float('nan')):.1f}" for g in groups]
        print("| " + " | ".join(cells) + " |")
    print("\nThe last columns are milliseconds per CGLS iteration and per sample, by group of regions.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

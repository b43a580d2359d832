"""A/B: whole flows of this working tree against an earlier git revision, side by side.

For levers that change the library itself (a solver loop, a rule), with nothing left to switch
off at run time. The base revision is checked out into a temporary git worktree. Each flow runs
in a fresh subprocess that imports ``naflow_fx`` from one tree or the other. Runs alternate
(base, new, base, new, ...) so that the machine's drift hits both alike. Each run compiles, makes
one warm-up call and times one flow over every layer with ``keep="maps"`` (random weights, seed
0, as in ``bench_vs_gradcam.py``). The table gives the median times, the speed-up, the CGLS
iterations and the smallest Pearson r between the two trees' maps.

    python benchmarks/experiments/ab_flows.py --base HEAD~1 --runs resnet50:1,mobilenet_v2:1,mobilenet_v2:8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from bench_vs_gradcam import _build, min_pearson, run_worker, timed_flow  # noqa: E402


def worker(spec: dict) -> dict:
    """One flow in this process (``naflow_fx`` from ``sys.path``); saves its maps to ``spec["maps"]``."""
    import torch

    model, x, _ = _build(spec["model"], spec["batch"], spec["size"], "cpu")
    flow, seconds = timed_flow(model, x)
    torch.save({k: flow.maps[k] for k in flow.layers}, spec["maps"])
    return {"seconds": seconds, "iterations": sum(r.iterations for r in flow.diagnostics.values())}


def _run(tree: str, spec: dict) -> dict:
    out = run_worker(__file__, spec, {**os.environ, "PYTHONPATH": tree}, cwd=tree)
    if "error" in out:
        raise RuntimeError(f"worker failed in {tree}: {out['error']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--runs", default="resnet50:1,mobilenet_v2:1,mobilenet_v2:8", help="model:batch,...")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tree and point (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    git = ["git", "rev-parse", "--short", args.base]
    base_rev = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="naflow-ab-") as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base_tree, base_rev], cwd=ROOT, check=True)
        try:
            print(f"base {base_rev} against the working tree; {args.size}×{args.size}, maps only, cpu\n")
            print("| model | batch | base s | new s | speed-up | CGLS iterations (base · new) | min r |")
            print("|---|---|---|---|---|---|---|")
            for item in args.runs.split(","):
                name, batch = item.split(":")
                spec = {"model": name, "batch": int(batch), "size": args.size}
                times: dict[str, list[float]] = {"base": [], "new": []}
                its, maps = {}, {}
                for i in range(args.repeats):
                    for label, tree in (("base", base_tree), ("new", ROOT)):
                        path = os.path.join(tmp, f"{label}.pt")
                        out = _run(tree, {**spec, "maps": path})
                        times[label].append(out["seconds"])
                        its[label] = out["iterations"]
                        if i == 0:
                            maps[label] = torch.load(path)
                base_s, new_s = statistics.median(times["base"]), statistics.median(times["new"])
                print(
                    f"| {name} | {batch} | {base_s:.2f} | {new_s:.2f} | {base_s / new_s:.2f}× "
                    f"| {its['base']} · {its['new']} | {min_pearson(maps['base'], maps['new']):.5f} |",
                    flush=True,
                )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

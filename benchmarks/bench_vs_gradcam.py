"""NAFlow against pytorch-grad-cam: time, accuracy and peak memory, side by side in one run.

For each model (random weights, seed 0) and batch size, at one input size, it measures:

- ``naflow``: NAFlow over every layer (``compile_naflow(model)``; compile time reported apart),
  returning the maps only (``keep="maps"``), as pytorch-grad-cam does;
- ``naflow_all``: peak memory only, of the same flow returning every layer's map, BPFM and
  coefficients (``keep="all"``, the default).
- ``pgc``: pytorch-grad-cam ``GradCAM`` over every ``nn.Conv2d`` (``compute_cam_per_layer`` runs
  inside its ``__call__``), the baseline of the ratios;
- ``own_gradcam``: this project's on-device Grad-CAM on the same conv layers (``nf.gradcam``).

Each measurement runs in its own subprocess. Times are the median of ``--repeats`` calls after a
warm-up call (NAFlow: one call, it is long, after a warm-up whose CGLS stops at 2 iterations).
Peak memory is measured in separate processes, as the peak minus the memory in use right before
the call (model and input built, compiled, one warm-up call done, so that one-time caches of torch
and oneDNN are not counted): ``max_memory_allocated`` on CUDA; on the CPU ``ru_maxrss`` with glibc
told to return every block of 64 KiB or more to the system when it is freed
(``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536``), so that resident memory follows the
tensors alive rather than what the allocator keeps from earlier calls. The NAFlow memory runs stop
CGLS after 2 iterations: the iteration count changes time, not the buffers alive.

Accuracy of the NAFlow run: every inverse step's relative residual (from the diagnostics) and,
with ``--reference``, each layer map's Pearson r against a tightly converged solve of the same
problem (``tol=1e-8``, ``max_iter=5000``; expensive: minutes per model).

    python benchmarks/bench_vs_gradcam.py            # the full table (long): rewrites benchmarks/results/vs_gradcam.*
    python benchmarks/bench_vs_gradcam.py --models resnet18 --batches 1 --out /tmp/one_row
    python benchmarks/bench_vs_gradcam.py --reference --models resnet50 --batches 1 --out /tmp/reference

Writes a Markdown table to stdout and to ``--out``.md, and every number to ``--out``.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

TIMED = ("pgc", "own_gradcam", "naflow")
MEMORY = ("pgc", "naflow", "naflow_all")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(name: str, batch: int, size: int, device: str):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return model, x, convs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))  # the device measured, not the current one


def worker(spec: dict) -> dict:
    """One measurement in this process: ``spec`` = model, batch, size, device, method, repeats."""
    from naflow_fx import compile_naflow

    device, method = spec["device"], spec["method"]
    model, x, convs = _build(spec["model"], spec["batch"], spec["size"], device)
    out: dict = {"conv_layers": len(convs)}
    if method == "pgc":
        from pytorch_grad_cam import GradCAM

        modules = dict(model.named_modules())
        cam = GradCAM(model=model, target_layers=[modules[n] for n in convs])
        cam(input_tensor=x, targets=None)  # warm-up
        call = lambda: cam(input_tensor=x, targets=None)  # noqa: E731
    elif method == "own_gradcam":
        nf = compile_naflow(model, x[:1], layers="conv")
        nf.gradcam(x)  # warm-up
        call = lambda: nf.gradcam(x)  # noqa: E731
    else:
        start = time.perf_counter()
        nf = compile_naflow(model, x[:1], **spec.get("options", {}))
        out["compile_s"] = time.perf_counter() - start
        out["layers"] = len(nf.layers)
        call = lambda: nf(x, keep=spec.get("keep", "all"))  # noqa: E731
        # warm-up, as for the Grad-CAMs: one-time caches of torch, oneDNN (or cuDNN) and the flow's
        # own (the maps network, weight-only σ_max); the timed run caps CGLS at 2 iterations for it
        timed_config = nf.config
        if not spec.get("memory"):
            nf.config = dataclasses.replace(nf.config, max_iter=2)
        call()
        nf.config = timed_config
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        base = torch.cuda.memory_allocated(torch.device(device)) / 2**20
    else:
        base = _rss_mib()
    times, result = [], None
    for _ in range(spec["repeats"] if not method.startswith("naflow") else 1):
        _sync(device)
        start = time.perf_counter()
        result = call()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 if device.startswith("cuda") else _peak_mib()
    out.update(seconds=statistics.median(times), peak_mib=max(peak - base, 0.0))
    if method == "naflow":
        out["residuals"] = {k: r.residual for k, r in result.diagnostics.items()}
        out["iterations"] = sum(r.iterations for r in result.diagnostics.values())
        out["converged"] = all(r.converged for r in result.diagnostics.values())
        out["finite"] = all(bool(torch.isfinite(m).all()) for m in result.maps.values())
        if spec.get("reference"):
            ref_nf = compile_naflow(model, x[:1], tol=1e-8, max_iter=5000)
            _sync(device)
            start = time.perf_counter()
            ref = ref_nf(x)
            _sync(device)
            out["reference_s"] = time.perf_counter() - start
            out["pearson"] = {name: _pearson(result.maps[name], ref.maps[name]) for name in result.layers}
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest per-sample Pearson r of two ``[B, h, w]`` maps (1 when both are constant)."""
    rs = []
    for u, v in zip(a.flatten(1).double(), b.flatten(1).double()):
        u, v = u - u.mean(), v - v.mean()
        den = float(u.norm() * v.norm())
        rs.append(1.0 if den == 0 and float(u.norm() + v.norm()) == 0 else (float(u @ v) / den if den else 0.0))
    return min(rs)


def min_pearson(a: dict, b: dict) -> float:
    """The smallest :func:`_pearson` over the layers of two flows' maps (by name) that have more than one pixel."""
    return min(_pearson(a[k], b[k]) for k in a if a[k][0].numel() > 1)


def timed_flow(model, x: torch.Tensor, **options):
    """``(flow, seconds)``: compile on ``x[:1]``, one warm-up call (σ_max caches, allocator), then one
    timed flow over every layer with ``keep="maps"``."""
    from naflow_fx import compile_naflow

    nf = compile_naflow(model, x[:1], **options)
    nf(x, keep="maps")
    start = time.perf_counter()
    flow = nf(x, keep="maps")
    return flow, time.perf_counter() - start


def flows_with_rule_replaced(model, x: torch.Tensor, module, name: str, replacement):
    """``(flow, seconds, flow_before, seconds_before)``: :func:`timed_flow` as the library is, then
    with ``module.name`` (a rule's predicate) replaced, restored afterwards."""
    flow, seconds = timed_flow(model, x)
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        before, before_s = timed_flow(model, x)
    finally:
        setattr(module, name, original)
    return flow, seconds, before, before_s


def run_worker(script: str, spec: dict, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``python script --worker JSON(spec)`` in a fresh process: the last JSON line it prints,
    or ``{"error": its last line on stderr}``."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def run_one(spec: dict) -> dict:
    """Run :func:`worker` in a fresh subprocess; returns its result (or the error).

    ``spec["memory"]``: a memory run (glibc returns freed blocks at once; NAFlow capped at 2
    iterations; one call).
    """
    env = dict(os.environ)
    if spec.get("memory"):
        env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=65536"
        spec = {**spec, "repeats": 1}
        if spec["method"].startswith("naflow"):
            spec["options"] = {**spec.get("options", {}), "max_iter": 2}
    return run_worker(__file__, spec, env)


def _ratio(a: float, b: float) -> str:
    """``a / b`` as ``3.1×``; "–" when ``b`` is under 0.5 MiB (at small sizes pytorch-grad-cam's peak
    rounds to nothing, and a ratio to it would mean nothing)."""
    return f"{a / b:.1f}×" if b >= 0.5 else "–"


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse a CUDA device on a machine without one before any work (``parser.error``: exit 2)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine")


def table(rows: list[dict]) -> str:
    head = (
        "| model | batch | pgc s | own Grad-CAM s | NAFlow s | NAFlow / pgc | per image vs batch 1 (pgc · NAFlow) "
        "| compile s | peak MiB (pgc · NAFlow maps · NAFlow all) | max residual | min Pearson r | CGLS iterations |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first: dict = {}
    for r in rows:
        p, o, n = r["pgc"], r["own_gradcam"], r["naflow"]
        mem = {m: r["memory"].get(m, {}).get("peak_mib", float("nan")) for m in MEMORY}
        failed = [m for m in (n, p, o) if "error" in m]
        if failed:
            lines.append(f"| {r['model']} | {r['batch']} | error: {failed[0]['error']} |")
            continue
        key = r["model"]
        if r["batch"] == 1:
            first[key] = (p["seconds"], n["seconds"])
        scaling = "–"
        if key in first and r["batch"] > 1:
            f_p = p["seconds"] / r["batch"] / first[key][0]
            f_n = n["seconds"] / r["batch"] / first[key][1]
            scaling = f"{f_p:.2f} · {f_n:.2f}"
        pearson = f"{min(n['pearson'].values()):.4f}" if n.get("pearson") else "–"
        lines.append(
            f"| {r['model']} | {r['batch']} | {p['seconds']:.3f} | {o['seconds']:.3f} | {n['seconds']:.2f} "
            f"| {n['seconds'] / p['seconds']:.0f}× | {scaling} | {n['compile_s']:.1f} "
            f"| {mem['pgc']:.0f} · {mem['naflow']:.0f} ({_ratio(mem['naflow'], mem['pgc'])}) · {mem['naflow_all']:.0f} "
            f"| {max(n['residuals'].values()):.2f} | {pearson} "
            f"| {n['iterations']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="resnet18,resnet50,vgg16_bn", help="comma-separated torchvision names")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the Grad-CAMs (median; default 5)")
    parser.add_argument("--reference", action="store_true", help="also solve tightly and report Pearson r")
    parser.add_argument("--max-iter", type=int, default=None, help="NAFlow CGLS iteration cap (default: library's)")
    parser.add_argument("--out", default="benchmarks/results/vs_gradcam", help="output stem for .md and .json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    check_device(parser, args.device)
    options = {} if args.max_iter is None else {"max_iter": args.max_iter}
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"model": name, "batch": batch, "size": args.size}
            row["memory"] = {}
            for memory, methods in ((False, TIMED), (True, MEMORY)):
                for method in methods:
                    spec = dict(model=name, batch=batch, size=args.size, device=args.device, method=method)
                    spec.update(repeats=args.repeats, options=options, memory=memory)
                    spec.update(keep="maps" if method == "naflow" else "all")
                    spec.update(reference=args.reference and method == "naflow" and not memory)
                    start = time.perf_counter()
                    result = run_one(spec)
                    (row["memory"] if memory else row)[method] = result
                    kind = "memory" if memory else "time"
                    took = time.perf_counter() - start
                    print(f"{name} batch {batch} {method} ({kind}): {took:.0f}s", file=sys.stderr)
            rows.append(row)
    machine = {
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }
    from naflow_fx._io import atomic_write_text

    atomic_write_text(args.out + ".json", json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")  # first
    text = f"{args.size}×{args.size}, {args.device}, {machine['threads']} threads, torch {torch.__version__}\n\n"
    text += table(rows)
    print(text)
    atomic_write_text(args.out + ".md", text + "\n")
    failed = all("error" in r["naflow"] or "error" in r["pgc"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

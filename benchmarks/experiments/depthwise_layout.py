"""Experiment: depthwise convolutions solved in channels-last (NOTE [depthwise layout]).

Prediction: in MobileNet-type flows the depthwise convs' CGLS steps cost most of the time, and
one iteration of a stride-2 depthwise step cost about 3.3 ms where its forward costs 0.5 ms.
oneDNN has fast channels-last depthwise kernels, and the NCHW adjoint at stride 2 allocates
large temporaries on each call, so each new page is a page fault. Solving in channels-last
should make each iteration several times cheaper. The answer must not change beyond float32
rounding.

Part 1 times one depthwise conv's forward and adjoint (``vjp``) at MobileNet-V2's shapes, in
NCHW and channels-last, with the page faults per call. Part 2 runs whole flows over every layer
(random weights, seed 0, each after a warm-up call) with the depthwise solves in NCHW, as before,
and in channels-last. For each flow it prints the times, the CGLS iterations, and the smallest
Pearson r between the two flows' maps.

    python benchmarks/experiments/depthwise_layout.py        # 6 min
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
from torch.func import vjp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build, flows_with_rule_replaced, min_pearson

import naflow_fx.rules.linear as linear_rules

MODELS = "mobilenet_v2,mnasnet1_0,mobilenet_v3_large,efficientnet_b0"
# MobileNet-V2's depthwise convs at 224: (channels, input side, stride)
SHAPES = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (384, 14, 1), (576, 14, 2), (960, 7, 1)]


def _time(fn, repeats: int = 50) -> tuple[float, float]:
    """Milliseconds and minor page faults per call, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    ms = (time.perf_counter() - start) / repeats * 1e3
    return ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats


def conv_part(batch: int) -> None:
    print(f"one depthwise 3×3 conv, batch {batch}: ms per call (page faults per call)\n")
    print("| channels | input | stride | forward NCHW · channels-last | adjoint NCHW · channels-last |")
    print("|---|---|---|---|---|")
    for c, side, stride in SHAPES:
        w = torch.randn(c, 1, 3, 3)

        def conv(z, w=w, stride=stride, c=c):
            return torch.conv2d(z, w, None, stride, 1, 1, c)

        cells = {"fwd": [], "adj": []}
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(batch, c, side, side).contiguous(memory_format=fmt)
            y = conv(x)
            adjoint = vjp(conv, torch.zeros_like(x))[1]
            for key, fn in (("fwd", lambda x=x: conv(x)), ("adj", lambda y=y, a=adjoint: a(y))):
                ms, faults = _time(fn)
                cells[key].append(f"{ms:.2f} ({faults:.0f})")
        print(f"| {c} | {side}×{side} | {stride} | {' · '.join(cells['fwd'])} | {' · '.join(cells['adj'])} |")
    print()


def flow_part(models: list[str], batches: list[int], size: int) -> None:
    print(f"whole flows, {size}×{size}, every layer, maps only\n")
    print(
        "| model | batch | conv steps by CGLS | CGLS iterations (NCHW · channels-last) "
        "| flow s (NCHW · channels-last) | speed-up | min r |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in models:
        for batch in batches:
            model, x, _ = _build(name, batch, size, "cpu")
            # the rule as it was: NCHW solves
            fast, fast_s, slow, slow_s = flows_with_rule_replaced(
                model, x, linear_rules, "_depthwise", lambda w, g: False
            )
            steps = 0
            for node in fast.diagnostics.values():
                steps += node.rule == "conv2d_inverse" and node.method == "cgls"
            its = [sum(r.iterations for r in f.diagnostics.values() if r.method == "cgls") for f in (slow, fast)]
            print(
                f"| {name} | {batch} | {steps} | {its[0]} · {its[1]} | {slow_s:.2f} · {fast_s:.2f} "
                f"| {slow_s / fast_s:.2f}× | {min_pearson(slow.maps, fast.maps):.5f} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    conv_part(1)
    flow_part(args.models.split(","), [int(b) for b in args.batches.split(",")], args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment: 1×1 convolutions in closed form against CGLS (docs/naflow.md, decision 31).

Prediction: a 1×1 convolution without padding applies one channel matrix at every pixel it
reads, so one small SVD per layer solves its damped inverse exactly, where CGLS iterates over the
whole feature map. ResNets and VGG gain nothing (their 1×1 convs are inside bottleneck regions,
or absent); mobile networks (the 1×1 projection that ends each non-residual block), SqueezeNet
(its squeeze convs) and DenseNet (its transitions) should.

For each model (random weights, seed 0, batch 1) it runs one flow over every layer with the
closed form and one with the 1×1 convs sent to CGLS as before, each after a warm-up call (so
σ_max of the shared layers is cached, as in ``bench_vs_gradcam.py``). It prints the flow times,
the conv steps solved in closed form, the CGLS iterations of the whole flow, and the smallest
Pearson r between the two flows' maps over the layers whose map has more than one pixel.

    python benchmarks/experiments/pointwise_conv.py        # 3 min
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build, flows_with_rule_replaced, min_pearson

import naflow_fx.rules.linear as linear_rules

MODELS = "mobilenet_v2,efficientnet_b0,mnasnet1_0,squeezenet1_1,densenet121,shufflenet_v2_x1_0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    print(f"{args.size}×{args.size}, batch 1, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    head = ["model", "conv steps in closed form", "CGLS iterations (CGLS · closed form)", "flow s (CGLS · closed form)"]
    print("| " + " | ".join([*head, "min r"]) + " |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        model, x, _ = _build(name, 1, args.size, "cpu")
        # the rule as it was: CGLS for every conv
        fast, fast_s, slow, slow_s = flows_with_rule_replaced(model, x, linear_rules, "_pointwise", lambda w, p: False)
        convs = [r for r in fast.diagnostics.values() if r.rule == "conv2d_inverse"]
        closed = sum(r.method == "closed form" for r in convs)
        its = [sum(r.iterations for r in f.diagnostics.values() if r.method == "cgls") for f in (slow, fast)]
        print(
            f"| {name} | {closed} of {len(convs)} | {its[0]} · {its[1]} | {slow_s:.2f} · {fast_s:.2f} "
            f"| {min_pearson(slow.maps, fast.maps):.5f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

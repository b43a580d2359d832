"""Experiment: would bfloat16 operators or ``torch.compile`` make a CGLS iteration cheaper?

Predictions:

- **bfloat16.** This CPU has AMX tiles, so oneDNN runs bfloat16 convolutions several times
  faster than float32 ones. But bfloat16 keeps 8 bits of mantissa: ``J`` and ``Jᵀ`` applied in it
  are off by about 0.4 % per application, and with a damped condition number of 10⁴ that is
  far above the normal-equation residual of 1e-4 the solves stop at. Expected: CGLS on the
  bfloat16 operators stagnates well above the tolerance.
- **torch.compile.** A region's ``J`` and ``Jᵀ`` are mostly convolutions (oneDNN) with a few
  elementwise ops between them. Inductor can fuse only the elementwise ops, so it can win at
  most their share of the time.

It prints three tables for ResNet-50's identity blocks ``layer1.1`` … ``layer4.1`` (random weights,
batch 1, 224×224 input):

1. the time of one block forward in float32, in bfloat16, and in bfloat16 channels-last;
2. the share of convolution kernels in ``J`` and ``Jᵀ`` of the region solve (torch.profiler);
3. one block's forward and backward, eager against ``torch.compile`` (compile time apart);

and then CGLS on the real right-hand side of one region (``--region``, default ``layer3.1``),
with the operators in float32 and in bfloat16 (channels-last).

    python benchmarks/experiments/precision_and_compile.py      # 5 min
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build

import naflow_fx.rules.generic as generic
from naflow_fx import compile_naflow
from naflow_fx.solvers.iterative import cgls
from naflow_fx.solvers.operator import LinearOperator, batch_norm2

BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")


def _ms(fn, *args, n: int = 20) -> float:
    """Best of 5 means of ``n`` calls of ``fn(*args)``, in milliseconds."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn(*args)
        times.append((time.perf_counter() - start) * 1e3 / n)
    return min(times)


def _forward_backward(fn, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(fn(a), a, grad)[0]


SHAPES = {"layer1.1": (256, 56, 56), "layer2.1": (512, 28, 28), "layer3.1": (1024, 14, 14), "layer4.1": (2048, 7, 7)}


def _capture_regions(model, x) -> dict:
    """Run one flow and keep, per identity block, its stage, input, extras and right-hand side."""
    captured = {}
    original = generic._solve_affine_piece

    def capture(solver, bpfm_out, stage, input, *extras):
        name = solver._current.layer.removesuffix(".add")
        if name in BLOCKS:
            op, theta = generic.affine_piece(stage, input, *extras)
            lam = solver.config.damping * float(solver.sigma_max(op, input)[0])
            captured[name] = (stage, input, extras, (bpfm_out - theta).detach(), op, lam)
        return original(solver, bpfm_out, stage, input, *extras)

    generic._solve_affine_piece = capture
    try:
        compile_naflow(model, x)(x, keep="maps")
    finally:
        generic._solve_affine_piece = original
    return captured


def _bf16_operator(stage, input, extras) -> LinearOperator:
    """``J`` and ``Jᵀ`` of the region in bfloat16 channels-last; float32 vectors in and out."""
    low = torch.bfloat16
    stage = copy.deepcopy(stage).to(low).to(memory_format=torch.channels_last)
    point = input.to(low).contiguous(memory_format=torch.channels_last)
    extras = [e.to(low) if torch.is_tensor(e) and e.is_floating_point() else e for e in extras]
    op, _ = generic.affine_piece(stage, point, *extras)

    def cast(t):
        return t.to(low).contiguous(memory_format=torch.channels_last)

    return LinearOperator(
        matvec=lambda t: op.matvec(cast(t)).float().contiguous(),
        rmatvec=lambda y: op.rmatvec(cast(y)).float().contiguous(),
        in_shape=op.in_shape,
        out_shape=op.out_shape,
        shared=False,
        jacobian=op.jacobian,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", default="layer3.1", choices=BLOCKS)
    args = parser.parse_args(argv)
    model, x, _ = _build("resnet50", 1, 224, "cpu")
    blocks = dict(model.named_modules())
    print(f"ResNet-50, batch 1, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}\n")

    print("| block | float32 forward ms | bfloat16 ms | bfloat16 channels-last ms |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name in BLOCKS:
            block, a = blocks[name], torch.randn(1, *SHAPES[name])
            low = copy.deepcopy(block).to(torch.bfloat16)
            a_low = a.to(torch.bfloat16)
            low_cl = copy.deepcopy(low).to(memory_format=torch.channels_last)
            a_cl = a_low.contiguous(memory_format=torch.channels_last)
            row = [_ms(block, a), _ms(low, a_low), _ms(low_cl, a_cl)]
            print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in row) + " |")

    regions = _capture_regions(model, x)
    print("\n| region | J ms | convolution share of J | Jᵀ ms | convolution share of Jᵀ |")
    print("|---|---|---|---|---|")
    for name in BLOCKS:
        op, rhs = regions[name][4], regions[name][3]
        p = op.rmatvec(rhs)
        cells = []
        for fn, arg in ((op.matvec, p), (op.rmatvec, rhs)):
            for _ in range(3):
                fn(arg)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    fn(arg)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
            cells += [f"{total / 20 / 1e3:.2f}", f"{100 * conv / total:.0f} %"]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| block | eager forward+backward ms | torch.compile ms | compile s |")
    print("|---|---|---|---|")
    for name in ("layer1.1", "layer3.1"):
        block, a = blocks[name], torch.randn(1, *SHAPES[name], requires_grad=True)
        grad = torch.randn(1, *SHAPES[name])
        eager = _ms(_forward_backward, block, a, grad)
        start = time.perf_counter()
        compiled = torch.compile(block)
        _forward_backward(compiled, a, grad)
        compile_s = time.perf_counter() - start
        print(f"| {name} | {eager:.2f} | {_ms(_forward_backward, compiled, a, grad):.2f} | {compile_s:.1f} |")

    stage, input, extras, rhs, op, lam = regions[args.region]
    with torch.no_grad():
        reference = cgls(op, rhs, lam, tol=1e-8, max_iter=3000).x

    def report(label: str, result, seconds: float) -> None:
        normal = op.rmatvec(rhs - op.matvec(result.x)) - lam**2 * result.x
        rel = float(batch_norm2(normal).sqrt() / batch_norm2(op.rmatvec(rhs)).sqrt())
        err = float(batch_norm2(result.x - reference).sqrt() / batch_norm2(reference).sqrt())
        print(f"| {label} | {result.iterations} | {seconds:.2f} | {rel:.1e} | {err:.1e} |")

    print(f"\nCGLS on region {args.region} (λ = 1e-2·σ_max), against a tol=1e-8 float32 solve:\n")
    print("| operators | iterations | s | true normal residual | solution error |")
    print("|---|---|---|---|---|")
    with torch.no_grad():  # as the inverse network runs
        for label, operator, tol, cap in (
            ("float32, tol 1e-4", op, 1e-4, 500),
            ("float32, tol 1e-3", op, 1e-3, 500),
            ("bfloat16 channels-last, tol 1e-4", _bf16_operator(stage, input, extras), 1e-4, 600),
        ):
            start = time.perf_counter()
            result = cgls(operator, rhs, lam, tol=tol, max_iter=cap)
            report(label, result, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Experiment: warm-starting the region solves from the recorded input (spec §4 lists warm starts).

Prediction: a region's right-hand side is ``B_w − θ``. When nothing downstream was abandoned it
equals ``J a_u``, so the recorded input ``a_u`` fits it exactly and looks like an ideal starting
point. But the damped solution is ``a_u − λ²(JᵀJ + λ²I)⁻¹a_u``: the error of ``x0 = a_u`` lies in
the directions of J's smallest singular values and its null space, which are exactly the
directions CGLS converges slowest in (their eigenvalue of ``JᵀJ + λ²I`` is about λ²). Started
from zero, the error is the solution itself, which sits mostly in the fast directions. So a warm
start from ``a_u`` should stop after fewer iterations, with the same normal-residual test, at
an iterate that still carries what min-norm should have removed (NOTE [CGLS from zero]), and
so with maps further from the converged solve.

For each start it runs one flow over every layer (random weights, seed 0, batch 1, every region
solve patched; one-op stages unchanged) and prints the region iterations, the time and the
smallest Pearson r of the maps against a converged solve from zero (``tol=1e-8``,
``max_iter=5000``), and the largest relative distance of a region's solution from the
converged one. Starts:

- ``zero``: the same CGLS from zero, the library's starting point;
- ``input``: ``x0 = a_u``;
- ``scaled input``: ``x0 = α·a_u`` with α minimising the damped objective along ``a_u``.

    python benchmarks/experiments/warm_start.py --model resnet18     # 7 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build, min_pearson

import naflow_fx.rules.generic as generic
from naflow_fx import compile_naflow
from naflow_fx.solvers.context import relative_residual
from naflow_fx.solvers.operator import batch_dot, batch_norm2


def cgls_from(op, b, lam2: float, x0, tol: float, max_iter: int):
    """CGLS for ``min ||Jx − b||² + λ²||x||²`` from ``x0`` (batch 1), with the library's stopping test
    ``||Jᵀ(b − Jx) − λ²x|| ≤ tol·||Jᵀb||``; returns ``(best iterate, iterations, the test's value at x0)``."""
    x = x0.clone()
    r = b - op.matvec(x)
    norm0 = float(batch_norm2(op.rmatvec(b)).sqrt())
    s = op.rmatvec(r) - lam2 * x
    p, gamma = s.clone(), float(batch_norm2(s))
    best, best_rel, it = x.clone(), gamma**0.5 / norm0, 0
    initial = best_rel
    for it in range(1, max_iter + 1):  # noqa: B007
        if best_rel <= tol:
            break
        q = op.matvec(p)
        alpha = gamma / float(batch_norm2(q) + lam2 * batch_norm2(p))
        x.add_(p, alpha=alpha)
        r.sub_(q, alpha=alpha)
        s = op.rmatvec(r) - lam2 * x
        gamma_new = float(batch_norm2(s))
        if gamma_new**0.5 / norm0 < best_rel:
            best, best_rel = x.clone(), gamma_new**0.5 / norm0
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
    return best, it, initial


def patched_solve(start: str, solutions: dict, initial: list | None = None):
    def solve(solver, bpfm_out, stage, input, *extras):
        op, theta = generic.affine_piece(stage, input, *extras)
        rhs = bpfm_out - theta
        rec, cfg = solver._record(), solver.config
        lam = cfg.damping * solver.sigma_max(op, rhs, rec.layer)
        lam2 = float(lam.max()) ** 2
        x0 = torch.zeros_like(input) if start == "zero" else input.clone()
        if start == "scaled input":
            jx0 = op.matvec(x0)
            x0 = x0 * float(batch_dot(jx0, rhs) / (batch_norm2(jx0) + lam2 * batch_norm2(x0)))
        x, its, rel0 = cgls_from(op, rhs, lam2, x0, cfg.tol, int(cfg.max_iter))
        if initial is not None:
            initial.append(rel0)
        rec.method, rec.iterations, rec.damping = "cgls", its, lam2**0.5
        rec.residual = relative_residual(op.matvec(x), rhs)
        solutions[rec.layer] = x
        return x

    return solve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    model, x, _ = _build(args.model, 1, args.size, "cpu")
    original = generic._solve_affine_piece
    ref_solutions: dict = {}
    generic._solve_affine_piece = patched_solve("zero", ref_solutions)
    try:
        ref = compile_naflow(model, x, tol=1e-8, max_iter=5000)(x, keep="maps")
        print(f"{args.model} at {args.size}, batch 1, {torch.get_num_threads()} threads\n")
        head = "| start | initial normal residual (median over regions) | region iterations | of which the first region"
        head += " | flow s"
        print(head + " | min Pearson r vs converged | largest error of a region solution |")
        print("|---|---|---|---|---|---|---|")
        for start in ("zero", "input", "scaled input"):
            solutions: dict = {}
            initial: list = []
            generic._solve_affine_piece = patched_solve(start, solutions, initial)
            nf = compile_naflow(model, x)
            nf(x, keep="maps")  # warm-up: σ_max caches, allocator
            solutions.clear()
            initial.clear()
            t0 = time.perf_counter()
            flow = nf(x, keep="maps")
            seconds = time.perf_counter() - t0
            regions = [r for r in flow.diagnostics.values() if r.rule == "region_inverse"]
            its = sum(r.iterations for r in regions)
            first = regions[0] if regions else None  # diagnostics run deep → shallow
            err = max(float((solutions[k] - ref_solutions[k]).norm() / ref_solutions[k].norm()) for k in solutions)
            cells = [start, f"{statistics.median(initial):.3g}", its, first.iterations if first else "–"]
            cells += [f"{seconds:.1f}", f"{min_pearson(flow.maps, ref.maps):.5f}", f"{err:.3f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    finally:
        generic._solve_affine_piece = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

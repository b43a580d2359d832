"""LSMR against CGLS on the region solves of a flow (docs/performance.md, "Levers").

    python benchmarks/experiments/lsmr.py --model resnet18          # 2 min

The library stops a solve when the relative normal residual ``||Jᵀr − λ²x|| / ||Jᵀb||`` falls
below ``tol``. CGLS (mathematically LSQR) minimises the residual ``||r||`` over its Krylov
space, and its normal residual is not monotone; LSMR (Fong and Saunders, 2011) minimises the
normal residual itself over the same space. So LSMR reaches that stopping rule in at most as
many iterations, at about the same cost per iteration. This script captures every region solve
of one flow (random weights, 224×224, batch 1), solves each with both methods to the library's
stopping rule, and compares iterations, seconds and the error against a tightly converged
solve. CGLS is also run to a ten times looser tolerance, for the same comparison at a
matched error.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from regions_common import zoo_regions

from naflow_fx.solvers.iterative import cgls
from naflow_fx.solvers.operator import batch_norm2


def lsmr(op, b: Tensor, lam: float, tol: float = 1e-4, max_iter: int = 500) -> tuple[Tensor, int, float]:
    """LSMR for ``min ||Jx − b||² + λ²||x||²`` from zero, one sample (``b.shape[0] == 1``).

    Written from the recurrences of Fong and Saunders (2011), section 2 and its damped variant
    (a rotation that folds λ into ᾱ before each step). Stops when the normal residual estimate
    ``|ζ̄|`` relative to ``||Jᵀb|| = α₁β₁`` falls below ``tol``. Returns ``(x, iterations,
    true relative normal residual)``.
    """
    u = b.clone()
    beta = math.sqrt(float(batch_norm2(u)))
    u /= beta
    v = op.rmatvec(u)
    alpha = math.sqrt(float(batch_norm2(v)))
    v /= alpha
    norm0 = alpha * beta
    zetabar, alphabar = alpha * beta, alpha
    rho, rhobar, cbar, sbar = 1.0, 1.0, 1.0, 0.0
    h, hbar, x = v.clone(), torch.zeros_like(v), torch.zeros_like(v)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        u = op.matvec(v).add_(u, alpha=-alpha)
        beta = math.sqrt(float(batch_norm2(u)))
        if beta > 0:
            u /= beta
        v = op.rmatvec(u).add_(v, alpha=-beta)
        alpha = math.sqrt(float(batch_norm2(v)))
        if alpha > 0:
            v /= alpha
        # fold the damping in: a rotation of (ᾱ, λ)
        alphahat = math.hypot(alphabar, lam)
        # the plane rotation P_k
        rho_old = rho
        rho = math.hypot(alphahat, beta)
        c, s = alphahat / rho, beta / rho
        theta_new = s * alpha
        alphabar = c * alpha
        # the rotation P̄_k
        rhobar_old = rhobar
        thetabar = sbar * rho
        rhobar = math.hypot(cbar * rho, theta_new)
        cbar, sbar = cbar * rho / rhobar, theta_new / rhobar
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        # the vectors
        hbar.mul_(-thetabar * rho / (rho_old * rhobar_old)).add_(h)
        x.add_(hbar, alpha=zeta / (rho * rhobar))
        h.mul_(-theta_new / rho).add_(v)
        if abs(zetabar) <= tol * norm0:
            break
    r = b - op.matvec(x)
    true = math.sqrt(float(batch_norm2(op.rmatvec(r) - lam**2 * x))) / norm0
    return x, it, true


def main() -> None:
    args, _, _, regions = zoo_regions(__doc__, ("--tol", {"type": float, "default": 1e-4}))
    print(f"{args.model}, {args.size}×{args.size}, batch 1, tol {args.tol}, {len(regions)} regions\n")
    loose = 10 * args.tol
    errors = f"error (CGLS · LSMR · CGLS at {loose:g})"
    print(f"| region | CGLS its · s | LSMR its · s | CGLS at {loose:g}: its · s | {errors} |")
    print("|---|---|---|---|---|")
    tot = [0, 0, 0, 0.0, 0.0, 0.0]
    for name, (op, rhs, lam) in regions.items():
        ref = cgls(op, rhs, lam, tol=1e-7, max_iter=3000).x
        t0 = time.perf_counter()
        a = cgls(op, rhs, lam, tol=args.tol, max_iter=2000)
        t1 = time.perf_counter()
        xl, its, true = lsmr(op, rhs, lam, tol=args.tol, max_iter=2000)
        t2 = time.perf_counter()
        c = cgls(op, rhs, lam, tol=loose, max_iter=2000)
        t3 = time.perf_counter()
        assert true <= 1.05 * args.tol, f"LSMR's normal residual estimate is off: {true:.2e}"
        den = float(batch_norm2(ref)) ** 0.5
        err = [float(batch_norm2(y - ref)) ** 0.5 / den for y in (a.x, xl, c.x)]
        row = [a.iterations, its, c.iterations, t1 - t0, t2 - t1, t3 - t2]
        tot = [t + r for t, r in zip(tot, row, strict=True)]
        print(
            f"| `{name}` | {row[0]} · {row[3]:.2f} | {row[1]} · {row[4]:.2f} | {row[2]} · {row[5]:.2f} "
            f"| {err[0]:.1e} · {err[1]:.1e} · {err[2]:.1e} |"
        )
    print(f"| all | {tot[0]} · {tot[3]:.1f} | {tot[1]} · {tot[4]:.1f} | {tot[2]} · {tot[5]:.1f} | |")


if __name__ == "__main__":
    main()

"""Matrix-free damped least squares: CGLS from zero, batched per sample, on the input's device.

# NOTE [CGLS from zero]
# CGLS applied to min ||J x − b||² + λ²||x||² started at x = 0 keeps every iterate in
# range(Jᵀ), so with λ = 0 it converges to the minimum-norm least-squares solution J⁺b, and
# with λ > 0 to the Tikhonov solution (JᵀJ + λ²I)⁻¹Jᵀb. Each sample has its own step sizes and
# its own stopping test; a converged sample's iterate is frozen while the others continue.
# In finite precision (float32 especially) the recursive residual drifts from b − Jx once the
# iteration stagnates near the precision limit, and continuing can make the iterate diverge
# (measured: a 64-channel 3×3 conv in float32 with tol=1e-7 stagnates at a normal residual of
# ~2e-6 after ~1000 iterations, then grows to 8e-2 with ||x|| ×4 by iteration 3000). So each
# sample returns its best iterate: the one with the smallest normal residual seen.
# That iterate is kept without copying x at every improvement (two passes over x per iteration):
# while the current iterate is the best, nothing is stored; when an iterate is worse than the
# one before it and that one was the best, the best is recovered as x − α·p (x was just
# updated by +α·p) and stored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .operator import LinearOperator, batch_norm2, per_sample, power_of_two_scale

__all__ = ["cgls", "IterativeResult"]


@dataclass(frozen=True)
class IterativeResult:
    x: Tensor
    iterations: int
    normal_residual: Tensor  # per sample: ||Jᵀ(b − Jx) − λ²x|| / ||Jᵀb||
    converged: Tensor  # per sample, bool


def cgls(op: LinearOperator, b: Tensor, damping: Tensor | float = 0.0, tol: float = 1e-4, max_iter: int = 500):
    """Solve ``min ||J x − b||² + λ²||x||²`` per sample (NOTE [CGLS from zero]).

    Args:
        op: the operator ``J`` (batched).
        b: right-hand sides, ``Tensor[B, *out_shape]``.
        damping: λ (absolute), a float or a per-sample ``Tensor[B]``.
        tol: stop a sample when its relative normal-equation residual is below ``tol``.
        max_iter: iteration cap.

    Example:
        >>> from naflow_fx.solvers.operator import linear_map
        >>> W = torch.randn(6, 4, dtype=torch.float64)
        >>> op = linear_map(lambda x: x @ W.T, torch.zeros(2, 4, dtype=torch.float64))
        >>> b = torch.randn(2, 6, dtype=torch.float64)
        >>> res = cgls(op, b, tol=1e-12)
        >>> torch.allclose(res.x, b @ torch.linalg.pinv(W).T)
        True
    """
    lam2 = torch.as_tensor(damping, dtype=b.dtype, device=b.device).pow(2).reshape(-1)
    lam2 = lam2.expand(b.shape[0]) if lam2.numel() == 1 else lam2
    # NOTE [CGLS scale]: the solution is linear in b, and each sample is solved for b divided by
    # the power of two nearest its largest value, then scaled back. Its squared norms would
    # otherwise underflow for a tiny b (an input scaled by 1e-20, a damping of 1e6: every solve
    # "converged" at once to 0) or overflow for a huge one (NaN maps). A power of two changes
    # no rounding: in the normal range every iterate is the unscaled one, bit for bit.
    scale = power_of_two_scale(b)
    # Vectors are updated in place: on the CPU a fresh activation-sized tensor per operation
    # costs page faults that add up to more than the vector arithmetic itself.
    r = b / per_sample(scale, b)
    s = op.rmatvec(r)
    x = torch.zeros_like(s)
    p = s.clone()
    gamma = batch_norm2(s)
    norm0 = gamma.sqrt()
    active = norm0 > 0
    rel = torch.zeros_like(norm0)
    best_rel = torch.where(active, 1.0, 0.0).to(norm0.dtype)  # x = 0: relative residual 1
    # NOTE [CGLS from zero]: the best iterate is x where `current_best`, else the stored `best_x`
    best_x, current_best = torch.zeros_like(x), torch.ones_like(active)
    lam2_x = per_sample(lam2, x)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        q = op.matvec(p)
        delta = batch_norm2(q) + lam2 * batch_norm2(p)
        alpha = torch.where(active & (delta > 0), gamma / torch.where(delta > 0, delta, 1), 0)
        x.addcmul_(p, per_sample(alpha, x))
        r.addcmul_(q, per_sample(alpha, r), value=-1)
        s = op.rmatvec(r).addcmul_(x, lam2_x, value=-1)
        gamma_new = batch_norm2(s)
        rel = torch.where(norm0 > 0, gamma_new.sqrt() / torch.where(norm0 > 0, norm0, 1), 0)
        better = rel < best_rel
        leaving = current_best & ~better  # the previous iterate, x − α·p, was the best: store it
        current_best = better
        best_rel = torch.where(better, rel, best_rel)
        active = active & (rel > tol)
        any_leaving, any_active = torch.stack([leaving.any(), active.any()]).tolist()  # one device sync
        if any_leaving:
            # torch.where, not a boolean-mask write: no device sync and no gather
            torch.where(leaving.reshape(-1, *([1] * (x.dim() - 1))), x - p * per_sample(alpha, p), best_x, out=best_x)
        if not any_active:
            break
        beta = torch.where(active, gamma_new / torch.where(gamma > 0, gamma, 1), 0)
        p = s.addcmul_(p, per_sample(beta, p))  # p ← s + β·p, in s's buffer (one pass instead of two)
        gamma = gamma_new
    if bool(current_best.all()):
        best_x = x
    elif bool(current_best.any()):
        best_x[current_best] = x[current_best]
    best_x = best_x.mul_(per_sample(scale, best_x))
    return IterativeResult(x=best_x, iterations=it, normal_residual=best_rel, converged=~active)

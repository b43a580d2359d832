"""What the region-solve experiments share: capturing a flow's region solves, and PCG on them.

Imported by ``fft_preconditioner.py``, ``region_preconditioners.py``, ``lsmr.py`` and
``region_vs_conv.py`` (run as scripts, so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from naflow_fx import compile_naflow
from naflow_fx.solvers import context
from naflow_fx.solvers.operator import batch_dot, batch_norm2, per_sample


def capture_regions(model: torch.nn.Module, x: Tensor) -> dict[str, tuple]:
    """Every region solve of one flow: ``{layer: (operator, right-hand side, λ)}``."""
    captured: dict[str, tuple] = {}
    solve = context.SolverContext.solve

    def capture(self, op, rhs, *, damped=True):
        if self._current is not None and self._current.rule == "region_inverse":
            lam = self.config.damping * float(self.sigma_max(op, rhs, self._current.layer)[0])
            captured[self._current.layer] = (op, rhs.clone(), lam)
        return solve(self, op, rhs, damped=damped)

    context.SolverContext.solve = capture
    try:
        compile_naflow(model, x)(x, keep="maps")
    finally:
        context.SolverContext.solve = solve
    return captured


def zoo_regions(doc: str, *extra: tuple[str, dict]) -> tuple[argparse.Namespace, nn.Module, Tensor, dict[str, tuple]]:
    """Parse ``--model`` (a torchvision name), ``--size`` and ``extra`` options, and capture the
    region solves of one flow of that model (random weights, seed 0, batch 1, ``--threads``, default 2).

    Returns ``(args, model, x, regions)``; ``doc`` is the script's docstring (its first line is
    the description).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as measured)")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    return args, model, x, capture_regions(model, x)


def pcg_normal(op, b: Tensor, lam: float, precondition: Callable[[Tensor], Tensor], tol=1e-4, max_iter=500):
    """PCG on ``(JᵀJ + λ²I) x = Jᵀb`` from zero; stops on cgls's relative normal residual.

    Returns ``(x, iterations, largest relative residual over the batch)``.
    """
    r = op.rmatvec(b)
    x, norm0 = torch.zeros_like(r), batch_norm2(r).sqrt()
    z = precondition(r)
    p, rz = z.clone(), batch_dot(r, z)
    rel = torch.ones_like(norm0)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        ap = op.rmatvec(op.matvec(p)) + lam**2 * p
        alpha = rz / batch_dot(p, ap)
        x, r = x + per_sample(alpha, x) * p, r - per_sample(alpha, r) * ap
        rel = batch_norm2(r).sqrt() / norm0
        if bool((rel <= tol).all()):
            break
        z = precondition(r)
        rz_new = batch_dot(r, z)
        p, rz = z + per_sample(rz_new / rz, p) * p, rz_new
    return x, it, float(rel.max())

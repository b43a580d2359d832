"""Dense damped pseudo-inverse through the SVD, in float64: small problems and the test oracle."""

from __future__ import annotations

import torch
from torch import Tensor

from .operator import LinearOperator, float64_device

__all__ = ["dense_solve", "svd_solve", "relative_pinv"]


def _svd(jac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(jac, full_matrices=False)``, with fallbacks where LAPACK fails to converge.

    LAPACK's divide-and-conquer SVD (gesdd) occasionally fails to converge on matrices with many
    repeated singular values (seen on a MobileNet-V3 squeeze-excitation region's Jacobian). Then
    the SVD of ``Jᵀ`` is tried, and last the eigen-decomposition of the smaller Gram matrix. That
    resolves singular values only down to about √eps·σ_max, so smaller ones are returned as 0.
    """
    try:
        return torch.linalg.svd(jac, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(jac.mT, full_matrices=False)
        return vh.mT, s, u.mT
    except torch.linalg.LinAlgError:
        pass
    wide = jac.shape[-2] < jac.shape[-1]
    gram = jac @ jac.mT if wide else jac.mT @ jac
    evals, vecs = torch.linalg.eigh(gram)
    evals, vecs = evals.flip(-1), vecs.flip(-1)  # descending, as the SVD
    s = evals.clamp_min(0).sqrt()
    cut = (max(jac.shape[-2:]) * torch.finfo(jac.dtype).eps) ** 0.5 * (s[..., :1] if s.numel() else 0)
    s = torch.where(s > cut, s, 0)
    inv = torch.where(s > 0, 1 / torch.where(s > 0, s, 1), 0)
    if wide:  # J = U S Vᵀ with U from J Jᵀ, V = Jᵀ U / σ
        return vecs, s, ((jac.mT @ vecs) * inv.unsqueeze(-2)).mT
    return (jac @ vecs) * inv.unsqueeze(-2), s, vecs.mT


def svd_solve(jac: Tensor, b: Tensor, damping: float = 0.0, rcond: float | None = None) -> Tensor:
    """``x = V diag(f) Uᵀ b`` with Tikhonov filter ``f = σ/(σ² + λ²)``; ``λ = 0`` gives ``J⁺ b``.

    ``jac`` is ``[q, p]``, ``b`` is ``[q, k]``. With ``λ = 0`` singular values below
    ``rcond · σ_max`` count as zero (default ``rcond = max(q, p) · eps``), the ``pinv`` convention.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> svd_solve(J, torch.tensor([[2.0], [3.0]], dtype=torch.float64)).flatten().tolist()
        [2.0, 0.0]
    """
    u, s, vh = _svd(jac)
    return vh.mT @ (_filter(s, damping, rcond, jac).unsqueeze(-1) * (u.mT @ b))


def relative_pinv(jac: Tensor, damping: float, rcond: float | None = None) -> tuple[Tensor, float]:
    """``(V diag(f) Uᵀ, λ)``: the Tikhonov pseudo-inverse ``[p, q]`` with ``λ = damping · σ_max(jac)``.

    One SVD gives both σ_max and the filter ``f`` of :func:`svd_solve` (same ``rcond`` convention).

    Example:
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> pinv, lam = relative_pinv(J, 0.5)
        >>> lam, pinv[0, 0].item()
        (1.0, 0.4)
    """
    u, s, vh = _svd(jac)
    lam = damping * float(s[0]) if s.numel() else 0.0
    return vh.mT @ (_filter(s, lam, rcond, jac).unsqueeze(-1) * u.mT), lam


def _filter(s: Tensor, damping: float, rcond: float | None, jac: Tensor) -> Tensor:
    """Tikhonov ``σ/(σ² + λ²)``; with ``λ = 0``, ``1/σ`` above the ``pinv`` cut-off ``rcond · σ_max``."""
    if damping > 0:
        return s / (s * s + damping * damping)
    if rcond is None:
        rcond = max(jac.shape) * torch.finfo(jac.dtype).eps
    cut = rcond * (s[0] if s.numel() else 0)
    return torch.where(s > cut, 1 / torch.where(s > cut, s, 1), 0)


def dense_solve(op: LinearOperator, b: Tensor, damping: Tensor | float = 0.0) -> Tensor:
    """Solve ``min ||J x − b||² + λ²||x||²`` per sample with dense float64 Jacobians.

    ``damping`` is λ (absolute): a float or a per-sample ``Tensor[B]``. Returns ``b.dtype``.
    """
    batch = b.shape[0]
    # a tensor to the CPU first (MPS has no float64); a Python float straight to float64
    lam = (
        damping.detach().cpu().double()
        if isinstance(damping, Tensor)
        else torch.tensor(damping, dtype=torch.float64, device="cpu")
    )
    lam = lam.reshape(-1)
    lam = lam.expand(batch) if lam.numel() == 1 else lam
    home = float64_device(b.device)  # MPS has no float64: its Jacobians are solved on the CPU

    def jac(i: int) -> Tensor:
        return op.jacobian(i).to(home).to(torch.float64)  # two steps: MPS cannot convert to float64 on the way

    rhs = b.reshape(batch, -1).to(home).to(torch.float64)
    out = []
    if op.shared and bool((lam == lam[0]).all()):
        x = svd_solve(jac(0), rhs.T, float(lam[0]))
        out = list(x.T)
    else:
        for i in range(batch):
            out.append(svd_solve(jac(i), rhs[i : i + 1].T, float(lam[i]))[:, 0])
    return torch.stack(out).reshape(batch, *op.in_shape).to(b.device, b.dtype)

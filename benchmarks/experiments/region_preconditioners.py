"""Experiment (not adopted): can a cheap or precomputed preconditioner cut the region solves' iterations?

Every multi-branch region (a residual block) is one CGLS solve of
``min ||J x − b||² + λ²||x||²`` with ``λ = 1e-2·σ_max(J)``, and these solves are nearly all of a
ResNet flow's time (hundreds of iterations each). CGLS is conjugate gradients on the normal
equations ``N x = Jᵀb`` with ``N = JᵀJ + λ²I``, so any symmetric positive definite ``M ≈ N``
used as a preconditioner leaves the solution unchanged and could only change the iteration
count. This script builds each region's ``J`` densely (float64) on the trained shapes ResNet
and counts preconditioned CG iterations to the library's stopping rule (relative normal residual
``1e-4``) with:

- ``none``: plain CG on the normal equations (CGLS in exact arithmetic);
- ``Jacobi``: the diagonal of ``N``;
- ``pixel blocks``: the exact C×C block of ``N`` at every pixel (channel mixing inverted);
- ``mean pixel block``: the mean of those blocks over the pixels, one C×C matrix for the
  whole map: the most that a translation-invariant channel preconditioner could capture;
- ``other image's mean pixel block``: the same matrix made at another image, which a compile-time
  cache could hold (it would be made at the example input);
- ``channel blocks``: the exact HW×HW block of ``N`` of every channel (space inverted);
- ``other image's factor``: the exact Cholesky factor of the same region's ``N`` for another image. The
  weights are the same, only the ReLU masks and the point differ, so this is the best that any
  factorisation cached per layer and input shape (at compile time) could do.

It also prints the share of ``J``'s ``min(q, p)`` singular values below ``0.1·σ_max``: the part
of the spectrum that sets how many iterations CG needs at this damping.

``--zoo NAME`` tests the one candidate the dense table leaves, matrix-free on a torchvision
model at full size (random weights): PCG on the normal equations in float32 on every region
(``regions_common.pcg_normal``, the library's stopping rule), plain and preconditioned
with the mean pixel block of ``JᵀJ`` plus ``λ²I``, made at this image or at another one (what a
compile-time cache would hold). The block is estimated from ``C`` probes of ``J``: with one
random ±1 pattern ``s`` over the pixels, ``E[(s⊗e_c)ᵀ JᵀJ (s⊗e_d)] = Σ_p (JᵀJ)_(p,c),(p,d)``.

    python benchmarks/experiments/region_preconditioners.py                 # 2 min: regions up to 5000 unknowns
    python benchmarks/experiments/region_preconditioners.py --max-n 10000   # 12 min: all four regions
    python benchmarks/experiments/region_preconditioners.py --zoo resnet18  # 1.5 min: ResNet-18 at 224
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from regions_common import capture_regions, pcg_normal
from torch import Tensor
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_vs_gradcam import _build

from naflow_fx.data.shapes import make_shapes, normalize
from naflow_fx.zoo.shapes import shapes_resnet


def dense(op, p: int) -> Tensor:
    """The operator's float64 matrix, column blocks from the batched tangent program."""
    cols = []
    for start in range(0, p, 512):
        k = min(512, p - start)
        basis = torch.zeros(k, 1, p)
        basis[torch.arange(k), 0, torch.arange(start, start + k)] = 1
        cols.append(vmap(op.matvec)(basis.reshape(k, 1, *op.in_shape)).reshape(k, -1))
    return torch.cat(cols).T.double()


def pcg(n: Tensor, g: Tensor, m_inv: Callable[[Tensor], Tensor], tol: float, max_iter: int) -> int:
    """Preconditioned CG on ``n x = g`` from zero; iterations until ``||r|| ≤ tol·||g||``."""
    x, r = torch.zeros_like(g), g.clone()
    z = m_inv(r)
    p, rz, norm0 = z.clone(), r @ z, g.norm()
    for it in range(1, max_iter + 1):
        q = n @ p
        alpha = rz / (p @ q)
        x += alpha * p
        r -= alpha * q
        if r.norm() <= tol * norm0:
            return it
        z = m_inv(r)
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return max_iter + 1  # not converged


def block_inverse(n: Tensor, index: Tensor) -> Callable[[Tensor], Tensor]:
    """Solves with the diagonal blocks of ``n`` given by the rows of ``index`` (``[blocks, size]``)."""
    chol = torch.linalg.cholesky(n[index[:, :, None], index[:, None, :]])

    def apply(r: Tensor) -> Tensor:
        out = torch.empty_like(r)
        out[index] = torch.cholesky_solve(r[index].unsqueeze(-1), chol).squeeze(-1)
        return out

    return apply


def mean_block_inverse(n: Tensor, by_pixel: Tensor) -> Callable[[Tensor], Tensor]:
    """Solves with the mean over the pixels of ``n``'s C×C pixel blocks (``by_pixel``: ``[HW, C]``)."""
    chol = torch.linalg.cholesky(n[by_pixel[:, :, None], by_pixel[:, None, :]].mean(0))
    c = by_pixel.shape[1]

    def apply(r: Tensor) -> Tensor:  # r is NCHW-ordered: one column per pixel after the reshape
        return torch.cholesky_solve(r.reshape(c, -1), chol).reshape(-1)

    return apply


def mean_block(op, seed: int = 0) -> Tensor:
    """The mean over the pixels of the C×C pixel blocks of ``JᵀJ``, from C probes of ``J``."""
    c, h, w = op.in_shape
    signs = torch.randint(0, 2, (h, w), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
    probes = torch.zeros(c, 1, c, h, w)
    probes[torch.arange(c), 0, torch.arange(c)] = signs
    y = vmap(op.matvec)(probes).reshape(c, -1)
    return (y @ y.T) / (h * w)


def per_pixel(m_inv: Tensor) -> Callable[[Tensor], Tensor]:
    """The preconditioner that applies the C×C matrix ``m_inv`` at every pixel."""
    return lambda z: torch.einsum("cd,bdhw->bchw", m_inv, z)


def matrix_free(name: str, size: int, tol: float, max_iter: int) -> None:
    """The mean-block candidate on a torchvision model's regions, matrix-free, in float32."""
    model, x, _ = _build(name, 1, size, "cpu")
    x_other = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    first, other = capture_regions(model, x), capture_regions(model, x_other)
    print(f"{name} (random weights), random input, {size}×{size}; tol {tol:g}, float32 PCG on the normal equations")
    print(f"iterations and seconds ({max_iter} = the cap); the probes that make this image's block are timed apart")
    print()
    head = "none | s | mean block, this image | s | probes s | another image's | s"
    print(f"| region | input | {head} | x's largest relative difference from none's |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer, (op, rhs, lam) in first.items():
        eye = torch.eye(op.in_shape[0])
        start = time.perf_counter()
        x_plain, plain, _ = pcg_normal(op, rhs, lam, lambda z: z, tol, max_iter)
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        block = mean_block(op)
        t_probe = time.perf_counter() - start
        x_this, this, _ = pcg_normal(op, rhs, lam, per_pixel(torch.linalg.inv(block + lam**2 * eye)), tol, max_iter)
        t_this = time.perf_counter() - start - t_probe
        m_other = per_pixel(torch.linalg.inv(mean_block(other[layer][0]) + lam**2 * eye))
        start = time.perf_counter()
        x_cached, cached, _ = pcg_normal(op, rhs, lam, m_other, tol, max_iter)
        t_cached = time.perf_counter() - start
        diff = max(float((v - x_plain).norm() / x_plain.norm()) for v in (x_this, x_cached))
        shape = "×".join(map(str, op.in_shape))
        cells = f"{plain} | {t_plain:.2f} | {this} | {t_this:.2f} | {t_probe:.2f} | {cached} | {t_cached:.2f}"
        print(f"| `{layer}` | {shape} | {cells} | {diff:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=int, default=5000, help="largest region (unknowns per sample) to build")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zoo", metavar="NAME", help="a torchvision model: the mean-block candidate, matrix-free")
    parser.add_argument("--size", type=int, default=224, help="input size with --zoo")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.zoo:
        if args.zoo not in torchvision.models.list_models():
            parser.error(f"--zoo {args.zoo!r} is not a torchvision model builder (try resnet18 or resnet34)")
        matrix_free(args.zoo, args.size, args.tol, args.max_iter)
        return 0

    model = shapes_resnet()
    images = normalize(make_shapes(2, seed=1).images)  # held-out images
    first, other = capture_regions(model, images[:1]), capture_regions(model, images[1:])
    print(f"shapes ResNet (trained), held-out image 0 of seed 1, 96×96; tol {args.tol:g}, float64")
    print(f"PCG iterations on the normal equations ({args.max_iter + 1} = not converged after {args.max_iter})")
    print()
    head = " | ".join(
        ("none", "Jacobi", "pixel blocks", "mean pixel block", "other image's mean pixel block")
        + ("channel blocks", "other image's factor")
    )
    print(f"| region | unknowns | σ < 0.1·σ_max | {head} | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layer, (op, rhs, lam) in first.items():
        p = int(torch.Size(op.in_shape).numel())
        if p > args.max_n:
            print(f"| `{layer}` | {p} | skipped (over --max-n) |" + " |" * 8)
            continue
        start = time.perf_counter()
        jac = dense(op, p)
        eye = torch.eye(p, dtype=torch.float64)
        n = jac.T @ jac + lam**2 * eye
        g = jac.T @ rhs.reshape(-1).double()
        gram = jac @ jac.T if jac.shape[0] < p else jac.T @ jac  # the min(q, p) singular values
        sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        weak = float((sv < 0.1 * sv.max()).double().mean())
        c = op.in_shape[0]
        by_channel = torch.arange(p).reshape(c, p // c)  # NCHW: index = channel·HW + pixel
        diag = n.diagonal().clone()
        op2, _, lam2 = other[layer]
        jac2 = dense(op2, p)
        n2 = jac2.T @ jac2 + lam2**2 * eye
        chol2 = torch.linalg.cholesky(n2)
        by_pixel = by_channel.T.contiguous()
        counts = [
            pcg(n, g, lambda r: r, args.tol, args.max_iter),
            pcg(n, g, lambda r, d=diag: r / d, args.tol, args.max_iter),
            pcg(n, g, block_inverse(n, by_pixel), args.tol, args.max_iter),
            pcg(n, g, mean_block_inverse(n, by_pixel), args.tol, args.max_iter),
            pcg(n, g, mean_block_inverse(n2, by_pixel), args.tol, args.max_iter),
            pcg(n, g, block_inverse(n, by_channel), args.tol, args.max_iter),
            pcg(n, g, lambda r, f=chol2: torch.cholesky_solve(r[:, None], f)[:, 0], args.tol, args.max_iter),
        ]
        cells = " | ".join(str(k) for k in counts)
        print(f"| `{layer}` | {p} | {weak:.2f} | {cells} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

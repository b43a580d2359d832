"""Experiment (not adopted): FFT circulant preconditioning of NAFlow's damped least-squares solves.

Prediction: a stride-1 conv is a circular convolution away from the border, so the per-frequency
inverse of ``Â(ω)ᴴÂ(ω) + λ²I`` should make conjugate gradients on the normal equations converge
in a few iterations where CGLS needs hundreds (λ = 1e-2·σ_max, tol 1e-4).

What this script measures on a 64→64 3×3 conv at 56×56 (ResNet-18 ``layer1`` shape):
PCG against CGLS with circular padding (where the model is exact) and with zero padding (what
CNNs use). With ``--regions`` it also applies an averaged-impulse-response circulant model to the
identity residual blocks of ResNet-18 at 224. Results are in ``docs/performance.md``.

    python benchmarks/experiments/fft_preconditioner.py [--regions]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from regions_common import capture_regions, pcg_normal
from torch.func import vmap

from naflow_fx.solvers.iterative import cgls
from naflow_fx.solvers.operator import linear_map


def circulant_factor(kernel: torch.Tensor, h: int, w: int, lam: float):
    """Cholesky factors of ``ÂᴴÂ + λ²I`` per frequency; ``kernel[o, i, dy, dx]`` maps offset (dy, dx) → output."""
    c_out, c_in, s, _ = kernel.shape
    r = s // 2
    pad = torch.zeros(c_out, c_in, h, w, dtype=torch.float64)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            pad[:, :, dy % h, dx % w] += kernel[:, :, dy + r, dx + r].double()
    a = torch.fft.rfft2(pad).permute(2, 3, 0, 1)
    chol = torch.linalg.cholesky(a.mH @ a + lam**2 * torch.eye(c_in, dtype=a.dtype))

    def apply(z: torch.Tensor) -> torch.Tensor:
        zh = torch.fft.rfft2(z.double()).permute(2, 3, 1, 0)
        return torch.fft.irfft2(torch.cholesky_solve(zh, chol).permute(3, 2, 0, 1), s=(h, w)).to(z.dtype)

    return apply


def sigma_max(op, like, iters=50):
    v = torch.randn_like(like)
    for _ in range(iters):
        v = op.rmatvec(op.matvec(v))
        v = v / v.norm()
    return float(op.matvec(v).norm())


def lone_conv() -> None:
    torch.manual_seed(0)
    c, hw = 64, 56
    w = torch.randn(c, c, 3, 3) * (2 / (c * 9)) ** 0.5
    x, b = torch.randn(1, c, hw, hw), torch.randn(1, c, hw, hw)
    # conv2d is a cross-correlation: weight tap (i, j) moves input offset (i − 1, j − 1) to the
    # output, i.e. a convolution kernel at offset (1 − i, 1 − j)
    kernel = w.flip(-1).flip(-2)
    fns = {
        "circular padding": lambda t: torch.conv2d(F.pad(t, (1, 1, 1, 1), mode="circular"), w.to(t.dtype)),
        "zero padding": lambda t: torch.conv2d(t, w.to(t.dtype), padding=1),
    }
    for name, fn in fns.items():
        op = linear_map(fn, x)
        lam = 1e-2 * sigma_max(op, x)
        start = time.perf_counter()
        ref = cgls(op, b, lam, tol=1e-4, max_iter=2000)
        t_cg = time.perf_counter() - start
        pre = circulant_factor(kernel, hw, hw, lam)
        start = time.perf_counter()
        xp, its, rel = pcg_normal(op, b, lam, pre)
        t_p = time.perf_counter() - start
        diff = float((xp - ref.x).norm() / ref.x.norm())
        print(
            f"64→64 3×3 conv, {name}: CGLS {ref.iterations} its {t_cg:.1f}s; PCG-FFT {its} its {t_p:.1f}s, "
            f"residual {rel:.1e}, relative difference {diff:.1e}"
        )


def regions() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    captured = capture_regions(model, x)
    for layer, (op, rhs, lam) in captured.items():
        if op.in_shape != op.out_shape:
            continue  # projection blocks change the resolution: no circulant model
        c, h, w = op.in_shape
        r, s = 2, 5
        t = torch.zeros(c, 1, c, h, w)
        grid = [(y, xx) for y in range(r, h - r, s) for xx in range(r, w - r, s)] or [(h // 2, w // 2)]
        for ch in range(c):
            for y, xx in grid:
                t[ch, 0, ch, y, xx] = 1
        out = torch.cat([vmap(op.matvec)(t[i : i + 32]) for i in range(0, c, 32)])[:, 0]
        patches = [out[:, :, y - r : y + r + 1, xx - r : xx + r + 1].permute(1, 0, 2, 3) for y, xx in grid]
        kernel = sum(patches) / len(grid)
        ref = cgls(op, rhs, lam, tol=1e-4, max_iter=1000)
        xp, its, rel = pcg_normal(op, rhs, lam, circulant_factor(kernel, h, w, lam))
        print(f"ResNet-18 {layer}: CGLS {ref.iterations} its; PCG-FFT {its} its, residual {rel:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", action="store_true", help="also try ResNet-18's identity blocks (minutes)")
    args = parser.parse_args()
    lone_conv()
    if args.regions:
        regions()

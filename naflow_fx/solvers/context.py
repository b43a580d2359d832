"""The solver context the inverse network runs with: configuration, solves, diagnostics.

# NOTE [damping]
# Solver-based rules (conv, linear, the generic linearised rule) solve the Tikhonov problem
# min ||J x − b||² + λ²||x||² with λ = damping · σ_max(J) (spec §4, "Conditioning"). σ_max is
# estimated once per layer and input shape by Lanczos on JᵀJ from a fixed seed, and the
# same λ is given to the dense and the iterative solver, so both target the same problem.
# Smooth activations (SiLU, GELU, sigmoid, tanh…) are diagonal, J = diag(g'(a)), and are damped
# the same way with σ_max(J) = max |g'(a)| per sample (`diagonal_inverse`): their derivative comes
# arbitrarily close to 0, and the undamped 1/g'(a) amplified a random EfficientNet-V2-L's maps
# to 1e26 and then to NaN (docs/naflow.md, decision 11). Other closed-form rules (BatchNorm, the
# ReLU family, whose slopes are fixed, pooling selections, reshapes) are exact pseudo-inverses and
# are never damped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from .dense import dense_solve, relative_pinv
from .iterative import cgls
from .operator import LinearOperator, batch_dot, batch_norm2, per_sample, power_of_two_scale

__all__ = ["SolverConfig", "SolveRecord", "SolverContext", "relative_residual"]

_SOLVERS = ("auto", "dense", "iterative")


@dataclass(frozen=True)
class SolverConfig:
    """How the inverse network solves its least-squares problems.

    Attributes:
        solver: ``"auto"`` (dense when the Jacobian has ``q·p ≤ dense_limit`` entries, else
            iterative; the choice never depends on the batch size), ``"dense"`` or ``"iterative"``.
        damping: Tikhonov λ relative to σ_max(J); ``0.0`` is the exact min-norm pseudo-inverse.
        tol: relative normal-equation residual at which CGLS stops.
        max_iter: CGLS iteration cap.
        dense_limit: largest Jacobian (entries, per sample) that ``"auto"`` builds densely.
    """

    solver: str = "auto"
    damping: float = 1e-2
    tol: float = 1e-4
    max_iter: int = 500
    dense_limit: int = 1 << 20

    def __post_init__(self) -> None:
        if self.solver not in _SOLVERS:
            raise ConfigError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        damping, tol, max_iter = (_convert(name, getattr(self, name)) for name in ("damping", "tol", "max_iter"))
        if not (math.isfinite(damping) and damping >= 0):
            raise ConfigError(f"damping must be a finite number ≥ 0 (0 = exact min-norm), got {self.damping!r}")
        if not (math.isfinite(tol) and tol > 0):
            raise ConfigError(f"tol must be a finite number > 0, got {self.tol!r}")
        if not (max_iter >= 1 and float(max_iter).is_integer()):
            raise ConfigError(f"max_iter must be a whole number ≥ 1, got {self.max_iter!r}")
        object.__setattr__(self, "damping", damping)  # frozen: the normalised values, set once
        object.__setattr__(self, "tol", tol)
        object.__setattr__(self, "max_iter", int(max_iter))


def _convert(name: str, value: object) -> float:
    """``float(value)`` for an option of :class:`SolverConfig`, or a :class:`ConfigError` naming it."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


@dataclass
class SolveRecord:
    """Diagnostics of one inverse step (one row of ``flow.diagnostics``).

    ``residual`` is the largest per-sample ``||J B_u − (B_w − θ)|| / ||B_w − θ||``; it is not zero
    for damped or inconsistent systems. ``normal_residual`` is CGLS's stopping quantity.
    """

    layer: str
    rule: str
    method: str = "closed form"
    iterations: int = 0
    residual: float = 0.0
    normal_residual: float | None = None
    converged: bool = True
    damping: float = 0.0
    seconds: float = 0.0


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: Linux's MemAvailable on the CPU, the free device
    memory plus what torch's cache holds unused on CUDA; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _check_dense_room(q: int, p: int, layer: str, dense_limit: int) -> None:
    """The dense solver builds each image's ``q×p`` Jacobian in float64 on the CPU, and its SVD about
    doubles that: refuse it where it cannot fit, instead of the allocator's error or the system's
    out-of-memory kill."""
    nbytes, free = 3 * 8 * q * p, free_bytes(torch.device("cpu"))
    if free is not None and nbytes > free:
        raise ConfigError(
            f"solver='dense' at layer {layer!r} needs a {q}×{p} Jacobian per image and its SVD, about "
            f"{nbytes / 2**30:.3g} GiB, but {free / 2**30:.3g} GiB are free: use solver='auto' (dense only up to "
            f"{dense_limit} entries) or solver='iterative'"
        )


def relative_residual(jx: Tensor, rhs: Tensor) -> float:
    """max over samples of ``||jx − rhs|| / ||rhs||`` (0 where ``rhs`` is 0), in range for any scale."""
    if rhs.dim() > 1 and rhs.shape[0]:
        scale = power_of_two_scale(rhs)
        jx, rhs = jx / per_sample(scale, jx), rhs / per_sample(scale, rhs)
    num = batch_norm2(jx - rhs).sqrt()
    den = batch_norm2(rhs).sqrt()
    rel = torch.where(den > 0, num / torch.where(den > 0, den, 1), num)
    return float(rel.max()) if rel.numel() else 0.0


@dataclass
class SolverContext:
    """Passed as ``solver`` to the generated inverse network; collects one record per step."""

    config: SolverConfig = field(default_factory=SolverConfig)
    sigma_cache: dict = field(default_factory=dict)
    records: list[SolveRecord] = field(default_factory=list)
    progress: Callable[[SolveRecord], object] | None = None
    _current: SolveRecord | None = None

    @contextmanager
    def step(self, layer: str, rule: str) -> Iterator[SolveRecord]:
        record = SolveRecord(layer=layer, rule=rule)
        self._current = record
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self._current = None
            self.records.append(record)
        if self.progress is not None:  # a finished step only: a callback must not hide the step's own error
            self.progress(record)

    def _record(self) -> SolveRecord:
        return self._current if self._current is not None else SolveRecord(layer="?", rule="?")

    def closed_form(self, jx: Tensor, rhs: Tensor) -> None:
        """Record a closed-form step whose result maps to ``jx`` against right-hand side ``rhs``."""
        rec = self._record()
        rec.method, rec.residual = "closed form", relative_residual(jx, rhs)

    def diagonal_inverse(self, d: Tensor, rhs: Tensor, *, damped: bool = True) -> Tensor:
        """``J⁺ rhs`` for the diagonal ``J = diag(d)`` (elementwise ops), recorded as a closed-form step.

        Undamped (``damped=False`` or ``damping=0``): ``rhs / d``, and 0 where ``d = 0``. Damped:
        the Tikhonov solution ``d·rhs / (d² + λ²)`` with ``λ = damping · max |d|`` per sample
        (NOTE [damping]), computed on ``d / max |d|`` so that tiny derivatives do not underflow.

        >>> ctx = SolverContext(SolverConfig(damping=0.1))
        >>> ctx.diagonal_inverse(torch.tensor([[1.0, 0.1, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
        tensor([[0.9901, 5.0000, 0.0000]])
        """
        damping = self.config.damping if damped else 0.0
        if damping == 0:
            x = torch.where(d != 0, rhs / torch.where(d != 0, d, 1), 0)
        else:
            top = d.abs().reshape(d.shape[0], -1).amax(1)  # σ_max(diag(d)) per sample
            scale = torch.where(top > 0, top, 1).reshape(-1, *([1] * (d.dim() - 1)))
            u = d / scale
            x = rhs * u / (scale * (u * u + damping**2))
            self._record().damping = float(damping * top.max())
        self.closed_form(d * x, rhs)
        return x

    def sigma_max(self, op: LinearOperator, like: Tensor, key: object | None = None, iters: int = 100) -> Tensor:
        """σ_max(J) per sample (``Tensor[B]``, B from ``like``) by Lanczos on JᵀJ (NOTE [damping]).

        Starts from a fixed seed and stops when the top Ritz value changes by at most 1e-3
        (relative); cached per ``(key, input shape)`` for shared operators.
        """
        batch = like.shape[0]
        cache_key = (key, op.in_shape) if (key is not None and op.shared) else None
        if cache_key is not None and cache_key in self.sigma_cache:
            return self.sigma_cache[cache_key].to(like.device).expand(batch)
        gen = torch.Generator(device="cpu").manual_seed(0)
        rows = 1 if op.shared else batch
        shape = (-1, *([1] * len(op.in_shape)))
        # Every row starts from the same vector and stops on its own test, so a sample's estimate
        # does not depend on its position in the batch or on the other samples (I5).
        v = torch.randn((1, *op.in_shape), generator=gen, dtype=torch.float64, device="cpu").to(like.device, like.dtype)
        v = (v / batch_norm2(v).sqrt().reshape(shape)).expand(rows, *op.in_shape).contiguous()
        v_prev = torch.zeros_like(v)
        # The vector updates use α and β on the device; the tridiagonal matrix lives on the CPU in
        # float64 (small), fed by one device sync per step.
        beta_d = torch.zeros(rows, dtype=v.dtype, device=v.device)
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        sigma2 = torch.zeros(rows, dtype=torch.float64, device="cpu")
        active = torch.ones(rows, dtype=torch.bool, device="cpu")
        for _ in range(iters):
            w = op.rmatvec(op.matvec(v))
            alpha_d = batch_dot(w, v)
            w = w - per_sample(alpha_d, w) * v - per_sample(beta_d, w) * v_prev
            beta_d = batch_norm2(w).sqrt()
            alpha, beta = torch.stack([alpha_d, beta_d]).cpu().double()  # the step's one device sync
            alphas.append(alpha)
            tri = torch.diag_embed(torch.stack(alphas, 1))
            if betas:
                off = torch.diag_embed(torch.stack(betas, 1), offset=1)
                tri = tri + off + off.transpose(1, 2)
            ritz = torch.linalg.eigvalsh(tri)[:, -1]
            settled = (ritz - sigma2).abs() <= 1e-3 * ritz.abs()
            sigma2 = torch.where(active, ritz, sigma2)
            # a vanishing β means the Krylov space is exhausted: the Ritz value is exact
            active = active & ~settled & (beta > 1e-12 * ritz.abs())
            if not bool(active.any()):
                break
            betas.append(beta)
            keep = active.to(w.device)  # after the sync above: a copy into an idle queue
            v_prev, v = v, torch.where(keep.reshape(shape), w / per_sample(torch.where(keep, beta_d, 1), w), v)
        sigma = sigma2.clamp_min(0).sqrt().to(like.device, like.dtype)
        if cache_key is not None:
            self.sigma_cache[cache_key] = sigma
        return sigma.expand(batch)

    def position_filter(self, matrix: Tensor, size: tuple[int, int]) -> Tensor:
        """The damped pseudo-inverse ``V diag(σ/(σ² + λ²)) Uᵀ`` (``[p, q]``) of a ``[q, p]`` matrix.

        For a ``J`` that applies the same ``matrix`` at every position (a 1×1 convolution:
        ``J = I ⊗ matrix`` after a selection of positions), ``σ_max(J) = σ_max(matrix)``, so the
        Tikhonov problem of NOTE [damping] is solved exactly, position by position, by this
        filter, with λ = damping · σ_max(matrix) from the SVD rather than an estimate.
        ``size = (q, p)`` of the whole ``J`` sets the zero cut-off when damping is 0, as for the
        dense solver. Computed on the CPU in float64 (so no device needs float64 support), cached
        per layer, dtype and device, and λ is recorded on the current step.
        """
        key = self._current.layer if self._current is not None else None
        cache_key = ("filter", key, tuple(matrix.shape), matrix.dtype, matrix.device)
        entry = self.sigma_cache.get(cache_key) if key is not None else None
        if entry is None:
            rcond = max(size) * torch.finfo(torch.float64).eps
            pinv, lam = relative_pinv(matrix.detach().cpu().double(), self.config.damping, rcond)  # MPS: CPU first
            entry = (pinv.to(matrix.device, matrix.dtype), lam)
            if key is not None:
                self.sigma_cache[cache_key] = entry
        self._record().damping = entry[1]
        return entry[0]

    def solve(self, op: LinearOperator, rhs: Tensor, *, damped: bool = True) -> Tensor:
        """Damped min-norm least squares ``J x ≈ rhs`` per sample (NOTE [damping]); records diagnostics."""
        cfg = self.config
        key = self._current.layer if self._current is not None else None
        q, p = op.size
        method = cfg.solver
        if method == "auto":  # decided per matrix, never on the batch size (I5)
            method = "dense" if q * p <= cfg.dense_limit else "iterative"
        rec = self._record()
        if cfg.solver == "dense":  # asked for: refuse a Jacobian that cannot fit, before building one
            _check_dense_room(q, p, rec.layer, cfg.dense_limit)
        lam = torch.zeros(rhs.shape[0], dtype=rhs.dtype, device=rhs.device)
        if damped and cfg.damping > 0:
            lam = cfg.damping * self.sigma_max(op, rhs, key)
        rec.damping = float(lam.max()) if lam.numel() else 0.0
        if method == "dense":
            x = dense_solve(op, rhs, lam.cpu().to(torch.float64))
            rec.method, rec.iterations = "dense", 0
        else:
            res = cgls(op, rhs, lam, tol=cfg.tol, max_iter=int(cfg.max_iter))
            x = res.x
            rec.method, rec.iterations = "cgls", res.iterations
            rec.normal_residual = float(res.normal_residual.max())
            rec.converged = bool(res.converged.all())
        rec.residual = relative_residual(op.matvec(x), rhs)
        return x

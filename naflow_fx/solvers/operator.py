"""Matrix-free linear operators that act on a batch, one block per sample."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, vjp

__all__ = [
    "LinearOperator",
    "linear_map",
    "linearized_map",
    "batch_norm2",
    "batch_dot",
    "per_sample",
    "widest_float",
    "float64_device",
]


@functools.cache
def _jvp_decompositions() -> None:
    """Load torch's forward-mode decompositions once, without their warning.

    torch loads them on the first forward-mode call, scripting them with ``torch.jit``, which
    warns that ``torch.jit.script`` is deprecated: a detail of torch that users cannot act on.
    Under ``warnings.simplefilter("error")`` (or ``pytest -W error``) that warning would fail the
    first flow, so it is silenced here, for this import only, leaving the caller's filters alone.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)  # private, so looked up
        if load is not None:
            load()  # what the first forward-mode call would do (nothing with PYTORCH_JIT=0)


def jvp(fn: Callable, primals: tuple, tangents: tuple) -> tuple:
    """``torch.func.jvp(fn, primals, tangents)``, with torch's decompositions loaded quietly first."""
    _jvp_decompositions()
    return torch.func.jvp(fn, primals, tangents)


def widest_float(device: torch.device) -> torch.dtype:
    """The widest float ``device`` computes in: float64, or float32 on MPS, which has no float64.

    Dense Jacobians are built in it; MPS ones are widened to float64 on the CPU for the SVD
    (:func:`float64_device`).
    """
    return torch.float32 if device.type == "mps" else torch.float64


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work on tensors from ``device`` runs: ``device`` itself, or the CPU for MPS."""
    return torch.device("cpu") if device.type == "mps" else device


def _sample_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def batch_norm2(t: Tensor) -> Tensor:
    """Per-sample squared Euclidean norm: ``Tensor[B]`` (any memory layout, without a copy)."""
    return torch.linalg.vector_norm(t, dim=_sample_dims(t)).square() if t.dim() > 1 else t.square()


def power_of_two_scale(t: Tensor) -> Tensor:
    """Per sample, a power of two in (m/2, m] for ``t``'s largest magnitude m (1 where m is 0 or not
    finite; never above m, so finite in the dtype's top binade too): dividing by it changes no
    rounding, and keeps squared norms in range (NOTE [CGLS scale])."""
    flat = t.detach().flatten(1) if t.dim() > 1 else t.detach()[:, None]
    peak = flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    exponent = torch.frexp(peak).exponent.to(t.dtype) - 1
    return torch.where(torch.isfinite(peak) & (peak > 0), torch.exp2(exponent), 1)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product: ``Tensor[B]``."""
    return (a * b).sum(_sample_dims(a)) if a.dim() > 1 else a * b


def _zeros(batch: int, like: Tensor) -> Tensor:
    """Zeros of ``like``'s per-sample shape for ``batch`` samples, in ``like``'s memory layout."""
    fmt = torch.channels_last if _is_channels_last(like) else torch.contiguous_format
    return torch.zeros((batch, *like.shape[1:]), dtype=like.dtype, device=like.device).contiguous(memory_format=fmt)


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars ``Tensor[B]`` on ``like``'s device and dtype, shaped to broadcast over it."""
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class LinearOperator:
    """A per-sample linear map ``J`` given by its action on batches.

    ``matvec`` maps ``Tensor[B, *in_shape]`` → ``Tensor[B, *out_shape]``, ``rmatvec`` is its adjoint.
    ``shared`` says every sample has the same matrix (a conv), so one dense Jacobian serves the
    batch. ``jacobian(b)`` returns sample ``b``'s matrix as a float64 ``Tensor[q, p]`` (float32 on
    MPS: :func:`widest_float`).
    """

    matvec: Callable[[Tensor], Tensor]
    rmatvec: Callable[[Tensor], Tensor]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    shared: bool
    jacobian: Callable[[int], Tensor]

    @property
    def size(self) -> tuple[int, int]:
        """``(q, p)``: output and input neurons per sample."""
        return (int(torch.Size(self.out_shape).numel()), int(torch.Size(self.in_shape).numel()))


def linear_map(fn: Callable[[Tensor], Tensor], like: Tensor) -> LinearOperator:
    """The operator of a *linear*, sample-independent ``fn`` (conv without bias, pooling, …).

    ``fn`` must accept float64 input too (cast parameters to ``x.dtype`` inside) so the dense
    oracle can build its Jacobian in float64. ``like`` gives batch size, dtype, device and the
    memory layout (contiguous or channels-last) of the adjoint's results.
    """
    out = fn(torch.zeros_like(like[:1]))
    in_shape, out_shape = tuple(like.shape[1:]), tuple(out.shape[1:])
    adjoints: dict[tuple, Callable] = {}

    def rmatvec(y: Tensor) -> Tensor:
        key = (y.shape[0], y.dtype)
        if key not in adjoints:  # fn is linear: its vjp at 0 is the adjoint, for this batch size
            adjoints[key] = vjp(fn, _zeros(y.shape[0], like.to(y.dtype)))[1]
        return adjoints[key](y)[0]

    def jacobian(_: int) -> Tensor:
        # fn is linear and shared: its matrix's columns are fn of the basis vectors, batched
        # (one conv over p images is far faster than q vector-Jacobian products).
        p = int(torch.Size(in_shape).numel())
        cols = []
        for start in range(0, p, 4096):
            stop = min(p, start + 4096)
            basis = torch.zeros((stop - start, p), dtype=widest_float(like.device), device=like.device)
            basis[torch.arange(stop - start, device=like.device), torch.arange(start, stop, device=like.device)] = 1
            cols.append(fn(basis.reshape(-1, *in_shape)).reshape(stop - start, -1))
        return torch.cat(cols).T

    return LinearOperator(
        matvec=fn, rmatvec=rmatvec, in_shape=in_shape, out_shape=out_shape, shared=True, jacobian=jacobian
    )


def linearized_map(
    fn: Callable[[Tensor], Tensor],
    point: Tensor,
    fn64: Callable[[Tensor], Tensor] | None = None,
    tangent: Callable[[Tensor], Tensor] | None = None,
    value: Tensor | None = None,
) -> tuple[LinearOperator, Tensor]:
    """The affine piece of a sample-independent ``fn`` at ``point``: ``(J, θ)`` with θ = fn(a) − J a.

    ``J`` is applied with ``tangent`` when given (``t ↦ J·t``, e.g. from
    :func:`~naflow_fx.solvers.linearize.linearize_graph`), else with ``jvp``. Its adjoint is the
    ``vjp`` of ``tangent`` when ``tangent.transposable`` (NOTE [tangent program]), else the
    ``vjp`` of ``fn`` at ``point`` (matrix-free either way). ``value`` is ``fn(point)`` when the
    caller has it. ``fn`` must map a batch to a batch with no mixing between samples (eval-mode
    layers do not mix). ``fn64`` is the same function in float64, for the dense oracle (default:
    ``fn`` itself).
    """
    point = point.detach()
    if tangent is not None and getattr(tangent, "transposable", False):
        out = fn(point).detach() if value is None else value.detach()
        # the program is linear: its vjp at zero is the adjoint, the same for every cotangent
        vjp_fn = vjp(tangent, torch.zeros_like(point))[1]
    else:
        out, vjp_fn = vjp(fn, point)

    def matvec(t: Tensor) -> Tensor:
        if tangent is not None:
            return tangent(t.to(point.dtype))
        return jvp(fn, (point,), (t.to(point.dtype),))[1]

    def jacobian(b: int) -> Tensor:
        # ``fn`` may close over other per-sample tensors (a stage's extra inputs, full batch), so
        # sample b is differentiated in place inside the batch rather than on its own.
        base = point.to(widest_float(point.device))
        f = fn64 or fn

        def row(x0: Tensor) -> Tensor:
            return f(torch.cat([base[:b], x0, base[b + 1 :]]))[b : b + 1]

        jac = jacrev(row)(base[b : b + 1])
        return jac.reshape(int(out[0].numel()), int(base[0].numel()))

    op = LinearOperator(
        matvec=matvec,
        rmatvec=lambda y: vjp_fn(y.to(out.dtype))[0],
        in_shape=tuple(point.shape[1:]),
        out_shape=tuple(out.shape[1:]),
        shared=False,
        jacobian=jacobian,
    )
    theta = out.detach() - matvec(point)
    return op, theta

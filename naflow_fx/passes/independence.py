"""first_mixing_node: the first node whose output for one image depends on the other images of its batch.

NOTE [independent samples]
A flow solves every image's inverses on its own. Each solve's operator is that image's Jacobian,
and its step sizes, σ_max and stopping rule are kept per image. So a model that mixes the images
of a batch breaks a batched flow:

* timm's CondConv folds the batch into the channels of one grouped convolution;
* a softmax, sum or normalisation can run over dim 0.

The per-image solves then fail with a broadcast error deep inside a solver, or they give wrong
maps. Batch 1 has nothing to mix, so it is unaffected.

The first time a flow meets a batch of two or more images, it runs the graph node by node on two
probes: the first image alone, and that image together with a perturbed copy. The first node
whose output for the first image changes, or whose output does not keep the batch as its leading
dim, is where the images mix, and the batch is refused there. The check costs a forward pass at
batch 1 and one at batch 2, once per flow. Nodes that do not read the input, such as a weight
standardised in the forward, run once and are not compared. Floating-point outputs
agree to ``_RTOL`` of their largest entry, far above the rounding a batch-size-dependent kernel
adds and far below what mixing does.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from ..tracing import random_state_kept

__all__ = ["first_mixing_node"]

_RTOL = 1e-3


def _probe(image: Tensor) -> Tensor:
    """``image`` and a copy with a fixed pseudo-random perturbation of its scale (the global RNG is untouched)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(image.shape, generator=gen, dtype=torch.float32, device="cpu")
    scale = float(image.abs().max()) + 1.0
    return torch.cat([image, image + noise.to(image.device, image.dtype) * scale])


def _mixes(alone: object, together: object, solved: bool) -> str | None:
    """How ``together`` (the batch of two) fails to be ``alone`` (the first image) plus a second sample.

    ``"folds"``: the batch is no longer the leading dim (folded into another dim, or split), which
    matters only where the flow solves (``solved``: between the input and N); the head after N is
    only differentiated, so there only a change of the image's values counts. ``"mixes"``: the
    first image's values changed. None: independent, or nothing to compare (a 0-d value, a
    Python value, a tensor the batch does not lead): what reads it shows whether it mixes.
    """
    if isinstance(alone, (tuple, list)) and isinstance(together, (tuple, list)):
        # split along the batch if the lengths differ; otherwise the items are checked where they
        # are read (getitem nodes), so an unused one need not keep the batch first (an LSTM's h_n)
        return "folds" if solved and len(alone) != len(together) else None
    if not isinstance(alone, Tensor) or not isinstance(together, Tensor) or alone.dim() == 0:
        return None  # sizes, and scalars such as an assert's condition, are checked where they are used
    if alone.shape == together.shape and _close(alone, together):
        return None  # the same in both runs, such as an input-independent value built with the input's sizes
    if together.shape[1:] != alone.shape[1:] or together.shape[0] != 2 * alone.shape[0]:
        return "folds" if solved else None
    return None if _close(alone, together[: alone.shape[0]]) else "mixes"


def _close(a: Tensor, b: Tensor) -> bool:
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a, b = a.detach(), b.detach()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        # NaN or Inf (a NaN weight, log 0): compared where both are finite, since where NaNs land
        # differs between the kernels for one image and for two
        a, b = a[finite], b[finite]
    if a.numel() == 0:
        return True
    return float((a - b).abs().max()) <= _RTOL * float(a.abs().max()) + 1e-30


def first_mixing_node(gm: fx.GraphModule, image: Tensor) -> tuple[fx.Node | None, str] | None:
    """The first node of ``gm`` whose output for ``image`` (``[1, C, H, W]``) changes when a second image joins it.

    Returns ``(node, how)``: ``how`` is ``"folds"`` if a node the flow solves no longer has the
    batch as its leading dim, ``"mixes"`` if the image's values changed (at the output too).
    ``(None, "failed")`` if the graph fails on the probe (the caller's own forward pass then
    reports any failure with the real batch). None if the images stay independent. Values are
    compared where both runs are finite. Nodes are solved between the input and N
    (``node.meta["naflow.role"]``, set by ``partition_stages``); without roles, every node counts
    as solved.

    Example:
        >>> import torch, torch.fx as fx
        >>> class CondConvLike(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.reshape(1, -1, 8, 8).relu()   # folds the batch into the channels
        >>> node, how = first_mixing_node(fx.symbolic_trace(CondConvLike()), torch.randn(1, 3, 8, 8))
        >>> node.name, how
        ('reshape', 'folds')
        >>> first_mixing_node(fx.symbolic_trace(torch.nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8)) is None
        True
    """
    alone, together = fx.Interpreter(gm), fx.Interpreter(gm)
    inputs = iter([(image, _probe(image))])
    reads_input: set[fx.Node] = set()
    with torch.no_grad(), random_state_kept(image.device):
        for node in gm.graph.nodes:
            try:
                if node.op == "output":
                    how = _mixes(alone.run_node(node), together.run_node(node), solved=False)
                    return None if how is None else (node, how)
                if node.op == "placeholder":
                    a, b = next(inputs)
                    reads_input.add(node)
                elif any(n in reads_input for n in node.all_input_nodes):
                    a, b = alone.run_node(node), together.run_node(node)
                    reads_input.add(node)
                else:  # weights and constants: the same in both runs
                    a = b = alone.run_node(node)
            except Exception:  # the model cannot run the probe; the real forward says why
                return None, "failed"
            solved = node.meta.get("naflow.role", "inner") in ("input", "articulation", "inner")
            how = _mixes(a, b, solved) if node in reads_input else None
            if how is not None:
                return node, how
            alone.env[node], together.env[node] = a, b
            for used in alone.user_to_last_uses.get(node, ()):  # values are freed after their last use
                del alone.env[used], together.env[used]
    return None

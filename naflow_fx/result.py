"""Per-layer results: ``LayerMaps`` (any method) and ``FlowResult`` (NAFlow, with BPFMs)."""

from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, InputTypeError, did_you_mean, elided
from .solvers import SolveRecord
from .solvers.context import free_bytes

__all__ = ["LayerMaps", "FlowResult", "normalize_maps", "concat"]


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each ``[h, w]`` map of a ``[..., h, w]`` tensor to [0, 1] (constant maps → 0).

    A map whose span ``max − min`` is at most ``eps`` (≥ 0) times its largest magnitude counts as
    constant: so a map of any scale keeps its shape (one pixel of 1e-30 is still a peak). Integer maps are
    normalised as float32. Maps holding NaN or Inf have no min-max normalisation: an
    :class:`~naflow_fx.errors.InputError` says so instead of returning zeros.

    Example:
        >>> normalize_maps(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]]))
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]]])
        >>> normalize_maps(torch.ones(1, 2, 2)).sum().item()
        0.0
    """
    fn = "normalize_maps"
    maps = _check_map_tensor(maps, fn)
    from .viz import _check_number  # lazy: viz imports this module

    _check_number(eps, "eps", fn, low=0.0)
    if not bool(torch.isfinite(maps).all()):
        raise InputError(
            f"{fn}: the maps contain NaN or Inf values, so they have no min-max normalisation; find where they "
            "come from (a flow warns with a NumericalWarning) or replace them, e.g. with torch.nan_to_num(maps)"
        )
    return _normalize(maps, eps)


def _check_map_tensor(maps: object, fn: str) -> Tensor:
    """``maps`` as a real ``Tensor[..., h, w]`` with ``h, w ≥ 1`` (integers become float32), else a library error."""
    if not isinstance(maps, Tensor):
        raise InputTypeError(
            f"{fn}: maps must be a torch.Tensor [..., h, w], got {type(maps).__name__}; convert it with "
            "torch.as_tensor(maps)"
        )
    if maps.dtype == torch.bool or maps.is_complex():
        raise InputTypeError(f"{fn}: maps must be a real (float or integer) tensor, got {maps.dtype}")
    if maps.dim() < 2 or 0 in maps.shape[-2:]:
        raise InputError(f"{fn}: maps must be a tensor [..., h, w] with h, w ≥ 1, got shape {tuple(maps.shape)}")
    return maps if maps.is_floating_point() else maps.float()


def _varies(flat: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(lo, hi, varies)`` of flattened maps ``[..., n]``: a map varies when its span exceeds ``eps`` of its
    largest magnitude (relative, so maps of any scale keep their shape)."""
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return lo, hi, hi - lo > eps * torch.maximum(hi.abs(), lo.abs())


def _normalize(maps: Tensor, eps: float) -> Tensor:
    """:func:`normalize_maps` of finite, checked maps."""
    flat = maps.flatten(-2)
    lo, hi, varies = _varies(flat, eps)
    span = hi - lo
    out = torch.where(varies, (flat - lo) / torch.where(varies, span, 1), torch.zeros_like(flat))
    if flat.numel() and bool(torch.isinf(span).any()):
        # the span of finite maps overflowed the dtype (e.g. float32 maps from -3e38 to 3e38): halve first
        half = (flat / 2 - lo / 2) / (hi / 2 - lo / 2)
        out = torch.where(torch.isinf(span), half, out)
    return out.reshape(maps.shape)


def resized_normalized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Finite maps ``[..., h, w]`` resized bilinearly to ``size``, then each min-max scaled to [0, 1].

    A map that is constant before resizing is 0 after it, as :func:`normalize_maps` makes it: bilinear
    weights round differently from pixel to pixel (0.3 becomes 0.29999998 … 0.30000004), and scaling
    that rounding to [0, 1] would draw a flat map as noise.
    """
    small = maps.reshape(-1, 1, *maps.shape[-2:])
    up = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    out = _normalize(up, 1e-12)
    out[~_varies(small.flatten(1), 1e-12)[2][:, 0]] = 0
    return out.reshape(*maps.shape[:-2], *size)


class LayerDict(dict):
    """A result's ``maps``, ``bpfm``, ``coefficients`` or ``diagnostics``: a dict whose missing key names the layers.

    Layers are named by module path and call (``"layer4.1.relu#2"``), so a module's own name
    (``"layer4"``) is no key: the error lists the layers inside it, or the closest names. It
    pickles, and ``torch.save`` writes it, as an ``OrderedDict``.

    Example:
        >>> maps = LayerDict({"layer4.0.conv1": 1, "layer4.1.relu#2": 2, "fc": 3})
        >>> maps["layer4"]
        Traceback (most recent call last):
        ...
        KeyError: "no layer 'layer4': the layers inside it are 'layer4.0.conv1', 'layer4.1.relu#2' (see result.layers)"
        >>> maps["fc1"]
        Traceback (most recent call last):
        ...
        KeyError: "no layer 'fc1' (did you mean 'fc'?): the layers are layer4.0.conv1, layer4.1.relu#2, fc"
    """

    def __missing__(self, key: object) -> None:
        names = [k for k in self if isinstance(k, str)]
        if isinstance(key, str):
            inside = [n for n in names if n.startswith((key + ".", key + "#"))]
            if inside:
                listed = elided([repr(n) for n in inside], 8)
                raise KeyError(f"no layer {key!r}: the layers inside it are {listed} (see result.layers)")
        raise KeyError(f"no layer {key!r}{did_you_mean(str(key), names)}: the layers are {elided(names, 8)}")

    def __copy__(self) -> LayerDict:
        return LayerDict(self)

    def __deepcopy__(self, memo: dict) -> LayerDict:
        return LayerDict(copy.deepcopy(dict(self), memo))

    def __reduce__(self):  # as an OrderedDict, which torch.load(weights_only=True) accepts
        return OrderedDict, (), None, None, iter(self.items())


@dataclass(eq=False)
class LayerMaps:
    """One attention map per layer: ``maps[name]`` is ``Tensor[B, h, w]`` at the layer's resolution.

    Attributes:
        layers: layer names, shallow → deep.
        maps: layer name → ``Tensor[B, h, w]`` (in the model's dtype, on the input's device).
        output: the model's output for the batch.
        scores: the explained score per sample, ``Tensor[B]``.
        classes: the explained class per sample (``LongTensor[B]``) for class targets, else None.
        input_size: ``(H, W)`` of the input batch.
        method: ``"naflow"``, ``"gradcam"`` or ``"layercam"``.

    Its ``repr`` is a one-line summary, not the tensors. Results compare by identity: ``a == b``
    only if ``a is b`` (tensors have no single truth value); compare maps with ``torch.equal``.

    Example:
        >>> names = ["c1", "c2", "c3"]
        >>> cam = LayerMaps(names, {n: torch.zeros(2, 4, 4) for n in names}, torch.zeros(2, 5), torch.zeros(2),
        ...                 torch.tensor([3, 0]), (8, 8), "gradcam")
        >>> cam  # doctest: +NORMALIZE_WHITESPACE
        LayerMaps(method='gradcam', batch=2, 3 layers 'c1' ... 'c3', input_size=(8, 8), maps: float32 on cpu,
                  classes=[3, 0])
        >>> cam == cam, cam == replace(cam)
        (True, False)
    """

    layers: list[str]
    maps: dict[str, Tensor]
    output: Tensor
    scores: Tensor
    classes: Tensor | None
    input_size: tuple[int, int]
    method: str

    def __post_init__(self) -> None:
        # a plain dict of layers becomes a LayerDict, whose missing key names the layers there are
        for name in ("maps", "bpfm", "coefficients", "diagnostics"):
            value = getattr(self, name, None)
            if type(value) is dict:
                setattr(self, name, LayerDict(value))

    def upsample(self, size: int | tuple[int, int] | None = None, normalize: bool = True) -> Tensor:
        """All maps as ``Tensor[B, L, H, W]``: bilinear to ``size`` (default: the input size), each
        map min-max normalised to [0, 1] when ``normalize``.

        ``size`` is ``(H, W)`` or one int for a square; maps holding NaN or Inf cannot be normalised
        (an :class:`~naflow_fx.errors.InputError` names their layers; ``normalize=False`` gives them raw).
        """
        fn = "upsample"
        size = _check_size(self.input_size if size is None else size, fn)
        if not isinstance(normalize, (bool, np.bool_)):
            raise InputTypeError(f"{fn}: normalize must be True or False, got {type(normalize).__name__} {normalize!r}")
        if not self.layers:
            raise InputError(f"{fn}: the result has no layers, so there are no maps to upsample")
        first = self.maps.get(self.layers[0])
        batch = first.shape[0] if isinstance(first, Tensor) and first.dim() == 3 else -1
        hint = "every layer's map must hold one map per sample"
        check_maps(self, self.layers, batch, fn, "the result", "samples", hint, finite=False)
        if normalize:
            bad = non_finite_layers(self.maps, self.layers)
            if bad:
                raise InputError(
                    f"{fn}: the maps of {len(bad)} layer(s) contain NaN or Inf ({', '.join(map(repr, bad[:3]))}"
                    f"{', ...' if len(bad) > 3 else ''}), so they cannot be normalised to [0, 1]; pass "
                    "normalize=False for the raw maps, or recompute the flow (see the NumericalWarning)"
                )
        what = f"{fn}: {len(self.layers)} layers of {batch}×{size[0]}×{size[1]} float32 maps"
        todo = (
            "pass a smaller size, or upsample the layers you need one at a time with "
            "F.interpolate(result.maps[name][:, None], size)"
        )
        nbytes = batch * size[0] * size[1] * 4 * (len(self.layers) + 4)
        _check_room(nbytes, first.device, what, todo)
        try:
            out = torch.empty((batch, len(self.layers), *size), dtype=torch.float32, device=first.device)
        except (RuntimeError, MemoryError):  # where the free memory is unknown
            raise InputError(
                f"{what} would need {nbytes / 2**30:.3g} GiB, more than can be allocated: {todo}"
            ) from None
        # one layer at a time into the output, so the peak is the output plus a few single-layer
        # temporaries rather than several copies of every layer's upsampled maps
        for i, name in enumerate(self.layers):
            # in the maps' own dtype, normalised before the float32 output: float64 maps of 1e-60 or
            # 1e300 (the float64 flows NumericalWarning advises) keep their shape
            maps = self.maps[name] if self.maps[name].is_floating_point() else self.maps[name].float()
            if normalize:
                out[:, i] = resized_normalized(maps, size)
            else:
                out[:, i] = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_describe(self)})"


def _describe(res: LayerMaps) -> str:
    """The fields of ``repr(res)``: a summary, never the tensors' values (and a malformed result still prints)."""
    layers = list(res.layers) if isinstance(res.layers, (list, tuple)) else []
    first = res.maps.get(layers[0]) if layers and isinstance(res.maps, dict) else None
    if isinstance(first, Tensor) and first.dim():
        batch = first.shape[0]
    else:
        batch = res.scores.shape[0] if isinstance(res.scores, Tensor) and res.scores.dim() else "?"

    def short(n: object) -> str:
        text = repr(n)
        return text if len(text) <= 40 else text[:36] + "..."

    if len(layers) > 2:
        names = f" {short(layers[0])} ... {short(layers[-1])}"
    else:
        names = "".join(f"{', ' if i else ' '}{short(n)}" for i, n in enumerate(layers))
    size = res.input_size
    parts = [
        f"method={res.method!r}",
        f"batch={batch}",
        f"{len(layers)} layer{'' if len(layers) == 1 else 's'}{names}",
        f"input_size={tuple(size) if isinstance(size, (list, tuple)) else size!r}",
    ]
    if isinstance(first, Tensor):
        parts.append(f"maps: {str(first.dtype).removeprefix('torch.')} on {first.device}")
    if isinstance(res.classes, Tensor):
        values = res.classes.flatten()[:7].tolist()
        parts.append(f"classes=[{', '.join(map(str, values[:6]))}{', ...' if len(values) > 6 else ''}]")
    return ", ".join(parts)


def _check_room(nbytes: int, device: torch.device, what: str, todo: str) -> None:
    """Refuse an allocation that cannot fit, instead of the process being killed by the system."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise InputError(
            f"{what} would need {nbytes / 2**30:.3g} GiB, but {free / 2**30:.3g} GiB are free on {device}: {todo}"
        )


def _check_size(size: object, fn: str) -> tuple[int, int]:
    """``size`` (one int, or ``(H, W)``: ints, numpy or 0-d integer tensors, not bools) as two positive ints."""
    pair = (size, size) if _is_int(size) else size
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2 or not all(map(_is_int, pair)):
        raise InputTypeError(f"{fn}: size must be (H, W), two ints, or one int for a square, got {size!r}")
    out = (int(pair[0]), int(pair[1]))
    if min(out) < 1:
        raise InputError(f"{fn}: size must be at least 1 pixel on each side, got {out}")
    return out


def _is_int(value: object) -> bool:
    """An integer (int, numpy integer, 0-d integer tensor), not a bool."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


class NotKept(dict):
    """The empty ``bpfm`` / ``coefficients`` of a ``keep="maps"`` flow: a key says why it is missing.

    Example:
        >>> NotKept("BPFMs")["layer1"]
        Traceback (most recent call last):
        ...
        KeyError: "'layer1': nf(x, keep='maps') returns the maps only, without BPFMs; call nf(x) (keep='all') for them"
    """

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def __missing__(self, key: object) -> None:
        raise KeyError(
            f"{key!r}: nf(x, keep='maps') returns the maps only, without {self.what}; call nf(x) (keep='all') for them"
        )

    def __reduce__(self):
        return NotKept, (self.what,)


@dataclass(eq=False, repr=False)  # LayerMaps' short repr and identity equality
class FlowResult(LayerMaps):
    """A NAFlow result: maps plus the back-propagated feature maps, coefficients and diagnostics.

    Attributes:
        bpfm: layer name → ``Tensor[B, C, h, w]``, the back-propagated feature map ``B_v``.
        coefficients: layer name → ``Tensor[B, C, h, w]``, ``Λ_v = ∂s/∂a_v``.
        diagnostics: one :class:`~naflow_fx.solvers.SolveRecord` per inverse step, keyed by the
            layer whose inverse it is (deep → shallow).

    Like :class:`LayerMaps`, its ``repr`` is a one-line summary and it compares by identity.
    """

    bpfm: dict[str, Tensor] = field(default_factory=dict)
    coefficients: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, SolveRecord] = field(default_factory=dict)

    def format_diagnostics(self) -> str:
        """The diagnostics as an aligned text table (columns widen for long layer or rule names)."""
        wl = max([28, *(len(str(k)) for k in self.diagnostics)])
        wr = max([26, *(len(str(getattr(r, "rule", ""))) for r in self.diagnostics.values())])
        head = (
            f"{'inverse of':<{wl}} {'rule':<{wr}} {'method':<12} {'iters':>5} {'residual':>10} {'damping λ':>10} "
            f"{'sec':>7}"
        )
        rows = [head, "-" * len(head)]
        for layer, r in self.diagnostics.items():
            if not isinstance(r, SolveRecord):
                raise InputTypeError(
                    f"format_diagnostics: diagnostics[{layer!r}] must be a SolveRecord, got {type(r).__name__}"
                )
            rows.append(
                f"{layer:<{wl}} {r.rule:<{wr}} {r.method:<12} {r.iterations:>5} {r.residual:>10.2e} "
                f"{r.damping:>10.2e} {r.seconds:>7.3f}" + ("" if r.converged else "  (not converged)")
            )
        return "\n".join(rows)


@overload
def concat(results: Sequence[FlowResult]) -> FlowResult: ...
@overload
def concat(results: Sequence[LayerMaps]) -> LayerMaps: ...
def concat(results: Sequence[LayerMaps]) -> LayerMaps:
    """Join per-batch results of the same explainer along the batch dimension.

    Flows give a :class:`FlowResult`, other results a :class:`LayerMaps`. For flows, BPFMs and
    coefficients are joined too, and each step's diagnostics are merged: iterations, residual,
    normal residual and damping are the worst over the parts (NaN if any part's is), seconds
    their sum. The parts must come from the same explainer: same method, layers, input size,
    device and map sizes, else an :class:`~naflow_fx.errors.InputError` names the first misfit.
    """
    results = _check_parts(results)
    first = results[0]
    cat = lambda field_: torch.cat([getattr(r, field_) for r in results])  # noqa: E731
    classes = None if first.classes is None else torch.cat([r.classes for r in results])
    common = dict(
        layers=list(first.layers),
        maps={n: torch.cat([r.maps[n] for r in results]) for n in first.layers},
        output=cat("output"),
        scores=cat("scores"),
        classes=classes,
        input_size=first.input_size,
        method=first.method,
    )
    if not isinstance(first, FlowResult):
        return LayerMaps(**common)
    diagnostics = {}
    for key, rec in first.diagnostics.items():
        parts = [r.diagnostics[key] for r in results]
        diagnostics[key] = replace(
            rec,
            iterations=max(p.iterations for p in parts),
            residual=_worst(p.residual for p in parts),
            damping=_worst(p.damping for p in parts),
            normal_residual=_worst(p.normal_residual for p in parts if p.normal_residual is not None),
            converged=all(p.converged for p in parts),
            seconds=sum(p.seconds for p in parts),
        )
    return FlowResult(
        **common,
        bpfm=_joined(first.bpfm, lambda n: torch.cat([r.bpfm[n] for r in results])),
        coefficients=_joined(first.coefficients, lambda n: torch.cat([r.coefficients[n] for r in results])),
        diagnostics=diagnostics,
    )


def _joined(first: dict, join: Callable[[str], Tensor]) -> dict:
    """``{name: join(name)}`` over ``first``'s names, still a :class:`NotKept` if ``first`` is one."""
    return NotKept(first.what) if isinstance(first, NotKept) else {n: join(n) for n in first}


def _worst(values) -> float | None:
    """The largest of ``values``, NaN if any is NaN (``max`` alone depends on where the NaN is); None if empty."""
    values = list(values)
    if not values:
        return None
    return math.nan if any(v != v for v in values) else max(values)


def _check_parts(results: object) -> list[LayerMaps]:
    """The results to :func:`concat` as a list, each a result of the same explainer as the first."""
    fn = "concat"
    if isinstance(results, (LayerMaps, Tensor, str, bytes)) or not isinstance(results, Iterable):
        raise InputTypeError(
            f"{fn}: pass a list of results (LayerMaps or FlowResult), got {type(results).__name__}; for one "
            "result use concat([result])"
        )
    results = [check_layer_maps(r, fn, f"results[{i}]") for i, r in enumerate(results)]
    if not results:
        raise InputError(f"{fn}: needs at least one result, got an empty list")
    first = results[0]
    hint = "concat joins per-batch results of the same explainer (one compiled NAFlow, one method, one input size)"

    def devices(r: LayerMaps) -> set:
        return {t.device for t in (r.output, r.scores, *r.maps.values()) if isinstance(t, Tensor)}

    for i, r in enumerate(results):
        missing = [n for n in r.layers if n not in r.maps]
        if missing:
            raise InputError(f"{fn}: results[{i}] lists layer {missing[0]!r} but has no map for it")
        if i == 0:
            continue
        what = f"{fn}: results[{i}]"
        if type(r) is not type(first) or r.method != first.method:
            raise InputError(
                f"{what} is a {type(r).__name__} of method {r.method!r} but results[0] a {type(first).__name__} of "
                f"method {first.method!r}; {hint}"
            )
        if list(r.layers) != list(first.layers):
            extra = [n for n in r.layers if n not in first.layers] or [n for n in first.layers if n not in r.layers]
            detail = f"e.g. {extra[0]!r} is in only one of them" if extra else "in another order"
            raise InputError(f"{what} has other layers than results[0] ({detail}); {hint}")
        if tuple(r.input_size) != tuple(first.input_size):
            raise InputError(
                f"{what} is for inputs of size {tuple(r.input_size)}, results[0] for {tuple(first.input_size)}; {hint}"
            )
        shaped = [n for n in first.layers if tuple(r.maps[n].shape[1:]) != tuple(first.maps[n].shape[1:])]
        if shaped or tuple(r.output.shape[1:]) != tuple(first.output.shape[1:]):
            where = f"the map of layer {shaped[0]!r}" if shaped else "the model output"
            raise InputError(f"{what}: {where} has another shape than in results[0]; {hint}")
        if (r.classes is None) != (first.classes is None):
            kinds = ["class targets" if x.classes is not None else "a non-class target" for x in (r, first)]
            raise InputError(
                f"{what} explains {kinds[0]} but results[0] {kinds[1]}; join results of the same kind of target"
            )
        if devices(r) != devices(first):
            raise InputError(
                f"{what} is on {', '.join(sorted(map(str, devices(r))))} but results[0] on "
                f"{', '.join(sorted(map(str, devices(first))))}; move them to one device first"
            )
        if isinstance(first, FlowResult):
            for attr in ("bpfm", "coefficients", "diagnostics"):
                if set(getattr(r, attr)) != set(getattr(first, attr)):
                    raise InputError(
                        f"{what} has {attr} for other layers than results[0] (e.g. one was computed with "
                        f"keep='maps' and the other with keep='all'); {hint}"
                    )
    return results


def non_finite_layers(maps: dict[str, Tensor], layers: list[str]) -> list[str]:
    """The layers (in ``layers``' order) whose map holds a NaN or Inf, with one device sync."""
    finite = torch.stack([torch.isfinite(maps[n]).all() for n in layers]).tolist() if layers else []
    return [n for n, ok in zip(layers, finite) if not ok]


def check_layer_maps(result: object, fn: str, what: str = "result") -> LayerMaps:
    """``result`` if it is a :class:`LayerMaps` (a :class:`FlowResult` is one), else an :class:`InputTypeError`."""
    if not isinstance(result, LayerMaps):
        raise InputTypeError(
            f"{fn}: {what} must be a LayerMaps (a FlowResult is one: what nf(x), nf.gradcam(x) or "
            f"nf.layercam(x) return), got {type(result).__name__}"
        )
    return result


def check_maps(
    res: LayerMaps, layers, batch: int, fn: str, what: str, per: str, hint: str, *, finite: bool = True
) -> None:
    """Each of ``layers``' maps in ``res`` is a finite real ``Tensor[batch, h, w]``, else an :class:`InputError`.

    ``per`` names what there is one of per map (``"images"``, ``"masks"``); ``hint`` says what to pass.
    ``finite=False`` skips the NaN/Inf check (and its device sync).
    """
    for name in layers:
        if name not in res.maps:
            raise InputError(f"{fn}: {what} lists layer {name!r} but has no map for it")
        m = res.maps[name]
        if not isinstance(m, Tensor) or m.dim() != 3 or 0 in m.shape[1:] or m.is_complex():
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise InputError(f"{fn}: the map of layer {name!r} in {what} must be a Tensor [B, h, w], got {got}")
        if m.shape[0] != batch:
            raise InputError(
                f"{fn}: there are {batch} {per} but {what} has {m.shape[0]} maps for layer {name!r}; {hint}"
            )
        if finite and m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise InputError(f"{fn}: the map of layer {name!r} in {what} contains NaN or Inf values")

"""``compile_naflow`` and the compiled ``NAFlow`` object."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import passes
from .errors import (
    ConfigError,
    InputError,
    InputTypeError,
    NumericalWarning,
    UnsupportedModelError,
    ZeroMapsWarning,
    channels_last_hint,
    did_you_mean,
    elided,
    warn_at_caller,
)
from .passes.codegen import gradients, layer_map
from .passes.normalize import refresh_derived_weights
from .passes.partition import Plan
from .passes.shape_prop import layout, tensor_meta
from .result import FlowResult, LayerMaps, NotKept, non_finite_layers
from .solvers import SolverConfig, SolverContext, SolveRecord
from .solvers.operator import widest_float
from .targets import resolve_target
from .tracing import (
    _wrap_hint,
    ieee_float32,
    is_frozen_batch_norm,
    not_a_module,
    trace,
    training_off,
    warn_forward_hooks,
)

__all__ = ["compile_naflow", "NAFlow", "REDUCTIONS"]

REDUCTIONS = ("sum_relu", "relu_sum")


def _example_tensor(example_input: Tensor | Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(example_input, Tensor):
        if example_input.dim() < 2 or example_input.shape[0] == 0:
            raise InputError(f"example_input must be a batch like [B, C, H, W]; got shape {tuple(example_input.shape)}")
        if example_input.dim() == 3:
            hint = channels_last_hint(example_input) or (
                ". If this is one image, add the batch dim with x.unsqueeze(0) (a 1-D signal model on [B, C, L] is "
                "not supported)"
            )
            raise InputError(
                f"example_input has shape {tuple(example_input.shape)}, 3 dims: naflow_fx explains 2-D CNNs on "
                f"image batches [B, C, H, W]{hint}"
            )
        return example_input.detach()[:1].to(device=device, dtype=dtype, copy=True)  # never the caller's images
    if isinstance(example_input, Sequence) and all(isinstance(s, int) and s > 0 for s in example_input):
        shape = (1, *example_input[1:])  # one sample is enough for the shapes
        if len(shape) == 3:
            raise InputError(
                f"example_input={tuple(example_input)} has 3 dims; pass a batch shape such as {(1, *example_input)}"
            )
        try:
            return torch.zeros(shape, device=device, dtype=dtype)
        except (RuntimeError, MemoryError):
            gib = math.prod(shape) * torch.finfo(dtype).bits / 8 / 2**30
            raise InputError(
                f"cannot allocate an example input of shape {shape} ({gib:.3g} GiB); pass a smaller size "
                "(the compiled flow also accepts other spatial sizes)"
            ) from None
    hint = ""
    if isinstance(example_input, dict):  # forward(batch) reading batch["image"]
        key = next((k for k, v in example_input.items() if isinstance(v, Tensor)), "image")
        hint = (
            ". A flow calls the model on the images tensor alone: if its forward takes a dict, wrap it and pass "
            f"the images, e.g.\n{_wrap_hint(f'{{{key!r}: x}}')}"
        )
    raise InputTypeError(
        f"example_input must be a tensor or a shape such as (1, 3, 224, 224); got {type(example_input).__name__}" + hint
    )


_KEEP = ("all", "maps")


# NOTE [caller's modes]
# Explainers are often called inside `torch.inference_mode()` (which records no graph, so every Λ
# and map came out wrong without an error) or `torch.autocast` (which runs the convolutions of the
# solves in bfloat16/float16, far coarser than their 1e-4 stopping rule). TF32 on a GPU (cuDNN's
# default for float32 convolutions) and bfloat16 for float32 on a CPU with AMX
# (`torch.backends.mkldnn.conv.fp32_precision = "bf16"`) are as coarse. A flow leaves all of them
# for its own work, and so does compiling (whose computed weights and tensor constants must not be
# inference tensors); an inference tensor as input is copied to a normal one (`_check_input`).
# Two more contexts would break a flow outright: a default device other than the model's
# (`torch.set_default_device("cuda")` with a CPU model, or "meta") would put the tensors that torch
# and the model make without a device elsewhere, and the caller's saved-tensor hooks
# (`torch.autograd.graph.save_on_cpu()`) are refused by torch.func. A flow runs with the model's
# device as the default and without those hooks (the library's own CPU work names its device).
# The caller's modes and settings hold again when the flow returns.
@contextlib.contextmanager
def exact_mode(device: torch.device) -> Iterator[None]:
    """Inference mode, autocast, reduced-precision float32 kernels, another default device and
    saved-tensor hooks off, whatever the caller's context.

    NOTE [caller's modes]; the settings are the caller's again afterwards.
    """
    try:
        default = torch.get_default_device()
    except RuntimeError:  # "cuda" on a machine without a driver: it cannot be the model's device
        default = None
    here = torch.device(device) if default != device else contextlib.nullcontext()
    with torch.inference_mode(False), torch.autocast(device.type, enabled=False), ieee_float32(), here:
        with saved_tensor_hooks_off():
            yield


@contextlib.contextmanager
def saved_tensor_hooks_off() -> Iterator[None]:
    """The caller's saved-tensor default hooks taken off this thread's stack, and put back after.

    torch.func refuses to run under them, and they only change where autograd keeps what it saves.
    torch has no public way to set them aside, so this uses the stack's own private calls, if any.
    """
    hooks = torch._C._autograd
    if not all(hasattr(hooks, f"_{op}_saved_tensors_default_hooks") for op in ("top", "pop", "push")):
        yield
        return
    popped = []
    while (top := hooks._top_saved_tensors_default_hooks(False)) is not None:
        popped.append(top)
        hooks._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(popped):
            hooks._push_saved_tensors_default_hooks(pack, unpack)


@contextlib.contextmanager
def leaves_in_eval(gm: fx.GraphModule) -> Iterator[None]:
    """The modules ``gm`` calls as leaves (``leaf_modules``, unknown layers) in eval mode, then as they were.

    The flow computes with eval semantics (running statistics, no dropout), and a leaf in training
    mode would update the user's buffers on every run. Only the ``training`` flags are set, directly:
    no ``train()`` override of the user's runs.
    """
    leaves = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            leaves.update(dict.fromkeys(gm.get_submodule(node.target).modules()))
    with training_off(leaves):
        yield


class NAFlow:
    """A compiled NAFlow explainer: build once, call on many batches.

    Use :func:`compile_naflow` to make one. Calling it returns a :class:`~naflow_fx.FlowResult`.

    Attributes:
        layers: explained layer names, shallow → deep.
        last_layer: N, the last feature layer (its BPFM is its activation).
        inverse: the generated inverse network (``torch.fx.GraphModule``; see ``.code``).
        graph_module: the normalised forward graph the flow runs on.
        config: the :class:`~naflow_fx.solvers.SolverConfig`.
        reduction: ``"sum_relu"`` (Eq. 2) or ``"relu_sum"`` (the authors' code).
        plan: the stages and regions (:class:`~naflow_fx.passes.Plan`) the inverse network follows.
        fixed_shape: ``None``, or the ``(C, H, W)`` the model was traced at and where in its forward
            a size was read in Python (inputs must then have that size).
    """

    def __init__(
        self, graph_module: fx.GraphModule, layers: list[str], config: SolverConfig, reduction: str, example: Tensor
    ) -> None:
        self.graph_module = graph_module
        self.plan: Plan = graph_module.meta["naflow.plan"]
        self.config = config
        self.reduction = reduction
        self._example_shape = tuple(example.shape)
        self._dtype = example.dtype
        self._device = example.device
        # NOTE [fixed shapes]: ((C, H, W), where) when the model was traced at the example's sizes
        self.fixed_shape: tuple[tuple[int, ...], str] | None = graph_module.meta.get("naflow.fixed_shape")
        self._layer_of = {n.name: n.meta.get("naflow.name", n.name) for n in graph_module.graph.nodes}
        self._node_of = {v: k for k, v in self._layer_of.items()}
        self._layer_nodes = [self._node_of[name] for name in layers]
        self.layers = list(layers)
        self.last_layer: str = self._layer_of[self.plan.last]
        self._program = passes.emit_inverse(graph_module, self._layer_nodes)
        self._maps: passes.InverseProgram | None = None  # keep="maps" variant, emitted on first use
        self.inverse = self._program.module
        order = {n.name: i for i, n in enumerate(graph_module.graph.nodes)}
        needed = set(self._program.activations) | set(self._layer_nodes)
        self._recorded = sorted(needed, key=order.__getitem__)
        self._recorder = passes.emit_recorder(graph_module, self._recorded)
        # σ_max of shared operators and the 1×1 filters depend on the weights alone, so they are
        # cached across calls, and dropped whenever a weight changes (NOTE [weight cache]).
        self._sigma_cache: dict = {}
        self._mixing: str | None = None  # where the model mixes a batch's images, "" if nowhere; None: not checked
        self._weights_seen: tuple = ()
        self._recipe: tuple | None = None  # (model, example shape, options), set by compile_naflow
        self._bindings: _Bindings | None = None  # NOTE [replaced weights], set by compile_naflow
        # NOTE [layouts]: channels-last layers (inside ConvNeXt blocks) are reported on their NCHW view
        nodes = {n.name: n for n in graph_module.graph.nodes}
        self._to_nchw = {}
        for node in self._layer_nodes:
            perm = layout(nodes[node])
            if perm != (0, 1, 2, 3):
                self._to_nchw[node] = tuple(sorted(range(4), key=perm.__getitem__))

    def _weight_cache(self) -> dict:
        """The cache of weight-only quantities, emptied if any parameter or buffer changed.

        NOTE [weight cache]: the traced module shares the user's parameters, so loading other
        weights into the model (``load_state_dict``, an optimiser step, ``.to(device)``) changes
        the flow. An in-place change bumps a tensor's version counter and a replaced tensor has
        a new storage, but a write through ``.data`` does neither, so each tensor's values are
        compared too, by a fingerprint that also changes when they only move (two output channels
        swapped keep the sum): a few passes over the weights in chunks, 0.1 s for ResNet-50 on one
        thread against a flow's seconds.
        """
        tensors = [t.detach() for t in (*self.graph_module.parameters(), *self.graph_module.buffers())]
        ids = tuple((t.data_ptr(), t._version) for t in tensors)
        wide = widest_float(self._device)  # MPS has no float64
        sums = [_fingerprint(t, wide) for t in tensors if t.is_floating_point() and t.numel()]
        seen = (ids, torch.cat(sums).cpu() if sums else None)
        if not self._weights_seen or ids != self._weights_seen[0] or not _same(seen[1], self._weights_seen[1]):
            self._sigma_cache.clear()
        self._weights_seen = seen
        return self._sigma_cache

    def _nchw(self, node: str, t: Tensor) -> Tensor:
        dims = self._to_nchw.get(node)
        return t if dims is None else t.permute(dims)

    # ------------------------------------------------------------------ inputs
    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Where the flow runs the model: the caller's modes off (NOTE [caller's modes]), the model
        checked (NOTE [replaced weights]: first, since it may put replaced weights into the graph
        modules) and the leaf modules in eval mode."""
        with exact_mode(self._device):
            self._check_model()
            with leaves_in_eval(self.graph_module):
                yield

    def _check_model(self) -> None:
        """The model's weights must still have the dtype and device the flow was compiled for.

        Weights the model derives from its parameters on every call (weight and spectral norms,
        pruning masks) are recomputed from them (decision 3).
        """
        param = next((p for p in self.graph_module.parameters() if p.is_floating_point()), None)
        if param is not None and (param.dtype, param.device) != (self._dtype, self._device):
            raise InputError(
                f"the model was compiled in {self._dtype} on {self._device} but its weights are now {param.dtype} on "
                f"{param.device} (model.to(...), .double() or .half() after compile_naflow); compile it again: "
                "compile_naflow(model, x)"
            )
        if self._recipe is not None:
            self._follow_replaced(self._recipe[0])
        refresh_derived_weights(self.graph_module)

    def _follow_replaced(self, model: nn.Module) -> None:
        """Hold the tensors ``model`` replaced on its own modules (NOTE [replaced weights]); refuse other changes."""
        bound = self._bindings
        if bound is None:
            return
        for path, module in bound.modules:
            now = _lookup(model, path)
            if now is not module:
                kind = type(now).__name__
                what = "removed" if now is None else f"replaced by {'an' if kind[0] in 'AEIOU' else 'a'} {kind}"
                raise InputError(
                    f"module {path!r} ({type(module).__name__}) of the model was {what} since compile_naflow, "
                    "and the flow was planned for the old one: compile it again, compile_naflow(model, x)"
                )
        for path, module, traced in bound.settings:
            now = _settings(module)  # an attribute added since (a tool's annotation) was not traced: ignored
            changed = next((k for k in traced if repr(traced[k]) != repr(now.get(k, _REMOVED))), None)
            if changed is not None:
                raise InputError(
                    f"{changed!r} of module {path!r} ({type(module).__name__}) was changed from "
                    f"{traced[changed]!r} to {now.get(changed, _REMOVED)!r} since compile_naflow, and the flow was "
                    "traced with the old value: compile it again, compile_naflow(model, x)"
                )
        bound.hooks = warn_forward_hooks(model, self.graph_module, bound.hooks)
        stale = [(t, held, live) for t, held in bound.tensors if (live := _lookup(model, t)) is not held]
        for target, held, live in stale:
            why = _not_followable(model, target, held, live)
            if why:
                raise InputError(f"{why} since compile_naflow: compile it again, compile_naflow(model, x)")
        if not stale:
            return
        users = {id(m) for m in (*bound.owners, *model.modules())}
        roots = [self.graph_module, self._recorder, self._program.module]
        roots += [self._maps.module] if self._maps is not None else []
        holders = {id(g): g for r in roots for g in r.modules() if isinstance(g, fx.GraphModule) and id(g) not in users}
        for target, held, live in stale:
            owner_path, _, field = target.rpartition(".")
            for graph_module in holders.values():  # each holds the tensor at the target's own path
                owner = _lookup(graph_module, owner_path) if owner_path else graph_module
                if not isinstance(owner, nn.Module) or id(owner) in users:
                    continue  # the user's own modules are never written to
                for slots in (owner._parameters, owner._buffers):
                    if slots.get(field) is held:
                        slots[field] = live
        replaced = {t: live for t, _, live in stale}
        bound.tensors = [(t, replaced.get(t, held)) for t, held in bound.tensors]

    def _check_input(self, x: object) -> Tensor:
        """``x`` as a batch the flow can explain (call :meth:`_check_model` first), else a library error."""
        if not isinstance(x, Tensor):
            hint = ""
            if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
                hint = "; for a list of images [C, H, W] of one size, pass torch.stack(images)"
            elif type(x).__module__ == "numpy":
                hint = "; convert it with torch.from_numpy(x) (channels first, [B, C, H, W])"
            raise InputTypeError(f"the input must be a torch.Tensor batch [B, C, H, W], got {type(x).__name__}{hint}")
        if x.is_nested or x.layout != torch.strided:
            layout = "nested" if x.is_nested else str(x.layout).removeprefix("torch.")
            raise InputError(f"the input is a {layout} tensor; pass a dense one, e.g. x.to_dense()")
        rank, channels = len(self._example_shape), self._example_shape[1]
        if x.dim() != rank:
            hint = channels_last_hint(x, channels)
            hint = hint or (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == rank - 1 else "")
            raise InputError(f"the input must have {rank} dims like {self._example_shape}, got {tuple(x.shape)}{hint}")
        if x.shape[0] == 0:
            raise InputError("the input batch is empty (B = 0)")
        if x.shape[1] != channels:
            raise InputError(
                f"the input has {x.shape[1]} channels but the model was compiled for {channels}"
                + channels_last_hint(x, channels)
            )
        if self.fixed_shape is not None and tuple(x.shape[1:]) != self.fixed_shape[0]:
            size, where = self.fixed_shape
            raise InputError(
                f"the model was compiled for inputs of size {size} only, got {tuple(x.shape[1:])}: its forward "
                f"computes with the input's shape in Python ({where}), so it was traced at the example's sizes; "
                "resize the input, or compile again with an example of the size you need"
            )
        if x.is_complex():  # x.float() would drop the imaginary part without a word
            raise InputError(
                f"the input must be a real floating-point tensor, got {x.dtype}: CNNs on images take real values "
                "(x.real, x.abs(), or the real and imaginary parts as channels, torch.cat([x.real, x.imag], 1), as the "
                "model expects)"
            )
        if not x.is_floating_point():
            raise InputError(f"the input must be a floating-point tensor, got {x.dtype}; convert it with x.float()")
        if x.dtype != self._dtype:
            raise InputError(f"the input is {x.dtype} but the model computes in {self._dtype}; use x.to({self._dtype})")
        if x.device != self._device:
            raise InputError(
                f"the input is on {x.device} but the model is on {self._device}; use x.to('{self._device}')"
            )
        if not bool(torch.isfinite(x).all()):
            raise InputError(
                "the input contains NaN or Inf values; check how the images were loaded and normalised (e.g. a "
                "division by a zero std), or replace them with torch.nan_to_num(x)"
            )
        # A copy: a model that writes into its input in place (a leaf module's `x.sub_(mean)`) must
        # not change the caller's images; and one made under torch.inference_mode is a normal
        # tensor autograd can use (NOTE [caller's modes]).
        return x.detach().clone()

    def _check_batch(self, x: Tensor) -> None:
        """Refuse a batch of several images if the model mixes them (NOTE [independent samples])."""
        if x.shape[0] == 1:
            return
        if self._mixing is None:
            found = passes.first_mixing_node(self.graph_module, x[:1].clone())  # the model may write into it
            if found is not None and found[0] is None:
                return  # the probe failed: the recording pass reports any failure, and the next call checks again
            if found is None:
                self._mixing = ""
            elif found[1] == "folds":
                self._mixing = (
                    f"the model moves the batch out of the leading dim at {self._describe_node(found[0])} (timm's "
                    "CondConv folds it into the channels; a sum or mean over dim 0 reduces it)"
                )
            else:
                self._mixing = (
                    f"the model mixes the images of a batch at {self._describe_node(found[0])}: one image's values "
                    "there change with the other images (e.g. a softmax or normalisation over dim 0)"
                )
        if self._mixing:
            raise UnsupportedModelError(
                f"{self._mixing}. NAFlow solves each image on its own, so such a model is explained one image at a "
                f"time: e.g. [nf(x[i : i + 1]) for i in range({x.shape[0]})]"
            )

    def _describe_node(self, node: fx.Node) -> str:
        module = node.meta.get("naflow.module_type")
        op = module or (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target))
        return f"{self._layer_of[node.name]!r} ({op})"

    def _record(self, x: Tensor, target: object, keep: Iterable[str], grad_nodes: Iterable[str]):
        """Recording forward and a backward: output, recorded values in ``keep``, Λ of ``grad_nodes``, scores, classes.

        ``x`` has passed :meth:`_check_input`. The backward pass runs only as deep as the shallowest
        node in ``grad_nodes``, and the recorded values the caller does not keep are released before
        it (NOTE [memory]).
        """
        with torch.enable_grad():
            xin = x.detach().requires_grad_(True)
            try:
                output, values = self._recorder.forward(xin)  # not __call__: fx would print a traceback
            except Exception as exc:  # the model itself rejected this input
                raise InputError(
                    f"the model failed on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}"
                ) from None
            values = dict(zip(self._recorded, values))
            if isinstance(output, Tensor) and (output.dim() == 0 or output.shape[0] != x.shape[0]):
                raise InputError(
                    f"the model's output has shape {tuple(output.shape)} for a batch of {x.shape[0]} image(s), but "
                    "its first dim must be the batch, one row per image: it reduces or flattens the batch away "
                    "(a .sum(), nn.Flatten(0), .view(-1), or a .squeeze() that also drops a batch of 1). Make forward "
                    "return [B, ...], e.g. with nn.Flatten() (from dim 1), .squeeze(-1) or .view(x.shape[0], -1)"
                )
            scores, classes = resolve_target(target, output)
            bad = ~torch.isfinite(scores.detach())
            if bool(bad.any()):
                raise InputError(
                    f"the explained score is NaN or Inf for sample(s) {bad.nonzero()[:, 0].tolist()}: check the "
                    "model's weights and the input's scale (normalised images are about -2.5 to 2.5)"
                )
            points = {n: values[n] for n in grad_nodes}
            keep = set(keep)
            values = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in values.items() if k in keep}
            lams = dict(zip(points, gradients(scores.sum(), list(points.values()))))
        del points
        return output.detach(), values, lams, scores.detach(), classes

    # ------------------------------------------------------------------ flows
    @property
    def num_steps(self) -> int:
        """Inverse steps per call (one per stage the requested layers need); ``progress`` is called this often."""
        return self._program.steps

    def __call__(
        self,
        x: Tensor | None = None,
        target: object = None,
        *,
        targets: object = None,
        input_tensor: Tensor | None = None,
        keep: str = "all",
        progress: Callable[[SolveRecord], object] | None = None,
    ) -> FlowResult:
        """Explain ``x`` (``Tensor[B, C, H, W]``) for ``target`` (None = argmax per sample).

        ``target``: int, list[int] (length B), LongTensor[B], :class:`~naflow_fx.ClassTarget`, a
        callable ``output -> Tensor[B]``, or a list of one target per sample as pytorch-grad-cam
        takes them (each callable scores its sample's output ``output[i]``). ``keep="all"`` returns
        each layer's map, BPFM and coefficients; ``keep="maps"`` returns the maps only (``bpfm``
        and ``coefficients`` empty), and frees each layer's BPFM and Λ as soon as its map is made,
        for a much lower peak memory (NOTE [memory]). ``progress``, if given, is called with each
        inverse step's :class:`~naflow_fx.SolveRecord` as soon as the step ends (:attr:`num_steps`
        calls), e.g. to drive a progress bar. ``input_tensor=`` and ``targets=`` are other names for
        ``x`` and ``target``, as pytorch-grad-cam spells them (``nf(input_tensor=x, targets=t)``).
        """
        x, target = _one_input(x, input_tensor, "nf"), _one_target(target, targets)
        if keep not in _KEEP:
            raise ConfigError(f"keep must be one of {_KEEP}, got {keep!r}")
        if progress is not None and not callable(progress):
            raise InputTypeError(f"progress must be a function of one SolveRecord, got {type(progress).__name__}")
        with self._running():
            return self._flow(x, target, keep, progress)

    def _flow(self, x: Tensor, target: object, keep: str, progress) -> FlowResult:
        x = self._check_input(x)
        self._check_batch(x)
        program = self._program if keep == "all" else self._maps_program()
        # Only Λ_N is recorded: the inverse network chains every other Λ from it (NOTE [chained Λ]).
        output, values, lams, scores, classes = self._record(x, target, program.activations, program.coefficients)
        # NOTE [memory]: the inverse network pops its inputs from `store` where it first uses them,
        # and its generated code drops each after its last use. So nothing else may hold them:
        # recorded values the network does not read go now. Each Λ the network chains lives from
        # its stage to its layer's map (keep="maps") or to the result (keep="all").
        store = {n: values[n] for n in program.activations}
        store.update({f"lam_{n}": lams[n] for n in program.coefficients})
        flat = lams[self.plan.last].flatten(1) if self.plan.last in lams else None
        no_gradient = None if flat is None else ~flat.ne(0).any(1)  # the score ignores N for these samples
        del values, lams, flat
        ctx = SolverContext(self.config, self._weight_cache(), progress=progress)
        with torch.no_grad():
            out = program.module.forward(ctx, store)  # not __call__: no process-wide module hooks on it
        if keep == "maps":
            maps, bpfm, coefficients = dict(out), NotKept("BPFMs"), NotKept("coefficients Λ")
        else:
            bpfms, lams = out
            pairs = list(zip(self._layer_nodes, self.layers))
            bpfm = {name: self._nchw(node, bpfms[name]) for node, name in pairs}
            coefficients = {name: self._nchw(node, lams[name]) for node, name in pairs}
            maps = {n: layer_map(bpfm[n], coefficients[n], dims=None, reduction=self.reduction) for n in self.layers}
        _warn_non_finite(maps, self.layers, x.dtype)
        _warn_unconverged(ctx.records, self.config, x.dtype)
        _warn_all_zero(maps, self.layers, no_gradient, self.last_layer)
        return FlowResult(
            layers=list(self.layers),
            maps=maps,
            output=output,
            scores=scores,
            classes=classes,
            input_size=tuple(x.shape[-2:]),
            method="naflow",
            bpfm=bpfm,
            coefficients=coefficients,
            diagnostics={r.layer: r for r in ctx.records},
        )

    def _maps_program(self) -> passes.InverseProgram:
        if self._maps is None:
            self._maps = passes.emit_inverse(self.graph_module, self._layer_nodes, maps=self.reduction)
        return self._maps

    def _cam(self, x: Tensor, target: object, method: str) -> LayerMaps:
        with self._running():
            return self._cam_maps(x, target, method)

    def _cam_maps(self, x: Tensor, target: object, method: str) -> LayerMaps:
        x = self._check_input(x)
        output, values, lams, scores, classes = self._record(x, target, self._layer_nodes, self._layer_nodes)
        maps = {}
        for node, name in zip(self._layer_nodes, self.layers):
            a, g = self._nchw(node, values[node]), self._nchw(node, lams[node])
            if method == "gradcam":
                maps[name] = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
            else:
                maps[name] = torch.relu((torch.relu(g) * a).sum(1))
        _warn_non_finite(
            maps, self.layers, x.dtype, {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}.get(method, method)
        )
        return LayerMaps(list(self.layers), maps, output, scores, classes, tuple(x.shape[-2:]), method)

    def gradcam(
        self,
        x: Tensor | None = None,
        target: object = None,
        *,
        targets: object = None,
        input_tensor: Tensor | None = None,
    ) -> LayerMaps:
        """Grad-CAM on exactly the same layers: ``ReLU(Σ_c mean_hw(∂s/∂a)_c · a_c)``, batched, on-device.

        ``x`` and ``target`` (or ``input_tensor=`` and ``targets=``) are those of a flow call:
        ``None`` explains each sample's argmax.
        """
        return self._cam(_one_input(x, input_tensor, "nf.gradcam"), _one_target(target, targets), "gradcam")

    def layercam(
        self,
        x: Tensor | None = None,
        target: object = None,
        *,
        targets: object = None,
        input_tensor: Tensor | None = None,
    ) -> LayerMaps:
        """LayerCAM on the same layers: ``ReLU(Σ_c ReLU(∂s/∂a) ⊙ a)``, batched, on-device.

        ``x`` and ``target`` (or ``input_tensor=`` and ``targets=``) are those of a flow call:
        ``None`` explains each sample's argmax.
        """
        return self._cam(_one_input(x, input_tensor, "nf.layercam"), _one_target(target, targets), "layercam")

    # ------------------------------------------------------------------ inspection
    def layer_table(self) -> str:
        """One row per explained layer: index, name, op, output shape, and where its BPFM comes from."""
        nodes = {n.name: n for n in self.graph_module.graph.nodes}
        source: dict[str, str] = {self.plan.last: "last layer: B_N = a_N"}
        for stage in self.plan.stages:
            step = nodes[stage.output].meta["naflow.inverse"]
            source[stage.input] = f"{step.rule_name}({self._layer_of[stage.output]})"
            for inner in stage.body[:-1]:
                source[inner] = f"jvp image of region {self._layer_of[stage.output]}"
        head = f"{'#':>3} {'layer':<28} {'op':<18} {'shape':<16} BPFM from"
        rows = [head, "-" * (len(head) + 24)]
        for i, (node, name) in enumerate(zip(self._layer_nodes, self.layers)):
            n = nodes[node]
            op = n.meta.get("naflow.module_type") or getattr(n.target, "__name__", str(n.target))
            shape = "×".join(str(s) for s in tensor_meta(n).shape[1:])
            rows.append(f"{i:>3} {name:<28} {op:<18} {shape:<16} {source.get(node, '?')}")
        return "\n".join(rows)

    def __reduce__(self):
        """Pickled (``pickle``, ``torch.save``, ``copy.deepcopy``) as the model and the options it was
        compiled with, and compiled again when loaded: the generated code holds no state of its own."""
        recipe = self._recipe
        if recipe is None:
            raise TypeError("this NAFlow was not made by compile_naflow, so it cannot be pickled; compile it instead")
        return _recompile, recipe

    def __repr__(self) -> str:
        return (
            f"NAFlow({len(self.layers)} layers, last_layer={self.last_layer!r}, solver={self.config.solver!r}, "
            f"damping={self.config.damping}, reduction={self.reduction!r}"
            + ("" if self.fixed_shape is None else f", fixed_shape={self.fixed_shape[0]}")
            + ")"
        )


# NOTE [threads]: torch.fx's tracer patches `nn.Module.__call__` and `__getattr__` process-wide
# while it traces. Two compiles at once would mix their traces, so compiles run one at a time. A
# module run in another thread meanwhile (a flow, an embedding, the user's own `model(x)`) went
# through the tracer: its calls became proxies or failed ("module is not installed as a
# submodule"), and its attribute reads saw proxies (a buffer "removed since compile"). The
# library's tracers give other threads the plain call (`NAFlowTracer.call_module`), so flows
# neither wait for a compile nor hold one back.
_COMPILING = threading.RLock()


def _free_compile_lock_in_child() -> None:
    """In a child forked while another thread compiled, that thread is gone: its lock is freed (a
    compile in the forking thread itself keeps it, to release it as it ends)."""
    if not _COMPILING._is_owned():
        _COMPILING._at_fork_reinit()


if hasattr(os, "register_at_fork") and hasattr(_COMPILING, "_at_fork_reinit") and hasattr(_COMPILING, "_is_owned"):
    os.register_at_fork(after_in_child=_free_compile_lock_in_child)
_POOLS = {F.max_pool2d, F.avg_pool2d}
LAYER_SELECTIONS = ("all", "conv", "blocks")


def _one_input(x: Tensor | None, input_tensor: Tensor | None, fn: str) -> Tensor:
    """``x``, or ``input_tensor`` (pytorch-grad-cam's name for it); exactly one of them."""
    if input_tensor is None:
        if x is None:
            raise InputTypeError(f"{fn}() needs the images: {fn}(x) with x a Tensor[B, C, H, W]")
        return x
    if x is not None:
        raise ConfigError("pass the images once: as x or as input_tensor (the same argument), not both")
    return input_tensor


def _one_target(target: object, targets: object) -> object:
    """``target``, or ``targets`` (pytorch-grad-cam's and Captum's name for it); not both."""
    if targets is None:
        return target
    if target is not None:
        raise ConfigError("pass the target once: as target or as targets (the same argument), not both")
    return targets


# NOTE [replaced weights]: the flow's graph modules hold the model's parameters, buffers and leaf
# modules by reference, so changes made in place (load_state_dict, an optimiser step, .data) are
# followed (NOTE [weight cache]). A tensor or module *replaced* on the model (assign=True, a
# buffer reassigned, .float() after .double(), a new head) is another object, and fx copied the
# old reference into every graph module of the flow. Each call compares the model's current objects
# with those the flow holds. Every module the graph went through must be the same object: a new
# layer may compute otherwise with weights of the same shape (another padding, another
# activation), and the plan was made for the old one, so that is an InputError asking to
# compile again. A tensor replaced on its own module by one like it (same shape, dtype and
# device) is put at its path in the flow's own graph modules, never in the user's modules;
# any other (another shape, a weight now computed by pruning or a parametrization) is refused.


@dataclasses.dataclass
class _Bindings:
    """What the flow shares with the model (NOTE [replaced weights])."""

    tensors: list[tuple[str, Tensor]]  # (get_attr target, the parameter or buffer held)
    modules: list[tuple[str, nn.Module]]  # (qualified name, module) of every module the graph went through
    owners: list[nn.Module]  # the model's modules at compile time, never written to (kept alive: their ids stay theirs)
    settings: list[tuple[str, nn.Module, dict]]  # torch.nn modules' settings (padding, eps, ...) as traced
    hooks: frozenset[tuple[str, int]]  # forward hooks the graph does not run, already warned about


_REMOVED = "(removed)"
_EVAL_INERT = ("training", "inplace", "momentum", "track_running_stats")


def _settings(module: nn.Module) -> dict:
    """A ``torch.nn`` module's settings: its public plain attributes (``padding``, ``eps``, ``kernel_size``),
    which tracing turned into constants of the graph. ``inplace``, ``momentum`` and ``track_running_stats``
    (while the running statistics are there: their removal is caught as such) change nothing in eval, nor
    does anything of a dropout."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return {}
    plain = (bool, int, float, str, tuple, type(None))
    return {
        k: v for k, v in vars(module).items() if not k.startswith("_") and k not in _EVAL_INERT and isinstance(v, plain)
    }


def _bindings(gm: fx.GraphModule, model: nn.Module, hooks: frozenset[tuple[str, int]] = frozenset()) -> _Bindings:
    tensors, paths = [], {}
    for node in gm.graph.nodes:
        for path, *_ in (node.meta.get("nn_module_stack") or {}).values():
            paths.setdefault(str(path), None)
        if node.op == "call_module":
            paths.setdefault(str(node.target), None)
        elif node.op == "get_attr":
            target = str(node.target)
            held = _lookup(gm, target)
            if isinstance(held, Tensor) and _lookup(model, target) is held:
                tensors.append((target, held))
                paths.setdefault(target.rpartition(".")[0], None)
    modules = [(p, m) for p in paths if p and isinstance(m := _lookup(model, p), nn.Module)]
    settings = [
        (p, m, _settings(m))
        for p, m in modules
        if type(m).__module__.startswith("torch.nn.") or is_frozen_batch_norm(m)
    ]
    return _Bindings(tensors, modules, list(model.modules()), settings, hooks)


def _lookup(root: nn.Module, target: str) -> object:
    """``root``'s attribute at the dotted ``target``; None where it has none."""
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _not_followable(model: nn.Module, target: str, held: Tensor, live: object) -> str | None:
    """Why the flow cannot hold ``live`` in place of ``held`` at ``target`` (its module being the same); None if it can.

    It can when ``live`` is a tensor registered on that module (not a weight computed by a hook
    or a parametrization added since) like ``held``: same shape, dtype and device, usable by autograd.
    """
    kind = "parameter" if isinstance(held, nn.Parameter) else "buffer"
    owner_path, _, field = target.rpartition(".")
    owner = _lookup(model, owner_path) if owner_path else model
    if not isinstance(live, Tensor) or not any(s.get(field) is live for s in (owner._parameters, owner._buffers)):
        return (
            f"{kind} {target!r} of the model was removed or is now computed on every call (pruning or a "
            "parametrization added)"
        )
    if (live.shape, live.dtype, live.device) != (held.shape, held.dtype, held.device):
        return (
            f"{kind} {target!r} of the model was replaced by one of shape {tuple(live.shape)}, {live.dtype} on "
            f"{live.device} (it was {tuple(held.shape)}, {held.dtype} on {held.device})"
        )
    if live.is_inference():
        return f"{kind} {target!r} of the model was replaced by one made under torch.inference_mode()"
    return None


def _fingerprint(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[Σ t, Σ_k w_k t_k]`` with ``w_k = frac(k·φ)`` (φ the golden ratio: distinct weights spread
    over [0, 1)), so values that only move change it (NOTE [weight cache]): swapping two unequal
    values changes it by their difference times that of their weights. Row- and column-weighted
    sums missed any change that kept every row's and column's sum."""
    flat, sums = t.reshape(-1), []
    for start in range(0, flat.numel(), _CHUNK):  # in chunks: no full-size temporaries (VGG-16's fc is 100M)
        part = flat[start : start + _CHUNK].to(dtype)
        weights = torch.arange(start, start + part.numel(), dtype=dtype, device=t.device).mul_(_GOLDEN).frac_()
        sums.append(torch.stack([part.sum(), part @ weights]))
    return torch.stack(sums).sum(0)


_GOLDEN = (5**0.5 - 1) / 2
_CHUNK = 1 << 20


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Equal fingerprints (NaN equal to NaN, so a model with NaN weights does not recompute)."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def block_layers(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Node names of ``layers="blocks"``: block outputs at stage boundaries, shallow → deep.

    A block output is the output of a composite module (one with child modules; its last node in
    the graph) that is a stage boundary (articulation node): ``layer1.0`` in a ResNet, ``features.3``
    in a MobileNet, ``features.denseblock1`` and ``features.transition1`` in a DenseNet,
    ``inception3a`` in GoogLeNet, ``bam1`` after a ResNet stage. Modules inside a multi-branch block
    (its convolutions, an SE or CBAM gate) never end at a stage boundary, so they are not blocks.
    Pooling ops at stage boundaries (VGG's and AlexNet's max-pools, a ResNet's stem max-pool) close
    a block too, and the last layer N is always included. Wrapping a model in another module does
    not change its blocks.
    """
    plan: Plan = gm.meta["naflow.plan"]
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(model.named_modules())
    boundaries = {stage.output for stage in plan.stages} & set(plan.layers)
    last_of: dict[str, str] = {}
    for node in gm.graph.nodes:
        for qualname, _ in (node.meta.get("nn_module_stack") or {}).values():
            last_of[qualname] = node.name
    chosen = {plan.last} | {n for n in boundaries if nodes[n].target in _POOLS}
    for qualname, node in last_of.items():
        module = modules.get(qualname)
        if qualname and module is not None and next(module.children(), None) is not None and node in boundaries:
            chosen.add(node)
    return [n for n in plan.layers if n in chosen]


def _module_layers(gm: fx.GraphModule, qualname: str | None, names: list[str]) -> list[str]:
    """The layers a module of the model stands for, as pytorch-grad-cam's ``target_layers`` do.

    A leaf module (a conv, a ReLU) is each node that calls it (a ReLU module called three times in
    a bottleneck is three layers). A composite module (a residual block, a stage) is its output:
    the last node inside it that is read outside it. ``[]`` when that is not an explainable layer.
    """
    if not qualname:  # not a submodule, or the whole model (its output is not a feature map)
        return []
    plan: Plan = gm.meta["naflow.plan"]
    layer_name = dict(zip(plan.layers, names, strict=True))
    leaf = [
        layer_name[n.name] for n in gm.graph.nodes if n.name in layer_name and n.meta.get("naflow.module") == qualname
    ]
    if leaf:
        return leaf
    out = _module_output(gm, qualname)
    return [layer_name[out.name]] if out is not None and out.name in layer_name else []


def _module_output(gm: fx.GraphModule, qualname: str) -> fx.Node | None:
    """The node a module's forward returns: the last node inside it (``nn_module_stack``) read outside it."""
    inside = {
        n.name for n in gm.graph.nodes if any(q == qualname for q, _ in (n.meta.get("nn_module_stack") or {}).values())
    }
    read_outside = [n for n in gm.graph.nodes if n.name in inside and any(u.name not in inside for u in n.users)]
    return read_outside[-1] if read_outside else None


def _resolve_last_layer(gm: fx.GraphModule, model: nn.Module, last_layer: object) -> str | None:
    """``last_layer`` as a layer name: a layer name as is, a block module or its name as its output."""
    if last_layer is None:
        return None
    if isinstance(last_layer, nn.Module):
        qualname = next((q for q, m in model.named_modules() if m is last_layer), None)
        if not qualname:
            what = "the model itself" if qualname == "" else "not a submodule of the model"
            raise InputError(
                f"last_layer is a {type(last_layer).__name__} that is {what}: pass one of the model's modules "
                "(e.g. model.layer4) or a layer name"
            )
    elif isinstance(last_layer, str):
        qualname = last_layer
    else:
        raise InputTypeError(
            f"last_layer must be a layer name or a module of the model, got {type(last_layer).__name__}"
        )
    names = {n.meta.get("naflow.name", n.name) for n in gm.graph.nodes}
    if isinstance(last_layer, str) and qualname in names:
        return qualname
    # a module (even a leaf one called several times, such as a block's ReLU) stands for its output
    out = _module_output(gm, qualname) if qualname in dict(model.named_modules()) else None
    if out is not None and tensor_meta(out) is None:  # a tuple (a max pool with its indices): its first part
        out = next((u for u in out.users if u.target is operator.getitem and u.args[1] == 0), out)
    return qualname if out is None else out.meta.get("naflow.name", out.name)  # partition names what is wrong


def _select_layers(gm: fx.GraphModule, model: nn.Module, layers: object) -> list[str]:
    plan: Plan = gm.meta["naflow.plan"]
    nodes = {n.name: n for n in gm.graph.nodes}
    names = [nodes[n].meta.get("naflow.name", n) for n in plan.layers]
    if isinstance(layers, str) and layers in LAYER_SELECTIONS:
        if layers == "all":
            selected = names
        elif layers == "conv":
            selected = [names[i] for i, n in enumerate(plan.layers) if nodes[n].target is torch.conv2d]
        else:
            selected = [nodes[n].meta.get("naflow.name", n) for n in block_layers(gm, model)]
        if not selected:
            raise InputError(f"layers={layers!r} selects no layer of this model; pass 'all' or layer names")
        return selected
    qualname = {id(m): q for q, m in model.named_modules()}
    if isinstance(layers, str):
        known = layers in names or layers in set(qualname.values())
        if not known and not _deeper_hint(gm, layers, qualname):  # a layer after N: named as such below
            raise InputError(
                f"layers={layers!r} is neither one of {LAYER_SELECTIONS} nor a layer or module name"
                f"{did_you_mean(layers, [*LAYER_SELECTIONS, *_selectable(names, qualname)])}. "
                f"Available layers: {elided(names)}"
            )
        layers = [layers]
    if isinstance(layers, (nn.Module,)):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (bytes, bytearray)):
        raise InputTypeError(
            f"layers must be 'all', 'conv', 'blocks' or a list of layer names / modules, got {layers!r}"
        )
    chosen: list[str] = []
    for item in layers:
        if isinstance(item, nn.Module):
            match = _module_layers(gm, qualname.get(id(item)), names)
        elif str(item) in names:
            match = [str(item)]
        else:  # the qualified name of a block, as in model.named_modules()
            match = _module_layers(gm, str(item), names) if str(item) in set(qualname.values()) else []
        if not match:
            if isinstance(item, nn.Module) and id(item) not in qualname:
                what = f"a {type(item).__name__} that is not a module of the model"
            elif isinstance(item, nn.Module):
                where = qualname[id(item)]
                what = "the model itself" if not where else f"module {where!r} ({type(item).__name__})"
            else:
                what = f"layer {item!r}"
            deeper = _deeper_hint(gm, item, qualname)
            close = "" if deeper or isinstance(item, nn.Module) else did_you_mean(item, _selectable(names, qualname))
            raise InputError(
                f"{what} is not an explainable layer between the input and the last layer{deeper}{close}. "
                f"Available: {elided(names)}; a module's name (e.g. a block's) selects the layers it holds"
            )
        chosen.extend(m for m in match if m not in chosen)
    if not chosen:
        example = f" such as {names[-1]!r}" if names else ""
        raise InputError(f"layers is empty: pass 'all', 'conv', 'blocks' or at least one layer name{example}")
    return [n for n in names if n in chosen]  # shallow → deep


def _selectable(names: list[str], qualname: dict[int, str]) -> list[str]:
    """The layer names and the names of the modules that hold one of them: what ``layers=`` accepts."""
    held = {n.rsplit(".", k)[0] for n in names for k in range(n.count(".") + 1)}  # each name and its dotted prefixes
    return [*names, *sorted({q for q in qualname.values() if q in held})]


def _deeper_hint(gm: fx.GraphModule, item: object, qualname: dict[int, str]) -> str:
    """``" (it comes after the last layer 'N': ...)"`` when ``item`` names a node or module after N, else ``""``."""
    plan: Plan = gm.meta["naflow.plan"]
    nodes = list(gm.graph.nodes)
    last = next(i for i, n in enumerate(nodes) if n.name == plan.last)
    name = qualname.get(id(item)) if isinstance(item, nn.Module) else str(item)
    if not name:
        return ""
    after = [
        n
        for n in nodes[last + 1 :]
        if n.meta.get("naflow.name", n.name) == name
        or any(q == name or q.startswith(name + ".") for q, _ in (n.meta.get("nn_module_stack") or {}).values())
    ]
    if not after:
        return ""
    n_name = nodes[last].meta.get("naflow.name", plan.last)
    maps = [m for n in after if (m := tensor_meta(n)) is not None and len(m.shape) == 4 and m.shape[2] * m.shape[3] > 1]
    if maps:
        return f" (it comes after the last layer {n_name!r}: pass a deeper last_layer to explain it)"
    return f" (it comes after the last layer {n_name!r}, and only feature maps up to there are explained)"


def _warn_non_finite(maps: dict[str, Tensor], layers: Sequence[str], dtype: torch.dtype, method: str = "") -> None:
    """A :class:`NumericalWarning` naming the deepest layer whose map has NaN/Inf (one device sync);
    ``method`` names a CAM (its maps come from the model's own activations and gradients)."""
    bad = non_finite_layers(maps, list(layers))
    if not bad:
        return
    if method:  # each CAM map is its own layer's: list them
        head = f"the {method} maps of {len(bad)} of {len(layers)} layers contain NaN or Inf ({_listed(bad)}): "
        why = (
            f"the model's activations or their gradients there overflow {dtype} (e.g. a channel at ±Inf that a "
            "later ReLU hides from the output). Explain the model and input in float64 (model.double(), x.double())."
        )
    else:  # a flow's maps are chained: NaN at one layer reaches all below it
        head = f"the maps of {len(bad)} of {len(layers)} layers contain NaN or Inf, from {bad[-1]!r} down: "
        why = (
            f"the back-propagated feature maps (or the model's own activations) grew beyond the range of {dtype} "
            "(flow.bpfm and flow.format_diagnostics() show where). Explain the model and input in float64 "
            "(model.double(), x.double()), or try a larger damping (e.g. damping=3e-2)."
        )
    warn_at_caller(NumericalWarning(head + why))


def _warn_unconverged(records: Sequence[SolveRecord], config: SolverConfig, dtype: torch.dtype) -> None:
    """A :class:`NumericalWarning` when least-squares solves stopped at ``max_iter`` before ``tol``
    (as scikit-learn's ConvergenceWarning): their maps, and every map below them, are approximate.
    The text names layers, not residuals, so that a loop over images warns once per place."""
    solves = [r for r in records if r.method != "closed form"]
    failed = [r.layer for r in solves if not r.converged]
    if not failed:
        return
    floor = 1e-13 if dtype == torch.float64 else 1e-6
    advice = f"pass a larger max_iter to compile_naflow (e.g. max_iter={4 * config.max_iter})"
    if config.tol < floor:  # there more iterations may not help: the solves stagnate in rounding
        advice += f", and a tol of {floor:g} or more: {dtype} solves often stagnate short of a smaller one"
        advice += " (or explain the model and input in float64: model.double(), x.double())" * (dtype != torch.float64)
    warn_at_caller(
        NumericalWarning(
            f"{len(failed)} of {len(solves)} least-squares solves stopped at max_iter={config.max_iter} before their "
            f"relative normal residual reached tol={config.tol:g}, at {_listed(failed)}: those layers' maps, and the "
            f"maps of the layers below them, are approximate (flow.format_diagnostics() shows each solve's residual); "
            f"{advice}"
        )
    )


def _warn_all_zero(maps: dict[str, Tensor], layers: Sequence[str], no_gradient: Tensor | None, last: str) -> None:
    """A :class:`ZeroMapsWarning` naming the samples whose every map is zero everywhere (one device sync)."""
    if not layers:
        return
    positive = torch.stack([maps[n].flatten(1).ne(0).any(1) for n in layers]).any(0)
    zero = (~positive).nonzero()[:, 0].tolist()
    if not zero:
        return
    if no_gradient is not None and bool(no_gradient[zero].all()):
        why = (
            f"the score does not depend on the last layer {last!r} (its gradient there is zero): check "
            "the target, e.g. a score multiplied by 0, or a mask that selects no pixel"
        )
    else:
        why = (
            "Σ_c Λ·BPFM is nowhere positive at any layer, e.g. because the score is negative (a logit or "
            "similarity below zero) or the last layer's activation is zero"
        )
    warn_at_caller(ZeroMapsWarning(f"every map of sample(s) {zero} is zero: {why}"))


def compile_naflow(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    *,
    solver: str = "auto",
    damping: float = 1e-2,
    tol: float = 1e-4,
    max_iter: int = 500,
    last_layer: str | nn.Module | None = None,
    layers: str | nn.Module | Iterable[str | nn.Module] = "all",
    reduction: str = "sum_relu",
    fallback: str | None = None,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict | None = None,
) -> NAFlow:
    """Compile ``model`` into a NAFlow explainer (trace → passes → generated inverse network).

    Args:
        model: a CNN; it is never modified (parameters, buffers, ``training`` flag and hooks stay).
            The flow always uses eval semantics (BatchNorm running stats, no dropout).
        example_input: a batch the model accepts (or its shape), for shapes and the device.
        solver: ``"auto"``, ``"dense"`` or ``"iterative"`` (see :class:`~naflow_fx.solvers.SolverConfig`).
        damping: Tikhonov λ relative to σ_max(J) for solved layers; ``0.0`` is the exact min-norm
            pseudo-inverse. The default 1e-2 is discussed in ``docs/naflow.md``.
        tol, max_iter: CGLS stopping rule.
        last_layer: the last feature layer N (default: the deepest 4-D layer every path passes
            through before global pooling / flatten): a layer name, or a module or module name
            (a block such as ``model.layer3`` stands for its output).
        layers: which layers get maps (always ordered shallow → deep, named as in ``nf.layers``):
            ``"all"`` (every 4-D feature node between the input and N), ``"conv"`` (outputs of
            convolutions), ``"blocks"`` (block outputs at stage boundaries: ``layer1.0``'s output in a
            ResNet; see :func:`block_layers`), or a list of layer names, module names and/or
            modules (or just one): a leaf module (a conv) gives each node that calls it, a
            composite one (a block, as in pytorch-grad-cam's ``target_layers=[model.layer4[-1]]``)
            its output.
        reduction: ``"sum_relu"`` (paper Eq. 2, ReLU of the channel sum) or ``"relu_sum"``
            (the authors' code, sum of ReLUs).
        fallback: ``None`` (unsupported ops raise) or ``"linearize"`` (invert them through their
            linearisation; reported in ``flow.diagnostics``).
        leaf_modules, concrete_args: passed to the tracer (see :func:`naflow_fx.tracing.trace`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from naflow_fx import compile_naflow
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
        >>> nf = compile_naflow(net, torch.randn(1, 3, 16, 16))
        >>> nf.layers
        ['0', '1', '2', '3', '4']
        >>> flow = nf(torch.randn(2, 3, 16, 16))
        >>> flow.maps["4"].shape, flow.upsample().shape
        (torch.Size([2, 8, 8]), torch.Size([2, 5, 16, 16]))
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(not_a_module(model))
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    config = SolverConfig(solver=solver, damping=damping, tol=tol, max_iter=max_iter)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        raise UnsupportedModelError(
            f"the model computes in {dtype}, whose {torch.finfo(dtype).resolution:g} resolution is too coarse for "
            "NAFlow's least-squares solves (they stop at a relative residual of 1e-4: in float16 the maps overflow, "
            "in bfloat16 no solve converges); explain a float32 copy: "
            "compile_naflow(copy.deepcopy(model).float(), x.float())"
        )
    _check_weights_usable(model)
    if isinstance(example_input, Tensor) and example_input.device != device:
        raise InputError(f"example_input is on {example_input.device} but the model is on {device}")
    example = _example_tensor(example_input, device, dtype)

    # One compile at a time (NOTE [threads]); NOTE [caller's modes]: no inference-mode constants or computed weights
    with _COMPILING, exact_mode(device):
        gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, example=example)
        gm = passes.check_scope(gm)
        gm = passes.normalize(gm)
        hooks = warn_forward_hooks(model, gm)
        with leaves_in_eval(gm):
            gm = passes.propagate_shapes(gm, example)
            gm = passes.partition_stages(gm, _resolve_last_layer(gm, model, last_layer))
            gm = passes.assign_inverse_rules(gm, fallback)
            chosen = _select_layers(gm, model, layers)
            flow = NAFlow(gm, chosen, config, reduction, example)
    options = dict(
        solver=solver, damping=damping, tol=tol, max_iter=max_iter, last_layer=flow.last_layer, layers=flow.layers
    )
    options.update(reduction=reduction, fallback=fallback, leaf_modules=leaf_modules)
    flow._recipe = (model, tuple(example.shape), options | ({"concrete_args": concrete_args} if concrete_args else {}))
    flow._bindings = _bindings(gm, model, hooks)
    return flow


def _check_weights_usable(model: nn.Module) -> None:
    """Refuse weights autograd cannot use, and quantization modules (:func:`_quantization_refusal`)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    if any(nn.parameter.is_lazy(t) for _, t in named):
        raise InputError(
            "the model has lazy layers (nn.LazyConv2d, nn.LazyLinear, ...) whose weights are not made yet: run it "
            "once on a batch, model(x), before compile_naflow"
        )
    meta = [name for name, t in named if t.is_meta]
    if meta:
        raise InputError(
            f"the model's weights are on the meta device ({_listed(meta)}): they hold no values, as when a model is "
            "built under torch.device('meta'); load them first, e.g. model.load_state_dict(state_dict, assign=True), "
            "or model.to_empty(device='cpu') and then load_state_dict"
        )
    if any(t.is_inference() for _, t in named):
        raise InputError(
            "the model's weights were made under torch.inference_mode() (it was built or loaded inside it), and "
            "autograd, which NAFlow needs for its coefficients, cannot use such tensors: build or load the model "
            "outside inference_mode (torch.no_grad() is fine there)"
        )
    for name, mod in model.named_modules():
        refusal = _quantization_refusal(mod)
        if refusal:
            raise UnsupportedModelError(f"module {name!r} ({type(mod).__name__}) {refusal}")


def _quantization_refusal(mod: nn.Module) -> str:
    """Why a quantization module cannot be explained, and what to do; ``""`` for any other module.

    Observers would record statistics into the model on every run. Quantized modules (static,
    dynamic, reference) compute in integers that autograd cannot differentiate, so every Λ, and
    every map, would be zero. QAT modules and fake-quantizers round weights and activations, which
    no layer's inverse undoes, whatever their enabled flags say. Fused float modules
    (``torch.ao.nn.intrinsic.ConvReLU2d`` and the like) are plain layers and explain as such.
    """
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    where = type(mod).__module__
    if type(mod).__name__ in ("FloatFunctional", "FXFloatFunctional"):  # float arithmetic of quantizable models
        return ""
    if where.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")):
        return (
            f"is a quantized layer ({where}), which computes in integers that have no gradient, so every map "
            "would be zero: explain the float model, before quantize_dynamic / convert / convert_fx"
        )
    if where.startswith(("torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat")) or isinstance(mod, FakeQuantizeBase):
        return (
            "fake-quantizes weights or activations (quantization-aware training), which no inverse undoes: explain "
            "the float model, before prepare_qat, with the trained float weights loaded into it"
        )
    if isinstance(mod, ObserverBase):
        return (
            "is a quantization observer, which records statistics into the model on every forward: explain the "
            "float model, before prepare / prepare_fx"
        )
    return ""


def _listed(names: list[str], most: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``: the first few of ``names``, quoted."""
    shown = ", ".join(map(repr, names[:most]))
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _recompile(model: nn.Module, shape: tuple, options: dict) -> NAFlow:
    return compile_naflow(model, shape, **options)

"""Symbolic tracing with a leaf-module policy, and readable errors for untraceable models."""

from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import os
import re
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.modules.module as module_hooks
from torch import nn

from .errors import ConfigError, InputTypeError, UnsupportedModelError, warn_at_caller

__all__ = ["NAFlowTracer", "ShapeTracer", "not_a_module", "trace", "warn_forward_hooks"]

_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")  # with the separator: not torchvision/
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_EVERY_MODULE = "every module (process-wide, torch.nn.modules.module.register_module_forward_hook or _pre_hook)"
_HOOK_DICTS = (
    *_FORWARD_HOOKS,
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",  # a full backward hook would wrap a proxy output: torch warns it will not be called
    "_backward_pre_hooks",
)


def warn_forward_hooks(
    model: nn.Module, gm: fx.GraphModule, known: frozenset[tuple[str, int]] | None = None
) -> frozenset[tuple[str, int]]:
    """Warn that forward hooks of modules the graph does not call are not run (docs/naflow.md, decision 3).

    Modules left as ``call_module`` nodes (leaf modules such as an LSTM) are called, hooks and all.
    Hooks that compute a weight (the older weight and spectral norms, pruning masks) are not
    counted: the graph computes those weights itself (``normalize``).

    Returns the hooks found, as (module name, hook id) pairs. Given ``known`` (those found
    before), only hooks added since are warned about: a flow checks this on every call, so a hook
    registered after ``compile_naflow`` is named once, like one registered before.
    """
    from .passes.normalize import computes_weights

    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    hooks = [
        (name or type(model).__name__, key)
        for name, m in model.named_modules()
        if name not in called
        for d in _FORWARD_HOOKS
        for key, h in tuple(getattr(m, d, {}).items())  # a copy: another thread may add or remove one
        if not computes_weights(h)
    ]
    # process-wide hooks (register_module_forward_hook / _pre_hook) run on every module's call; torch's
    # own (FlopCounterMode's module tracker, profilers) only read
    hooks += [
        (_EVERY_MODULE, key)
        for d in _FORWARD_HOOKS
        for key, h in tuple(getattr(module_hooks, "_global" + d, {}).items())
        if not str(getattr(h, "__module__", None) or "").startswith("torch.")
    ]
    hooked = list(dict.fromkeys(name for name, key in hooks if known is None or (name, key) not in known))
    if hooked:
        more = f" and {len(hooked) - 3} more modules" if len(hooked) > 3 else ""
        since = "" if known is None else " added since compile_naflow"
        where = ", ".join(name if name == _EVERY_MODULE else repr(name) for name in hooked[:3])
        warn_at_caller(
            f"the model has forward hooks{since} on {where}{more}. The flow explains the "
            "traced graph, which does not run them: a hook that only reads (a feature extractor, pytorch-grad-cam) "
            "is harmless, but if one changes an output, what is explained differs from model(x). Move such a change "
            "into the module's forward to explain it.",
            UserWarning,
        )
    return frozenset(hooks)


def is_frozen_batch_norm(m: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (its detection backbones), an eval BatchNorm2d held in
    buffers: kept a leaf and lowered as a batch norm, it is one layer, where tracing into it gave a
    multiply and an add, each reported as a layer. Its exact class only: a subclass may differ."""
    kind = type(m)
    return kind.__name__ == "FrozenBatchNorm2d" and kind.__module__ == "torchvision.ops.misc"


class NAFlowTracer(fx.Tracer):
    """A ``torch.fx`` tracer whose leaves are ``torch.nn`` modules plus the user's choice.

    ``leaf_modules`` holds module types or qualified names that are kept as one
    ``call_module`` node instead of being traced through.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        if isinstance(leaf_modules, (type, str)):
            leaf_modules = [leaf_modules]  # one type or name, as a list of one
        if not isinstance(leaf_modules, Iterable):
            raise InputTypeError(
                f"leaf_modules must be a list of module types or qualified names, got {type(leaf_modules).__name__}"
            )
        leaves = list(leaf_modules)
        odd = [t for t in leaves if not isinstance(t, (type, str))]
        if odd:
            raise InputTypeError(f"leaf_modules holds module types or qualified names, not {odd[0]!r}")
        self._leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {t for t in leaves if isinstance(t, str)}
        self.attr_values: dict[fx.Node, object] = {}  # get_attr node → the parameter or buffer it reads

    # NOTE [threads] (naflow_fx/api.py): the patches fx installs for the whole process while it
    # traces call this tracer's ``call_module`` and ``getattr``; in any thread but the tracing one
    # both give the plain call and value.
    _thread: int | None = None

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._thread = threading.get_ident()
        try:
            return super().trace(root, concrete_args)
        finally:
            self._thread = None

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        if getattr(m, "_compiled_call_impl", None) is not None:
            # nn.Module.compile() in place on a sub-module: its call runs dynamo, which fx cannot trace
            # (the root's is never called). Its uncompiled call computes the same, hooks and all.
            forward = m._call_impl
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self._thread:
            return attr_val
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(out, fx.Proxy):
            self.attr_values[out.node] = attr_val
        return out

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether ``leaf_modules`` names ``m`` (by qualified name or type)."""
        return module_qualified_name in self._leaf_names or (bool(self._leaf_types) and isinstance(m, self._leaf_types))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.is_user_leaf(m, module_qualified_name) or is_frozen_batch_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """fx's placeholders for ``forward``'s arguments, with ``*args`` and ``**kwargs`` bound as ``model(x)``
        binds them: to ``()`` and to the ``concrete_args`` that name no other argument (usually ``{}``).

        fx would make each a placeholder, that is a proxy for a tuple or dict of unknown contents:
        ``kwargs.get("mask")`` would then be a proxy, not None, and the graph would need three inputs.
        """
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        code = getattr(inspect.unwrap(root_fn), "__code__", None)
        if code is None:  # not a Python function: fx's placeholders as they are
            return fn, args
        flags = [f for f in (inspect.CO_VARARGS, inspect.CO_VARKEYWORDS) if code.co_flags & f]
        pytree = getattr(fx.graph, "_PyTreeCodeGen", ())  # a private class: () if a torch renames it
        if not is_module or not flags or (pytree and isinstance(self.graph._codegen, pytree)):
            return fn, args
        start = len(args) - len(flags)
        if not all(isinstance(a, fx.Proxy) and a.node.op == "placeholder" for a in args[start:]):
            return fn, args
        named = set(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
        extra = {k: v for k, v in (concrete_args or {}).items() if k not in named}
        for i, flag in enumerate(flags, start):
            node = args[i].node
            args[i] = () if flag == inspect.CO_VARARGS else extra
            getattr(self, "values", {}).pop(node, None)
            self.graph.erase_node(node)
        return fn, args


# NOTE [fixed shapes]
# torch.fx records every operation on a Proxy but cannot give Python a value, so `if h % s`,
# `math.ceil(h / s)` or `for t in x.chunk(2)` stop a trace (timm's dynamic "same" padding, size
# checks, FPN-style resizes). When plain tracing fails and compile_naflow has an example batch,
# ShapeTracer traces again while it runs the example through each op as the op is recorded. The
# sizes of every tensor except its batch size are then plain ints: those lines run as they would on
# the example, and what they compute (pad widths, target sizes) becomes a constant of the graph.
# The batch size stays traced, so `x.view(x.size(0), -1)` holds for any batch; a branch on tensor
# values still fails, as it must. The graph is right for the example's (C, H, W) only, so NAFlow
# refuses inputs of another size with an InputError naming the line that needed the shapes.


class _Proxy(fx.Proxy):
    """fx's proxy, except that ``.requires_grad`` is a Python bool, as in inference, where the
    model is explained: False for a computed tensor and the input, a parameter's own flag for a
    parameter. Code that only saves memory in training branches on it (torchvision's DenseNet
    with ``memory_efficient=True`` checkpoints when an input requires grad), and fx cannot branch
    on a proxy."""

    def __getattr__(self, k: str):
        if k == "requires_grad":
            return bool(getattr(getattr(self.tracer, "attr_values", {}).get(self.node), k, False))
        return super().__getattr__(k)


class _ShapeProxy(_Proxy):
    """A proxy whose ``.shape`` is the example's sizes, the batch size (dim 0) still traced."""

    def __getattr__(self, k: str):
        if k in ("shape", "ndim"):
            value = self.tracer.values.get(self.node)
            if isinstance(value, torch.Tensor):
                return value.dim() if k == "ndim" else self.tracer.sizes(self, value)
        return super().__getattr__(k)


class ShapeTracer(NAFlowTracer):
    """A tracer that runs the example through every op as it records it (NOTE [fixed shapes]).

    ``x.shape``, ``x.size(d)`` and ``x.dim()`` are the example's Python ints, except the batch
    size, so a branch or an argument computed from the shape is resolved while tracing, as the
    example would run. The graph is then valid for inputs of the example's size only.
    """

    def __init__(
        self, example: torch.Tensor, leaf_modules: Iterable[type | str] = (), concrete_args: dict | None = None
    ) -> None:
        super().__init__(leaf_modules)
        self.example = example
        self.concrete = dict(concrete_args or {})
        self.values: dict[fx.Node, object] = {}
        self._computing = False  # running the example through an op: fx's patches step aside

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def sizes(self, proxy: fx.Proxy, value: torch.Tensor) -> tuple:
        if value.dim() == 0:
            return torch.Size([])
        return (fx.Proxy.__getattr__(proxy, "shape")[0], *value.shape[1:])

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_method" and target in ("size", "dim") and isinstance(args[0], fx.Proxy):
            value = self.values.get(args[0].node)
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(value, torch.Tensor) and (target == "dim" or dim is None):
                return value.dim() if target == "dim" else self.sizes(args[0], value)
            if isinstance(value, torch.Tensor) and isinstance(dim, int) and dim % max(value.dim(), 1) != 0:
                return value.shape[dim]
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.values[node] = self._run(node)
        return node

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        return attr_val if self._computing else super().getattr(attr, attr_val, parameter_proxy_cache)

    def iter(self, obj: fx.Proxy):
        value = self.values.get(obj.node)
        if isinstance(value, (tuple, list)):  # a tuple of tensors (``chunk``, ``split``) in a loop
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def _run(self, node: fx.Node) -> object:
        if node.op == "placeholder":
            if not any(n.op == "placeholder" for n in self.values):
                return self.example.clone()
            name = _concrete_name(node, self.concrete)
            if name is not None:
                return self.concrete[name]
            return node.args[0] if node.args else None
        if node.op == "output":
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        before, self._computing = self._computing, True
        try:
            with torch.no_grad():
                if node.op == "get_attr":
                    return operator.attrgetter(str(node.target))(self.root)
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return self.root.get_submodule(node.target)(*args, **kwargs)
        finally:
            self._computing = before


def _concrete_name(node: fx.Node, concrete_args: dict) -> str | None:
    """The ``concrete_args`` key of a placeholder (fx names the placeholder of ``flag`` "flag_1")."""
    for name in (str(node.target), re.sub(r"_[0-9]+$", "", str(node.target))):
        if name in concrete_args:
            return name
    return None


_SIMPLE = (bool, int, float, str)


def _forward_params(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward``; None when Python cannot tell them (a builtin, a C extension)."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _defaults(model: nn.Module) -> dict:
    """The default of every argument of ``model.forward`` after the images that is None or a number,
    bool or str: a flow calls ``model(x)``, so those are the values the graph must be traced for."""
    params = (_forward_params(model) or [])[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and (p.default is None or type(p.default) in _SIMPLE)}


def _check_concrete_args(model: nn.Module, concrete_args: object) -> None:
    """``concrete_args`` must map names of ``forward``'s arguments after the images to values."""
    if concrete_args is None:
        return
    if not isinstance(concrete_args, dict):
        raise InputTypeError(
            f"concrete_args must be a dict of forward's arguments to fix, e.g. {{'flag': True}}, got "
            f"{type(concrete_args).__name__}"
        )
    params = _forward_params(model)
    if params is None:
        return
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return  # **kwargs: any name may be meant
    name = type(model).__name__
    others = [p.name for p in params[1:] if p.kind != inspect.Parameter.VAR_POSITIONAL]
    for key in concrete_args:
        if params and key == params[0].name:
            raise ConfigError(
                f"concrete_args fixes {key!r}, the images {name}.forward takes first; the flow passes those. "
                f"Fix only the arguments after them ({', '.join(others) or 'it has none'})"
            )
        if key not in others:
            raise ConfigError(
                f"concrete_args names {key!r}, which is not an argument of {name}.forward; its arguments after the "
                f"images are: {', '.join(others) or 'none'}"
            )


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _wrap_hint(call: str) -> str:
    return (
        "class Explained(torch.nn.Module):\n    def __init__(self, model): super().__init__(); self.model = model\n"
        f"    def forward(self, x): return self.model({call})\nthen compile_naflow(Explained(model), x)"
    )


def _check_signature(model: nn.Module, concrete_args: dict | None) -> None:
    """``forward`` must take the images first, by position, and need nothing else a flow does not give.

    A flow calls ``model(x)``: every argument after the images needs a default or a value in
    ``concrete_args``; ``*args`` and ``**kwargs`` after them are bound empty.
    """
    name = type(model).__name__
    if type(model).forward is nn.Module.forward:
        raise UnsupportedModelError(f"{name} defines no forward: pass the module that computes the model's output")
    params = _forward_params(model)
    if params is None:
        return
    if not params:
        raise UnsupportedModelError(
            f"{name}.forward takes no argument, but naflow_fx explains a model of one image tensor: its forward "
            "must take the images as its first argument"
        )
    first = params[0]
    if first.kind not in _POSITIONAL:
        if first.kind == inspect.Parameter.VAR_POSITIONAL:
            how, call, note = f"as *{first.name}", "x", ""
        elif first.kind == inspect.Parameter.KEYWORD_ONLY:
            how, call, note = f"by keyword only ({first.name}=...)", f"{first.name}=x", ""
        else:
            how, call, note = f"as **{first.name}", "x=x", " (with the keyword it reads)"
        raise UnsupportedModelError(
            f"{name}.forward takes its inputs {how}, but naflow_fx feeds forward one image tensor, by position. "
            f"Wrap the model in a module whose forward takes one image tensor{note}:\n{_wrap_hint(call)}"
        )
    given = concrete_args or {}
    missing = [p.name for p in params[1:] if p.kind not in _VARIADIC and p.default is p.empty and p.name not in given]
    if missing:
        values = ", ".join(f"{m!r}: value" for m in missing)
        them = "it" if len(missing) == 1 else "them"
        raise ConfigError(
            f"{name}.forward needs {', '.join(map(repr, missing))} after the images, with no default, but a flow "
            f"calls model(x) with the images alone: give {them} the value to explain the model at with "
            f"compile_naflow(..., concrete_args={{{values}}}), or wrap the model in a module whose forward takes "
            "only the image tensor"
        )


def _is_specialization_check(node: fx.Node) -> bool:
    """fx's check that a concrete argument has the value it was traced with."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") not in ("_assert", "_assert_is_none"):
        return False
    return any(isinstance(a, str) and "has been specialized to have value" in a for a in node.args)


def _bind_concrete(gm: fx.GraphModule, concrete_args: dict) -> None:
    """Put each concrete argument's value in place of its placeholder, and drop unused arguments.

    fx keeps a placeholder for a concrete argument, with its default value and an assertion that
    the value given is the one traced. The flow calls the graph with the images only, so the
    default would be passed and the assertion fail: the value is the one the graph was traced for.
    An argument with a default that the graph never reads is dropped too.
    """
    graph = gm.graph
    for node in [n for n in graph.nodes if _is_specialization_check(n)]:
        condition = node.args[0]
        graph.erase_node(node)
        if isinstance(condition, fx.Node) and condition.op != "placeholder" and not condition.users:
            graph.erase_node(condition)
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        key = _concrete_name(ph, concrete_args)
        value = concrete_args.get(key) if key is not None else None
        if key is not None and not isinstance(value, fx.Proxy) and value is not fx.PH:
            for user in list(ph.users):
                swap = lambda n, ph=ph, value=value: value if n is ph else n  # noqa: E731
                user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), swap)
        if not ph.users and (key is not None or ph.args):
            graph.erase_node(ph)
    gm.recompile()
    collectable(gm)


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The deepest traceback frame that is not inside torch or naflow_fx."""
    here = os.path.join(os.path.dirname(__file__), "")
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith((_TORCH_DIR, here))]
    return frames[-1] if frames else None


def _exported_types() -> tuple[type, ...]:
    """The module classes torch.export makes: ``ep.module()``'s and ``torch.export.unflatten``'s.

    Only from modules already imported (a model cannot be of a class never imported): importing
    them would load ``torch._dynamo``, 900 modules and a second of start-up, for every compile.
    """
    found = (
        getattr(sys.modules.get(where), what, None)
        for where, what in (
            ("torch.export._unlift", "_StatefulGraphModule"),
            ("torch.export.unflatten", "UnflattenedModule"),
        )
    )  # another torch may lack them: the marker below still finds ep.module()
    return tuple(t for t in found if isinstance(t, type))


def _is_exported(m: nn.Module) -> bool:
    """``ep.module()`` (a GraphModule of ATen ops carrying the export's range constraints) or an unflattened one."""
    types = _exported_types()
    if types and isinstance(m, types):
        return True
    return isinstance(m, fx.GraphModule) and hasattr(m, "range_constraints")


def _wrapper_fix(m: nn.Module, where: str) -> tuple[str, str, str | None] | None:
    """Why fx cannot trace through ``m``, the module to pass instead, and a Python expression for it
    (``where`` names ``m``); None for a plain module."""
    if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        why = f"{type(m).__name__} only runs its .module on several devices"
        return why, f"{where}.module", f"{where}.module"
    if isinstance(getattr(m, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        return "torch.compile wraps the module", f"the module you compiled ({where}._orig_mod)", f"{where}._orig_mod"
    if isinstance(m, torch.jit.ScriptModule):
        scripted = getattr(m, "original_name", None)
        what = "the nn.Module before torch.jit.script/trace"
        if isinstance(scripted, str) and scripted != type(m).__name__:
            what += f" (the {scripted} it was made from)"
        return "TorchScript modules have no Python forward to trace", what, None
    if _is_exported(m):
        why = "torch.export's modules (ep.module(), unflatten) run a graph of ATen ops, not the model's layers"
        return why, "the original nn.Module you gave torch.export.export", None
    return None


def _refuse_wrapper(model: nn.Module, leaves: NAFlowTracer | None = None) -> None:
    """Refuse wrappers fx cannot see through (data parallel, ``torch.compile``, TorchScript, torch.export),
    at the root or anywhere inside, with the module to pass instead.

    Inside the model, fx would keep a TorchScript module as one opaque call and the flow would
    silently stop before it. A sub-module the user made a leaf (``leaves.is_user_leaf``) is opaque
    by request: it and what it holds are not checked.
    """
    name = type(model).__name__
    fix = _wrapper_fix(model, "model")
    if fix is not None:
        raise UnsupportedModelError(f"torch.fx cannot trace {name}: {fix[0]}: pass {fix[1]}")
    opaque: tuple[str, ...] = ()
    for qualname, m in model.named_modules():
        if not qualname or qualname.startswith(opaque):
            continue
        if leaves is not None and leaves.is_user_leaf(m, qualname):
            opaque += (f"{qualname}.",)
            continue
        fix = _wrapper_fix(m, f"model.get_submodule({qualname!r})")
        if fix is not None:
            why, what, expr = fix
            raise UnsupportedModelError(
                f"torch.fx cannot trace {name}: its sub-module {qualname!r} ({type(m).__name__}) is opaque to fx: the "
                f"flow could explain at most the layers before it. {why}: put {what} in its place, e.g. "
                f"model.set_submodule({qualname!r}, {expr or 'original'}), and compile that. To keep it as one "
                f"opaque step on purpose instead, list it in leaf_modules=[{qualname!r}]"
            )


def not_a_module(model: object) -> str:
    """The message for a ``model`` that is not an ``nn.Module``, with what to pass for the usual mistakes."""
    message = f"compile_naflow expects a torch.nn.Module, got {type(model).__name__}"
    if type(model).__module__.startswith("torch.export"):  # an ExportedProgram
        return (
            f"{message}, torch.export's program of ATen ops, which has lost the model's layers: pass the original "
            "nn.Module you gave torch.export.export (not ep.module() either)"
        )
    if isinstance(model, type) and issubclass(model, nn.Module):
        return f"{message} (the class itself): pass an instance, {model.__name__}(...)"
    return message


def _where(exc: BaseException) -> str:
    """`` at file:line in fn(): `source` `` of the user's frame that raised ``exc``, or ``""``."""
    frame = _user_frame(exc.__traceback__)
    if frame is None:
        return ""
    line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f" at {frame.filename}:{frame.lineno} in {frame.name}(): `{line}`"


_STATE_DICTS = ("_parameters", "_buffers", "_modules")


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """Each module's attributes and its parameter, buffer and sub-module dicts, to put back after tracing."""
    state = []
    for m in model.modules():
        attrs = dict(vars(m))
        tables = {k: dict(attrs[k]) for k in _STATE_DICTS if isinstance(attrs.get(k), dict)}  # not TorchScript's
        state.append((m, attrs, tables))
    return state


def _buffer_values(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each buffer with a copy of its values (buffers are small: running statistics, counters)."""
    return [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]


def _restore(snapshot: list[tuple[nn.Module, dict, dict]], values: list = ()) -> None:
    """Give every module back exactly the attributes it had, and each buffer in ``values`` its values:
    NOTE [the model is not changed]."""
    for m, attrs, tables in snapshot:
        for d, saved in ((vars(m), attrs), *((attrs[k], v) for k, v in tables.items())):
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if k not in d or d[k] is not v:
                    d[k] = v
    with torch.no_grad():
        for buffer, saved in values:
            if buffer.shape == saved.shape and not torch.equal(buffer, saved):
                buffer.copy_(saved)


# NOTE [the model is not changed]
# Tracing runs the model's forward with the model as fx's root, and fx writes to that root: a tensor
# made in forward (`std = torch.tensor([...])`) is stored on it as `_tensor_constant0`, other
# constants as `_<Class>_constant_0` (Tracer.create_arg), and a forward that caches something on
# `self` stores a proxy. The GraphModule copies what its graph reads when it is built; then `trace`
# puts back every module's attributes, parameters, buffers and sub-modules as they were, so the
# graph keeps its own references and the user's model has nothing added, left or replaced. This
# is one level deep: a forward that appends to a list or dict it keeps on `self` leaves the
# appended values there, as calling the model would. fx runs a forward's in-place updates of its
# buffers (`self.calls.add_(1)`, a running mean) on the real tensors while tracing, so the buffers'
# values are put back too.


def _run_tracer(tracer: fx.Tracer, model: nn.Module, concrete_args: dict | None) -> fx.Graph:
    """``tracer.trace(model)`` in eval mode with the user's hooks detached; both restored after.

    NOTE [trace in eval mode]: Python branches on ``self.training`` (auxiliary heads, stochastic
    depth, functional dropout) are baked into the graph at trace time, so trace with every module
    in eval mode and give each module back its own flag afterwards. The flags are set directly:
    ``model.eval()`` would run a ``train()`` the model overrides, side effects and all (torch.export's
    modules refuse it). User hooks must not run on fx proxies while tracing either: detach them.
    """
    with _eval_without_hooks(model), warnings.catch_warnings():
        # a tensor in concrete_args: fx cannot add a check, and need not
        warnings.filterwarnings("ignore", message="Was not able to add assertion to guarantee correct input")
        # a process-wide full backward hook (not the model's: it is detached) sees proxies, not tensors
        warnings.filterwarnings("ignore", message="For backward hooks to be called, module output should be")
        return tracer.trace(model, concrete_args=concrete_args)


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict | None = None,
    example: torch.Tensor | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its parameters (the model is not changed).

    Every argument of ``forward`` after the images is traced as a constant: its entry in
    ``concrete_args``, else its default (None, a bool, a number or a string), since a flow calls
    ``model(x)``; its placeholder is removed. If symbolic tracing fails and an ``example`` batch
    is given, the model is traced again with the example's sizes fixed (:class:`ShapeTracer`,
    NOTE [fixed shapes]), which resolves Python branches and arguments computed from the input's
    shape. ``gm.meta["naflow.fixed_shape"]`` then holds the example's ``(C, H, W)`` and where the
    first trace failed.

    Nothing is added to or left on ``model`` (NOTE [the model is not changed]): the graph module
    holds the constants tracing made. ``*args`` and ``**kwargs`` of ``forward`` after the images
    are bound as ``model(x)`` binds them.

    Raises:
        UnsupportedModelError: fx cannot trace the model, or it holds a module fx cannot look
            inside (``torch.compile``, TorchScript, torch.export, data parallel), or its forward
            does not take the images first by position. The message names the offending line of the
            model's source or the sub-module, and the ways around it.
        ConfigError: an argument of ``forward`` after the images has no default and no value in
            ``concrete_args``, or ``concrete_args`` names something else.
        InputTypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(not_a_module(model))
    tracer: fx.Tracer = NAFlowTracer(leaf_modules)
    _refuse_wrapper(model, tracer)
    _check_concrete_args(model, concrete_args)
    _check_signature(model, concrete_args)
    state, values = _snapshot(model), _buffer_values(model)  # NOTE [the model is not changed]
    try:
        gm = _trace(model, tracer, leaf_modules, concrete_args, example, state)
        if example is not None:
            _restore(state, values)  # the model as the user has it, for the comparison
            _check_faithful(model, gm, example, concrete_args)
        return gm
    finally:
        _restore(state, values)


# NOTE [faithful trace]
# fx runs forward on proxies, not tensors, so code that asks what its input is takes another path
# while tracing: `isinstance(x, torch.Tensor)` is False for a proxy, and torchvision's v2 transforms
# (Normalize, Resize, ...) pass anything that is not a plain tensor through unchanged. The graph
# then silently lacks that step and every map explains another model. So after tracing, the graph
# and the model run once on the example, in eval mode, hooks detached, on copies of the buffers and
# of the input, from the same random state (the caller's, put back after each run), and must give
# the same output.


class _TrainingOff:
    """``training`` flags held False while any user is inside :meth:`held`, in any thread.

    Per module, the first user in saves its flag and the last one out gives it back, as
    :class:`_SharedSettings` does for torch's settings: two flows of one model in two threads
    would otherwise each restore the flag at its own end, putting a leaf back in training mode
    (updating the user's BatchNorm statistics) while the other still runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, list] = {}  # id(module) → [module, its flag before, users]

    @contextlib.contextmanager
    def held(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        modules = list(dict.fromkeys(modules))
        with self._lock:
            taken: list[nn.Module] = []
            try:
                for m in modules:
                    entry = self._held.get(id(m))
                    if entry is None:
                        flag = m.training
                        m.training = False  # a module may refuse it: then none is taken
                        self._held[id(m)] = [m, flag, 1]
                    else:
                        entry[2] += 1
                    taken.append(m)
            except BaseException:
                self._release(taken)
                raise
        try:
            yield
        finally:
            with self._lock:
                self._release(modules)

    def _release(self, modules: list[nn.Module]) -> None:
        """One user fewer of each of ``modules``; the last one out gives the flag back (lock held)."""
        for m in modules:
            entry = self._held.get(id(m))
            if entry is None:
                continue
            entry[2] -= 1
            if entry[2] == 0:
                del self._held[id(m)]
                m.training = entry[1]


_TRAINING_OFF = _TrainingOff()


def training_off(modules: Iterable[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """Each of ``modules`` in eval mode, then given back its own flag (shared across threads: :class:`_TrainingOff`).

    The flags are set directly (NOTE [trace in eval mode]): ``eval()`` would run a ``train()``
    the model overrides, side effects and all.
    """
    return _TRAINING_OFF.held(modules)


def collectable(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, whose generated source fx forgets once ``gm`` is collected.

    fx keeps the source of every forward it generates, in a process-wide cache and in
    ``linecache``, for the life of the process: 270 sources (0.8 MB) per compile of a
    MobileNet-V2, so recompiling in a notebook grew without bound. Call this after each
    ``GraphModule(...)`` and ``recompile()`` of the library's own modules.
    """
    key = getattr(getattr(type(gm).forward, "__code__", None), "co_filename", "")
    cache = getattr(getattr(fx.graph_module, "_loader", None), "eval_cache", None)
    _forget_stale_sources(cache)
    if isinstance(cache, dict) and key in cache:  # another torch may keep them elsewhere: then left alone
        weakref.finalize(gm, _STALE_SOURCES.append, key).atexit = False
    return gm


def hookless(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, whose call is its ``forward``: process-wide module hooks (``FlopCounterMode``'s, a
    global full backward hook, whose autograd.Function fails inside torch.func) then do not run on
    the library's own modules, also where torch calls them (``torch.func.functional_call``).

    fx makes a class per GraphModule, whose ``__call__`` (reset by every ``recompile()``, also a
    parent's) calls the class's ``_wrapped_call``, which fx keeps once set: that is replaced. On a
    torch that calls differently, the module is called as any module, hooks and all.
    """
    type(gm)._wrapped_call = staticmethod(_call_forward)
    return gm


def _call_forward(gm: fx.GraphModule, *args, **kwargs):
    return gm.forward(*args, **kwargs)


# Keys of collected modules' sources, forgotten at the next ``collectable`` call rather than in the
# finalizer: the garbage collector runs finalizers at any allocation, also while ``linecache.checkcache``
# (pdb, doctest, traceback) walks the cache's keys, which then fails on the one just removed.
_STALE_SOURCES: list[str] = []


def _forget_stale_sources(cache: dict | None) -> None:
    while True:
        try:  # another thread may take the last one between a test and a pop
            key = _STALE_SOURCES.pop()
        except IndexError:
            return
        if isinstance(cache, dict):
            cache.pop(key, None)
        linecache.cache.pop(key, None)


def random_state_kept(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The caller's random state of the CPU and of ``device``, given back afterwards: a run of a
    forward that draws random numbers (noise kept in eval) leaves the caller's stream as it was."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class _Setting:
    """One process-wide torch setting: its value, the value the library needs, and setting a value back."""

    def __init__(self, owner: object, attr: str, needed: object) -> None:
        self.owner, self.attr, self.needed = owner, attr, needed

    def get(self) -> object:
        return getattr(self.owner, self.attr)

    def set(self, value: object) -> None:
        if self.get() != value:
            setattr(self.owner, self.attr, value)


class _SharedSettings:
    """Process-wide torch settings held at the values the library needs while any user is inside
    :meth:`held`, in any thread: the first one in saves the caller's values and sets them all or
    none, the last one out gives them back. So one thread's flow that ends never changes them under
    another that still runs, and nested uses change nothing."""

    def __init__(self, settings: Callable[[], list[_Setting]]) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self.users = 0
        self._saved: list[tuple[_Setting, object]] = []

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self.users == 0:
                saved = [(s, s.get()) for s in self._settings()]
                try:
                    for setting, _ in saved:
                        setting.set(setting.needed)
                except BaseException:
                    _give_back(saved)
                    raise
                self._saved = saved
            self.users += 1
        try:
            yield
        finally:
            with self._lock:
                self.users -= 1
                if self.users == 0:
                    saved, self._saved = self._saved, []
                    _give_back(saved)


def _give_back(saved: list[tuple[_Setting, object]]) -> None:
    """Each setting to the caller's value, as many as can be (one that fails does not stop the others)."""
    for setting, value in saved:
        try:
            setting.set(value)
        except Exception:  # best effort: the others still go back
            continue


_FP32_LEAVES = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "conv"),
    ("mkldnn", "matmul"),
    ("mkldnn", "rnn"),
)


def _precision_settings() -> list[_Setting]:
    """Every float32 precision setting this torch build has, at full precision (torch ≥ 2.9)."""
    leaves = [getattr(getattr(torch.backends, b, None), op, None) for b, op in _FP32_LEAVES]
    return [_Setting(leaf, "fp32_precision", "ieee") for leaf in leaves if hasattr(leaf, "fp32_precision")]


_FULL_PRECISION = _SharedSettings(_precision_settings)
_CUDNN_SAME_KERNELS = _SharedSettings(
    lambda: [_Setting(torch.backends.cudnn, "benchmark", False), _Setting(torch.backends.cudnn, "deterministic", True)]
)


def ieee_float32() -> contextlib.AbstractContextManager[None]:
    """float32 convolutions, matrix products and RNNs in full float32, then the caller's settings again.

    A user may let float32 run in TF32 on a GPU (cuDNN's default for convolutions) or in bfloat16
    on a CPU with AMX (``torch.backends.mkldnn``), for speed; both keep about 3 significant digits,
    far coarser than the solves' 1e-4 stopping rule (NOTE [caller's modes]). Only torch's
    per-operator ``fp32_precision`` settings are read and written: reading the older
    ``allow_tf32`` flags fails once both kinds were set, and the caller can still read theirs after
    this. The settings are process-wide, so nested and concurrent (threaded) uses share them
    (:class:`_SharedSettings`).
    """
    return _FULL_PRECISION.held()


def _same_kernels(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """On CUDA, no cuDNN autotuning and deterministic kernels, then the caller's settings again."""
    return _CUDNN_SAME_KERNELS.held() if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _eval_without_hooks(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode and without hooks, each given back its flag and hook dicts after."""
    hooks = {m: {h: getattr(m, h) for h in _HOOK_DICTS if hasattr(m, h)} for m in model.modules()}
    try:
        for m, saved in hooks.items():
            for h, d in saved.items():
                setattr(m, h, type(d)())
        with training_off(model.modules()):
            yield
    finally:
        for m, saved in hooks.items():
            for h, d in saved.items():
                setattr(m, h, d)


def _check_faithful(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor, concrete_args: dict | None) -> None:
    """Refuse a graph whose output on ``example`` differs from ``model``'s (NOTE [faithful trace])."""
    device = example.device
    outputs = []
    try:  # the same kernels for both runs: no autotuning, no TF32 or bfloat16 for float32
        with (
            _eval_without_hooks(model),
            _same_kernels(device),
            ieee_float32(),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            for module, kwargs in ((model, concrete_args or {}), (gm, {})):
                # on copies of the buffers and of the input: a forward may update them in place even in
                # eval mode (F.instance_norm with running statistics, x.div_(255)), and neither may change
                buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
                # each run starts from the caller's random state, given back after it: both runs draw the
                # same random numbers, and the caller's stream (of the CPU and of the device) is kept
                with random_state_kept(device):
                    outputs.append(torch.func.functional_call(module, buffers, (example.clone(),), kwargs))
    except Exception:  # a model that fails on the example is reported by the passes that run it
        return
    expected, got = outputs
    if _same_output(expected, got):
        return
    name = type(model).__name__
    v2 = [q for q, m in model.named_modules() if type(m).__module__.startswith("torchvision.transforms.v2")]
    cause = (
        f"its torchvision.transforms.v2 module(s) {', '.join(map(repr, v2[:3]))} pass fx's traced values through "
        "unchanged (they act on plain tensors only): apply them to the images before the model, or write them "
        "with torch ops, e.g. (x - mean) / std"
        if v2
        else "its forward takes another path for fx's traced values than for tensors (e.g. an "
        "isinstance(x, torch.Tensor) check, or a library call that passes unknown types through): move that "
        "step out of the model, or write it with torch ops"
    )
    raise UnsupportedModelError(
        f"the traced graph of {name} does not compute what the model computes on the example "
        f"({_describe_difference(expected, got)}), so its maps would explain another model: {cause}"
    )


def _same_output(expected: object, got: object) -> bool:
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        if expected.shape != got.shape or expected.dtype != got.dtype:
            return False
        if not expected.is_floating_point():
            return bool(torch.equal(expected, got))
        scale = float(expected.abs().nan_to_num(0.0, 0.0, 0.0).max()) if expected.numel() else 0.0
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), equal_nan=True))
    if isinstance(expected, (tuple, list)) and isinstance(got, (tuple, list)) and len(expected) == len(got):
        return all(_same_output(e, g) for e, g in zip(expected, got))
    if isinstance(expected, dict) and isinstance(got, dict) and expected.keys() == got.keys():
        return all(_same_output(expected[k], got[k]) for k in expected)
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        return False
    return True  # other outputs (None, numbers) are checked by the passes that need a tensor


def _describe_difference(expected: object, got: object) -> str:
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        if expected.shape != got.shape:
            return f"the model gives shape {tuple(expected.shape)}, the graph {tuple(got.shape)}"
        if expected.is_floating_point() and got.is_floating_point():
            diff = float((expected.cpu().double() - got.cpu().double()).abs().max())  # MPS has no float64
            return f"largest difference {diff:.3g} on outputs up to {float(expected.abs().max()):.3g}"
    return f"the model gives a {type(expected).__name__}, the graph a {type(got).__name__}"


def dict_input_error(graph: fx.Graph | None) -> UnsupportedModelError | None:
    """The refusal of a forward that reads its input as a dict (``batch["image"]``, ``batch.get("image")``),
    found in ``graph`` (also one a failed trace left half-built); None if it reads no key."""
    nodes = list(graph.nodes) if graph is not None else []
    images = next((n for n in nodes if n.op == "placeholder"), None)  # forward's first argument
    for node in nodes:
        read = (node.op == "call_function" and node.target is operator.getitem) or (
            node.op == "call_method" and node.target == "get"
        )
        source, key = (node.args + (None, None))[:2]
        if read and images is not None and source is images and isinstance(key, str):
            return UnsupportedModelError(
                f"the model's forward reads its input as a dict (input[{key!r}]), and a flow passes the images "
                f"tensor itself: wrap the model so that forward takes the images, e.g.\n{_wrap_hint(f'{{{key!r}: x}}')}"
            )
    return None


def _trace(model, tracer, leaf_modules, concrete_args, example, state) -> fx.GraphModule:
    name = type(model).__name__
    concrete_args = {**_defaults(model), **(concrete_args or {})} or None
    fixed = None
    try:
        graph = _run_tracer(tracer, model, concrete_args)
    except Exception as exc:  # every tracing failure becomes one readable error
        refusal = dict_input_error(getattr(tracer, "graph", None))  # the half-built graph: no retry can help
        if refusal is not None:
            raise refusal from None
        again = ""
        if example is not None:
            _restore(state)  # what the failed trace left on the model
            try:
                tracer = ShapeTracer(example, leaf_modules, concrete_args)
                graph = _run_tracer(tracer, model, concrete_args)
                fixed = (tuple(example.shape[1:]), _where(exc).removeprefix(" at ") or f"{name}.forward")
            except Exception as retry:
                if _where(retry) == _where(exc) and type(retry) is type(exc):
                    again = (
                        "\nTracing again with the input's sizes fixed fails on the same line: it depends on more "
                        "than the shape (a tensor's values, say)."
                    )
                else:
                    again = (
                        "\nTracing again with the example's sizes fixed (which resolves branches on shapes) failed "
                        f"too{_where(retry)}: {type(retry).__name__}: {retry}"
                    )
        if fixed is None:
            raise UnsupportedModelError(
                f"torch.fx cannot trace {name}{_where(exc)}: {type(exc).__name__}: {exc}{again}\n"
                "What to do: (1) explain a traceable sub-module instead (e.g. model.features); "
                "(2) mark the offending sub-module as a leaf with compile_naflow(..., "
                "leaf_modules=[TheModuleClass or 'its.qualified.name']) and give it an inverse rule "
                "or fallback='linearize'; (3) if the branch reads another argument of forward (a flag), fix "
                "its value with concrete_args={'flag': value}."
            ) from None
    gm = collectable(fx.GraphModule(tracer.root, graph, name))
    _bind_concrete(gm, concrete_args or {})
    if isinstance(tracer, ShapeTracer):
        tracer.values.clear()  # the example's activations
    if fixed is not None:
        gm.graph.eliminate_dead_code()  # reads of the batch size that the code did not use
        gm.recompile()
        collectable(gm)
        gm.meta["naflow.fixed_shape"] = fixed
    return gm

"""Symbolic tracing with a leaf-module policy, and readable errors for untraceable models."""

from __future__ import annotations

import linecache
import os
import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from .errors import InputTypeError, UnsupportedModelError

__all__ = ["NAFlowTracer", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


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

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The deepest traceback frame that is not inside torch or naflow_fx."""
    here = os.path.dirname(__file__)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith((_TORCH_DIR, here))]
    return frames[-1] if frames else None


def _refuse_wrapper(model: nn.Module) -> None:
    """Wrappers fx cannot see through (data parallel, ``torch.compile``, TorchScript), with the fix."""
    name = type(model).__name__
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        fix = f"{name} only runs its .module on several devices: pass model.module"
    elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        fix = "torch.compile wraps the module: pass the module you compiled (model._orig_mod)"
    elif isinstance(model, torch.jit.ScriptModule):
        fix = "TorchScript modules have no Python forward to trace: pass the nn.Module before torch.jit.script/trace"
    else:
        return
    raise UnsupportedModelError(f"torch.fx cannot trace {name}: {fix}")


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its parameters (the model is not changed).

    Raises:
        UnsupportedModelError: fx cannot trace the model. The message names the offending
            line of the model's source and the ways around it.

    Example:
        >>> gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_naflow expects a torch.nn.Module, got {type(model).__name__}")
    _refuse_wrapper(model)
    tracer = NAFlowTracer(leaf_modules)
    # NOTE [trace in eval mode]: Python branches on ``self.training`` (auxiliary heads, stochastic
    # depth, functional dropout) are baked into the graph at trace time, so trace with every module
    # in eval mode and give each module back its own flag afterwards.
    # User hooks must not run on fx proxies while tracing either: detach them for the trace.
    modes = {m: m.training for m in model.modules()}
    hooks = {m: {h: getattr(m, h) for h in _HOOK_DICTS if hasattr(m, h)} for m in model.modules()}
    try:
        for m, saved in hooks.items():
            for h, d in saved.items():
                setattr(m, h, type(d)())
        model.eval()
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - every tracing failure becomes one readable error
        frame = _user_frame(exc.__traceback__)
        where = ""
        if frame is not None:
            line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            where = f" at {frame.filename}:{frame.lineno} in {frame.name}(): `{line}`"
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}\n"
            "What to do: (1) explain a traceable sub-module instead (e.g. model.features); "
            "(2) mark the offending sub-module as a leaf with compile_naflow(..., "
            "leaf_modules=[TheModuleClass or 'its.qualified.name']) and give it an inverse rule "
            "or fallback='linearize'; (3) fix the Python branch on tensor values with "
            "concrete_args={...} (torch.fx.symbolic_trace semantics)."
        ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, saved in hooks.items():
            for h, d in saved.items():
                setattr(m, h, d)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)

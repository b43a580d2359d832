"""normalize: one canonical op per node, modules lowered to functional eval-mode calls, no in-place ops.

After this pass:

* every ``torch.nn`` module naflow_fx knows is a ``call_function`` to a canonical op
  (:mod:`naflow_fx.canonical`) reading the module's own parameters through ``get_attr`` nodes,
  so the user's modules, their hooks and their ``training`` flag are never touched;
* BatchNorm always uses its running statistics, and dropout / identity nodes are gone
  (eval semantics whatever mode the model is in);
* in-place ops (``relu_``, ``x.add_(y)``, ``inplace=True``) are out-of-place, and later readers
  of the mutated value read the new node, so recorded activations cannot be corrupted;
* ``node.meta["naflow.name"]`` holds the layer name: the module's qualified name
  ("features.0"; "name#2" from its second call site on) or the fx node name for functional ops.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from ..canonical import bind_canonical, is_canonical
from ..errors import InputError, UnsupportedOpError
from ..tracing import collectable, is_frozen_batch_norm
from .partition import POOLS_WITH_INDICES, feature_subgraph

__all__ = ["normalize", "refresh_derived_weights", "computes_weights"]

# hook-based weights: torch.nn.utils.weight_norm / spectral_norm, and torch.nn.utils.prune's masks
_LEGACY = (_LegacyWeightNorm, _LegacySpectralNorm, prune.BasePruningMethod)
_IDENTITY = object()  # marker: the node is replaced by its first argument

# --- call_module lowering: module -> (canonical target, args after the input, kwargs) -----------
# Each lowering gets (attr, module) where attr(name) makes a get_attr node for a parameter/buffer.

_ModuleLowering = Callable[[Callable[[str], fx.Node], nn.Module], tuple[object, dict]]


def _conv(attr, m: nn.Conv2d):
    bias = attr("bias") if m.bias is not None else None
    pad = 0 if m.padding_mode != "zeros" else m.padding
    return torch.conv2d, dict(
        weight=attr("weight"), bias=bias, stride=m.stride, padding=pad, dilation=m.dilation, groups=m.groups
    )


_BATCH_STATISTICS = (
    "{what} normalises with batch statistics even in eval mode, so one sample's explanation would depend on the "
    "rest of the batch. Use a model whose BatchNorm layers track running statistics."
)


def _bound(node: fx.Node, target, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``bind_canonical`` of ``node``'s call to ``target``; arguments it cannot read are an UnsupportedOpError."""
    try:
        return bind_canonical(target, args, dict(kwargs))
    except TypeError as exc:
        raise UnsupportedOpError(f"cannot read the arguments of {node.format_node()}: {exc}") from None


def _reads_the_input(node: fx.Node) -> bool:
    """Whether ``node`` depends on a placeholder (the images), rather than on parameters only."""
    inputs = [n for n in node.graph.nodes if n.op == "placeholder"]
    return any(feature_subgraph(node.graph, p, node, keep=lambda n: True) for p in inputs)


def _bn(attr, m: nn.modules.batchnorm._BatchNorm):
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedOpError(_BATCH_STATISTICS.format(what=f"{type(m).__name__} with track_running_stats=False"))
    return F.batch_norm, dict(
        running_mean=attr("running_mean"),
        running_var=attr("running_var"),
        weight=attr("weight") if m.weight is not None else None,
        bias=attr("bias") if m.bias is not None else None,
        training=False,
        momentum=0.0,
        eps=m.eps,
    )


def _instance_norm(attr, m: nn.InstanceNorm2d):
    """With running statistics, eval InstanceNorm is an eval BatchNorm; without, the sample's own."""
    if m.running_mean is not None and m.running_var is not None:
        return _bn(attr, m)
    weight = attr("weight") if m.weight is not None else None
    bias = attr("bias") if m.bias is not None else None
    return F.instance_norm, dict(weight=weight, bias=bias, use_input_stats=True, eps=m.eps)


def _conv_transpose(attr, m: nn.ConvTranspose2d):
    """Called with the input alone (no ``output_size``), so ``output_padding`` is the module's own."""
    return torch.conv_transpose2d, dict(
        weight=attr("weight"),
        bias=attr("bias") if m.bias is not None else None,
        stride=m.stride,
        padding=m.padding,
        output_padding=m.output_padding,
        groups=m.groups,
        dilation=m.dilation,
    )


def _upsample(attr, m: nn.Upsample):
    return F.interpolate, dict(
        size=m.size,
        scale_factor=m.scale_factor,
        mode=m.mode,
        align_corners=m.align_corners,
        recompute_scale_factor=m.recompute_scale_factor,
        antialias=False,
    )


def _max_pool(m, plain, with_indices, **kwargs):
    """A max pool that returns its indices (SegNet's unpooling) is the call fx traces ``F.max_pool2d(...,
    return_indices=True)`` to."""
    return (with_indices, kwargs | {"return_indices": True}) if m.return_indices else (plain, kwargs)


_MODULE_LOWERINGS: dict[type, _ModuleLowering] = {
    nn.Conv2d: _conv,
    nn.ConvTranspose2d: _conv_transpose,
    nn.Linear: lambda a, m: (F.linear, dict(weight=a("weight"), bias=a("bias") if m.bias is not None else None)),
    nn.BatchNorm2d: _bn,
    nn.BatchNorm1d: _bn,
    nn.SyncBatchNorm: _bn,  # eval: the running statistics, as any batch norm
    nn.LayerNorm: lambda a, m: (
        F.layer_norm,
        dict(
            normalized_shape=tuple(m.normalized_shape),
            weight=a("weight") if m.weight is not None else None,
            bias=a("bias") if m.bias is not None else None,
            eps=m.eps,
        ),
    ),
    nn.GroupNorm: lambda a, m: (
        F.group_norm,
        dict(
            num_groups=m.num_groups,
            weight=a("weight") if m.weight is not None else None,
            bias=a("bias") if m.bias is not None else None,
            eps=m.eps,
        ),
    ),
    nn.InstanceNorm2d: _instance_norm,
    nn.LocalResponseNorm: lambda a, m: (F.local_response_norm, dict(size=m.size, alpha=m.alpha, beta=m.beta, k=m.k)),
    nn.ReLU: lambda a, m: (torch.relu, {}),
    nn.ReLU6: lambda a, m: (F.hardtanh, dict(min_val=0.0, max_val=6.0)),
    nn.Hardtanh: lambda a, m: (F.hardtanh, dict(min_val=m.min_val, max_val=m.max_val)),
    nn.LeakyReLU: lambda a, m: (F.leaky_relu, dict(negative_slope=m.negative_slope)),
    nn.PReLU: lambda a, m: (F.prelu, dict(weight=a("weight"))),
    nn.ELU: lambda a, m: (F.elu, dict(alpha=m.alpha)),
    nn.Sigmoid: lambda a, m: (torch.sigmoid, {}),
    nn.Tanh: lambda a, m: (torch.tanh, {}),
    nn.SiLU: lambda a, m: (F.silu, {}),
    nn.GELU: lambda a, m: (F.gelu, dict(approximate=m.approximate)),
    nn.Hardswish: lambda a, m: (F.hardswish, {}),
    nn.Hardsigmoid: lambda a, m: (F.hardsigmoid, {}),
    nn.Mish: lambda a, m: (F.mish, {}),
    nn.Softplus: lambda a, m: (F.softplus, dict(beta=m.beta, threshold=m.threshold)),
    nn.SELU: lambda a, m: (F.selu, {}),
    nn.RReLU: lambda a, m: (F.leaky_relu, dict(negative_slope=(m.lower + m.upper) / 2)),  # its eval slope
    nn.LogSigmoid: lambda a, m: (F.logsigmoid, {}),
    nn.Softsign: lambda a, m: (F.softsign, {}),
    nn.Tanhshrink: lambda a, m: (F.tanhshrink, {}),
    nn.Hardshrink: lambda a, m: (F.hardshrink, dict(lambd=m.lambd)),
    nn.Softshrink: lambda a, m: (F.softshrink, dict(lambd=m.lambd)),
    nn.Threshold: lambda a, m: (F.threshold, dict(threshold=m.threshold, value=m.value)),
    nn.GLU: lambda a, m: (F.glu, dict(dim=m.dim)),
    nn.Softmax: lambda a, m: (F.softmax, dict(dim=m.dim, dtype=None)),
    nn.Softmax2d: lambda a, m: (F.softmax, dict(dim=-3, dtype=None)),
    nn.LogSoftmax: lambda a, m: (F.log_softmax, dict(dim=m.dim, dtype=None)),
    nn.LPPool2d: lambda a, m: (
        F.lp_pool2d,
        dict(norm_type=m.norm_type, kernel_size=m.kernel_size, stride=m.stride, ceil_mode=m.ceil_mode),
    ),
    nn.CELU: lambda a, m: (F.celu, dict(alpha=m.alpha)),
    nn.MaxPool2d: lambda a, m: _max_pool(
        m,
        F.max_pool2d,
        F.max_pool2d_with_indices,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        ceil_mode=m.ceil_mode,
    ),
    nn.AvgPool2d: lambda a, m: (
        F.avg_pool2d,
        dict(
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            ceil_mode=m.ceil_mode,
            count_include_pad=m.count_include_pad,
            divisor_override=m.divisor_override,
        ),
    ),
    nn.AdaptiveAvgPool2d: lambda a, m: (F.adaptive_avg_pool2d, dict(output_size=m.output_size)),
    nn.AdaptiveMaxPool2d: lambda a, m: _max_pool(
        m, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, output_size=m.output_size
    ),
    nn.Flatten: lambda a, m: (torch.flatten, dict(start_dim=m.start_dim, end_dim=m.end_dim)),
    # padding modules are F.pad (a selection: docs/naflow.md, decision 12)
    nn.ZeroPad2d: lambda a, m: (F.pad, dict(pad=tuple(m.padding), mode="constant", value=0.0)),
    nn.ConstantPad2d: lambda a, m: (F.pad, dict(pad=tuple(m.padding), mode="constant", value=float(m.value))),
    nn.ReflectionPad2d: lambda a, m: (F.pad, dict(pad=tuple(m.padding), mode="reflect", value=None)),
    nn.ReplicationPad2d: lambda a, m: (F.pad, dict(pad=tuple(m.padding), mode="replicate", value=None)),
    nn.CircularPad2d: lambda a, m: (F.pad, dict(pad=tuple(m.padding), mode="circular", value=None)),
    # resampling and pixel/channel shuffles (decision 34)
    nn.Upsample: _upsample,
    nn.UpsamplingNearest2d: _upsample,
    nn.UpsamplingBilinear2d: _upsample,
    nn.PixelShuffle: lambda a, m: (torch.pixel_shuffle, dict(upscale_factor=m.upscale_factor)),
    nn.PixelUnshuffle: lambda a, m: (torch.pixel_unshuffle, dict(downscale_factor=m.downscale_factor)),
    nn.ChannelShuffle: lambda a, m: (torch.channel_shuffle, dict(groups=m.groups)),
    nn.Identity: lambda a, m: (_IDENTITY, {}),
    nn.Dropout: lambda a, m: (_IDENTITY, {}),
    nn.Dropout1d: lambda a, m: (_IDENTITY, {}),
    nn.Dropout2d: lambda a, m: (_IDENTITY, {}),
    nn.Dropout3d: lambda a, m: (_IDENTITY, {}),
    nn.AlphaDropout: lambda a, m: (_IDENTITY, {}),
    nn.FeatureAlphaDropout: lambda a, m: (_IDENTITY, {}),
}

# --- call_function aliases: target -> canonical target (or _IDENTITY) ----------------------------
_FUNCTION_ALIASES: dict[object, object] = {
    torch.relu_: torch.relu,
    F.relu: torch.relu,
    F.relu_: torch.relu,
    F.hardtanh_: F.hardtanh,
    F.relu6: F.hardtanh,
    F.leaky_relu_: F.leaky_relu,
    F.elu_: F.elu,
    F.sigmoid: torch.sigmoid,
    torch.selu: F.selu,
    torch.softmax: F.softmax,
    torch.log_softmax: F.log_softmax,
    F.threshold_: F.threshold,
    torch.threshold: F.threshold,
    torch.selu_: F.selu,
    F.selu_: F.selu,
    torch.celu: F.celu,
    torch.celu_: F.celu,
    F.celu_: F.celu,
    F.tanh: torch.tanh,
    torch.max_pool2d: F.max_pool2d,
    torch.clip: torch.clamp,
    torch.swapaxes: torch.transpose,
    torch.swapdims: torch.transpose,
    torch.clamp_: torch.clamp,
    F.dropout: _IDENTITY,
    F.dropout1d: _IDENTITY,
    F.dropout2d: _IDENTITY,
    F.dropout3d: _IDENTITY,
    F.alpha_dropout: _IDENTITY,
    F.feature_alpha_dropout: _IDENTITY,
    torch.dropout: _IDENTITY,
    operator.iadd: operator.add,
    operator.imul: operator.mul,
    operator.isub: operator.sub,
    operator.itruediv: operator.truediv,
}
_INPLACE_FUNCTIONS = {torch.relu_, F.relu_, F.hardtanh_, F.leaky_relu_, F.elu_, torch.clamp_}
_INPLACE_FUNCTIONS |= {torch.selu_, F.selu_, torch.celu_, F.celu_, F.threshold_, torch.clamp_min_, torch.clamp_max_}
_INPLACE_FUNCTIONS |= {operator.iadd, operator.imul, operator.isub, operator.itruediv}

# --- call_method aliases: method name -> canonical target -----------------------------------------
_METHOD_ALIASES: dict[str, object] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "clamp": torch.clamp,
    "clip": torch.clamp,
    "clamp_min": torch.clamp,
    "clamp_max": torch.clamp,
    "softmax": F.softmax,
    "log_softmax": F.log_softmax,
    "flatten": torch.flatten,
    "view": torch.reshape,
    "reshape": torch.reshape,
    "permute": torch.permute,
    "transpose": torch.transpose,
    "contiguous": _IDENTITY,
    "clone": _IDENTITY,
}


def _rewire_later_uses(graph: fx.Graph, mutated: fx.Node, new: fx.Node) -> None:
    """After an in-place op on ``mutated`` became ``new``, later readers of ``mutated`` read ``new``."""
    after = False
    for n in graph.nodes:
        if n is new:
            after = True
            continue
        if after and mutated in n.all_input_nodes:
            n.replace_input_with(mutated, new)


def _shape_args(args: tuple) -> tuple:
    """``x.view(a, b)`` and ``x.view((a, b))`` both become ``(x, (a, b))``."""
    rest = args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    return (args[0], tuple(rest))


_ONE_BOUND = {"clamp_min": "min", "clamp_max": "max"}
_ONE_BOUND_FUNCTIONS = {getattr(torch, name + suffix): name for name in _ONE_BOUND for suffix in ("", "_")}


def _one_bound(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``x.clamp_max(c)``, ``torch.clamp_min(x, min=c)``: the ``torch.clamp`` call with that one bound."""
    bound = _ONE_BOUND[name]
    return args[:1], {bound: args[1] if len(args) > 1 else kwargs.get(bound)}


def _clamp_to_hardtanh(args: tuple, kwargs: dict) -> tuple[object, tuple, dict] | None:
    bounds = list(args[1:]) + [None] * 2
    lo = kwargs.get("min", bounds[0])
    hi = kwargs.get("max", bounds[1])
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return None  # tensor bounds: leave as is (no rule, reported later)
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    return F.hardtanh, (args[0],), dict(min_val=lo, max_val=hi)


def _scope_functional_names(graph: fx.Graph) -> None:
    """Name functional ops inside a module after it: ``layer1.0.add``, ``layer1.1.add`` (then
    ``layer1.0.add#2``) instead of fx's global ``add``, ``add_1``. Top-level ones keep fx's name."""
    calls: Counter[str] = Counter()
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op not in ("call_function", "call_method") or not stack or node.meta.get("naflow.module"):
            continue
        scope = next(reversed(stack.values()))[0]
        name = f"{scope}.{re.sub(r'_[0-9]+$', '', node.name)}"
        calls[name] += 1
        k = calls[name]
        node.meta["naflow.name"] = name if k == 1 else f"{name}#{k}"


def _derived(mod: nn.Module, name: str) -> Callable[[], torch.Tensor] | None:
    """How ``mod`` computes its tensor ``name`` from its parameters on every call; None for a plain one.

    These are ``torch.nn.utils.parametrizations`` (``weight_norm``, ``spectral_norm``) and the
    older hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` and ``torch.nn.utils.prune``,
    whose pre-forward hook sets a plain ``mod.weight`` that fx would freeze at trace time. The returned function
    computes the tensor without gradient, in eval mode: no power iteration, and the user's flags
    and buffers are left as they were.
    """
    if parametrize.is_parametrized(mod, name):

        def parametrized() -> torch.Tensor:
            from ..tracing import training_off  # shared with concurrent flows (threads)

            with training_off(mod.parametrizations[name].modules()), torch.no_grad():
                return getattr(mod, name).detach().clone()

        return parametrized
    hook = next((h for h in mod._forward_pre_hooks.values() if _hook_name(h) == name), None)
    if isinstance(hook, _LegacyWeightNorm):
        return torch.no_grad()(lambda: hook.compute_weight(mod).detach())
    if isinstance(hook, _LegacySpectralNorm):
        return torch.no_grad()(lambda: hook.compute_weight(mod, do_power_iteration=False).detach())
    if isinstance(hook, prune.BasePruningMethod):
        return torch.no_grad()(lambda: hook.apply_mask(mod).detach())
    return None


def _hook_name(hook: object) -> str | None:
    """The tensor a weight-computing pre-forward hook sets (``_LEGACY``), else None."""
    if isinstance(hook, prune.BasePruningMethod):
        return getattr(hook, "_tensor_name", None)
    return getattr(hook, "name", None) if isinstance(hook, _LEGACY) else None


def computes_weights(hook: object) -> bool:
    """Whether a module's pre-forward hook computes one of its weights (then the graph computes it too)."""
    return _hook_name(hook) is not None


def _derived_snapshot(gm: fx.GraphModule, target: str, name: str, compute: Callable[[], torch.Tensor]) -> str:
    """A derived weight (see ``_derived``) kept on ``gm`` as a buffer, refreshed on every call.

    Reading ``mod.weight`` in the graph would run a parametrization on every call, and a
    spectral norm in training mode would then advance its power iteration, changing the user's
    buffers (spec I6); a legacy hook's ``mod.weight`` would be frozen. So the weight is a buffer
    of ``gm``, computed here and again by :func:`refresh_derived_weights` before every flow
    (docs/naflow.md, decision 3), so it follows the model's parameters like any other weight.
    """
    attr_name = "naflow_derived_" + f"{target}.{name}".replace(".", "_")
    if not hasattr(gm, attr_name):
        gm.register_buffer(attr_name, compute())
        gm.meta.setdefault("naflow.derived", {})[attr_name] = compute
    return attr_name


def refresh_derived_weights(gm: fx.GraphModule) -> None:
    """Recompute every derived weight of ``gm`` from the model's current parameters, in place.

    An unchanged weight is not written, so the weight cache (NOTE [weight cache]) stays valid.
    """
    for attr_name, compute in gm.meta.get("naflow.derived", {}).items():
        try:
            value = compute()
        except Exception as exc:  # prune.remove / remove_parametrizations since compile
            raise InputError(
                f"the weight behind {attr_name.removeprefix('naflow_derived_')!r} can no longer be computed "
                f"({type(exc).__name__}: {exc}): the model's pruning, weight norm or parametrization changed since "
                "compile_naflow; compile it again, compile_naflow(model, x)"
            ) from None
        buffer = gm.get_buffer(attr_name)
        if value.shape != buffer.shape or value.dtype != buffer.dtype or value.device != buffer.device:
            continue  # the model was cast, moved or reshaped: the flow refuses it (NAFlow._check_model)
        if not torch.equal(value, buffer):
            buffer.copy_(value)


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into canonical, eval-mode, out-of-place form and return it."""
    graph = gm.graph
    calls: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            calls[node.target] += 1
            k = calls[node.target]
            node.meta["naflow.name"] = node.target if k == 1 else f"{node.target}#{k}"
            node.meta["naflow.module"] = node.target
            node.meta["naflow.module_type"] = type(mod).__name__
            # a parametrized module (weight_norm, spectral_norm) is its plain class with computed weights
            plain = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
            lowering = _MODULE_LOWERINGS.get(plain) or (_bn if is_frozen_batch_norm(mod) else None)
            if lowering is None or len(node.args) != 1 or node.kwargs:
                # an unknown leaf module, or a known one called with more than its input (a
                # ConvTranspose2d given output_size), stays a call_module; assign_rules reports it
                continue

            def attr(name: str, _node=node, _mod=mod) -> fx.Node:
                with graph.inserting_before(_node):
                    compute = _derived(_mod, name)
                    if compute is not None:
                        return graph.get_attr(_derived_snapshot(gm, _node.target, name, compute))
                    return graph.get_attr(f"{_node.target}.{name}")

            target, kwargs = lowering(attr, mod)
            inp = node.args[0]
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                with graph.inserting_before(node):
                    inp = graph.call_function(
                        F.pad, (inp,), dict(pad=tuple(mod._reversed_padding_repeated_twice), mode=mod.padding_mode)
                    )
                inp.meta["naflow.name"] = f"{node.meta['naflow.name']}.pad"
            if target is _IDENTITY:
                node.replace_all_uses_with(inp)
                graph.erase_node(node)
                continue
            node.op, node.target = "call_function", target
            node.args, node.kwargs = (inp,), kwargs
            continue

        if node.op == "call_method":
            name = node.target
            inplace = name.endswith("_") and not name.endswith("__")
            base = name[:-1] if inplace else name
            target = _METHOD_ALIASES.get(base)
            if target is None:
                if inplace:
                    with graph.inserting_after(node):
                        new = graph.call_method(base, node.args, node.kwargs)
                    new.meta.update(node.meta)
                    node.replace_all_uses_with(new)
                    graph.erase_node(node)
                    _rewire_later_uses(graph, new.args[0], new)
                continue
            args, kwargs = node.args, dict(node.kwargs)
            if target in (torch.reshape, torch.permute):
                args = _shape_args(args)
            elif base in _ONE_BOUND:
                args, kwargs = _one_bound(base, args, kwargs)
            node.op, node.target = "call_function", target
            node.args, node.kwargs = args, kwargs
            if inplace:
                _rewire_later_uses(graph, args[0], node)

        if node.op == "call_function":
            target = node.target
            inplace = target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
            relu6 = target is F.relu6
            target = _FUNCTION_ALIASES.get(target, target)
            args, kwargs = node.args, dict(node.kwargs)
            if relu6:
                args, kwargs = args[:1], dict(min_val=0.0, max_val=6.0)
            if target in _ONE_BOUND_FUNCTIONS:
                args, kwargs = _one_bound(_ONE_BOUND_FUNCTIONS[target], args, kwargs)
                target = torch.clamp
            if target is _IDENTITY:
                node.replace_all_uses_with(args[0] if args else kwargs["input"])
                graph.erase_node(node)
                continue
            if target is torch.clamp:
                lowered = _clamp_to_hardtanh(args, kwargs)
                if lowered is None:
                    continue
                target, args, kwargs = lowered
            if target is F.instance_norm:
                args, kwargs = _bound(node, target, args, kwargs)
                if kwargs["use_input_stats"]:
                    # the running statistics would only be updated in place (the user's buffers): left out
                    kwargs.update(running_mean=None, running_var=None)
            if target is F.batch_norm:
                if _bound(node, target, args, kwargs)[1]["running_mean"] is not None:
                    kwargs["training"] = False
                elif _reads_the_input(node):
                    what = f"F.batch_norm without running statistics ({node.format_node()})"
                    raise UnsupportedOpError(_BATCH_STATISTICS.format(what=what))
                # else: batch statistics of parameters (weight standardisation, as in NF-ResNets): as is
            node.target, node.args, node.kwargs = target, args, kwargs
            if inplace and node.args and isinstance(node.args[0], fx.Node):
                _rewire_later_uses(graph, node.args[0], node)

    # Bind every canonical node to its signature: (input,) plus all kwargs, defaults filled in.
    for node in graph.nodes:
        if node.op == "call_function" and is_canonical(node.target):
            node.args, node.kwargs = _bound(node, node.target, node.args, node.kwargs)
        node.meta.setdefault("naflow.name", node.name)
    _scope_functional_names(graph)
    _name_pooled_values(graph)
    graph.lint()
    gm.recompile()
    return collectable(gm)


def _name_pooled_values(graph: fx.Graph) -> None:
    """A max-pool module that returns its indices is named by its pooled values, the layer: ``pool``
    (decision 1), its ``(values, indices)`` pair ``pool.with_indices``."""
    for node in graph.nodes:
        if node.target not in POOLS_WITH_INDICES or "naflow.module" not in node.meta:
            continue
        values = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(values) == 1:  # the values stand for the module (layers=[model.pool]) as its output
            for key in ("naflow.name", "naflow.module", "naflow.module_type"):
                values[0].meta[key] = node.meta[key]
            node.meta["naflow.name"] += ".with_indices"

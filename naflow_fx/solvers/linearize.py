"""The tangent map of a graph at a point, built op by op: ``J·t`` at the cost of one forward pass.

``torch.func.jvp`` recomputes the primal on every call and carries forward-mode formulas that,
for convolutions and batch norm, cost several forward passes (measured on a ResNet-50 bottleneck
at 56×56: ``jvp`` 19–56 ms against 5 ms for the forward; see docs/performance.md). A CGLS
iteration applies ``J`` once, so the solver pays that on every iteration.

``linearize_graph`` instead runs the graph once at the point and keeps, for every node that
depends on the input, a tangent rule with its constants precomputed:

- convolution and linear layers apply their weight with the bias dropped;
- eval-mode batch norm multiplies by its per-channel scale, folded into the weight of the conv
  or linear layer before it when nothing else reads that layer's output and the weight is no
  larger than the output;
- pointwise activations multiply by their derivative at the recorded input (a 0/1 mask for ReLU,
  ReLU6, hard tanh);
- sums, differences, products, concatenations, reshapes, pads and average pools follow their
  linear structure;
- every other node falls back to ``torch.func.jvp`` of that node alone, so the result is always
  the exact Jacobian-vector product.

# NOTE [tangent program]
# One CGLS iteration applies J and Jᵀ once each, and in the bottleneck regions of a ResNet the
# elementwise steps between the convolutions cost as much as the convolutions (measured on
# ResNet-50's layer1.1 at 56×56, batch 8: 42 ms per J, of which 19 ms convolutions, 13 ms
# multiplications and 6 ms converting boolean masks to float). So the program is built to
# make few passes over memory:
# - a batch norm's scale is folded into the preceding conv's weight (one multiplication less),
#   unless the weight has more entries than the conv's output: the folded copy is alive while
#   the stage is solved, and at a small batch a late conv's weight is larger than its output;
# - masks and derivatives are kept in the feature's dtype (a boolean mask is converted on every
#   use) and applied in place when the value they multiply is a temporary that only this
#   step reads; sums are accumulated in place the same way;
# - each tangent is dropped after its last use.
# The adjoint is the program's own vjp, taken at zero (`transposable`): J and Jᵀ are then exact
# transposes of each other, the batch norms stay folded, and the stage's forward need not be
# recorded for autograd. Programs with a `jvp` fallback keep the stage's vjp.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import vjp
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UnsupportedOpError
from .operator import jvp

__all__ = ["linearize_graph"]

_BILINEAR = {operator.mul, torch.mul, operator.imul}
_SUMS = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub, operator.neg, torch.neg}
_POINTWISE = {
    torch.relu,
    F.relu,
    F.hardtanh,
    F.relu6,
    F.leaky_relu,
    F.elu,
    torch.sigmoid,
    torch.tanh,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    F.prelu,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
    F.hardshrink,
    F.softshrink,
    F.threshold,
    torch.maximum,
    torch.minimum,
}
# Linear in their tensor arguments, with every other argument a constant.
_LINEAR = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.cat,
    torch.stack,
    torch.squeeze,
    torch.unsqueeze,
    torch.mean,
    torch.sum,
    torch.chunk,
    torch.split,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.channel_shuffle,
    F.interpolate,
    operator.getitem,
}
_LINEAR_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "mean",
    "sum",
    "chunk",
    "split",
    "expand",
    "expand_as",
    "view_as",
    "reshape_as",
}
_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
)
_LINEAR_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.Upsample,
    nn.modules.dropout._DropoutNd,
)
_AFFINE = {torch.conv2d, F.conv2d, torch.conv_transpose2d, F.linear}  # weight applied to the feature, bias dropped

Rule = Callable[[dict[str, Any]], Any]


def _map(value: Any, fn: Callable[[fx.Node], Any]) -> Any:
    return fx.node.map_arg(value, fn)


def _depends(value: Any, dep: set[str]) -> bool:
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = found or n.name in dep
        return n

    _map(value, visit)
    return found


def _is_tensor_tree(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_tensor_tree(v) for v in value)
    return False


def _batch_norm_scale(running_var: Tensor, weight: Tensor | None, eps: float, like: Tensor) -> Tensor:
    """Eval batch norm's Jacobian, ``γ / √(var + ε)`` per channel, shaped to broadcast over ``like``."""
    scale = torch.rsqrt(running_var.to(like.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(like.dtype)
    return scale.reshape([1, -1] + [1] * (like.dim() - 2))


class _Ref:
    """Marks where the output template takes a node's tangent."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _fill(template: Any, tangents: dict[str, Any]) -> Any:
    if isinstance(template, _Ref):
        return tangents[template.name]
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(v, tangents) for v in template)
    return template


class _Linearizer(fx.Interpreter):
    """Runs the graph at the point and collects one tangent rule per input-dependent node.

    Rules capture the constants they need when they are built, so the recorded intermediate
    values are freed as the run goes (``fx.Interpreter`` drops each value after its last use).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.dep: set[str] = set()
        self.rules: list[tuple[str, Rule]] = []
        self.kinds: dict[str, str] = {}
        self.template: Any = None
        self.first: str | None = None
        # nodes whose tangent is a new tensor held by nothing but the tangent program
        self.fresh: set[str] = set()
        self.index: dict[str, int] = {}  # node → its position in ``rules``
        # affine nodes: (weight, rebuild(weight) → rule, is_linear) for folding a batch norm
        self.foldable: dict[str, tuple[Tensor, Callable[[Tensor], Rule], bool]] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "placeholder":
            if self.first is None:  # placeholders come first; the first one is the feature input
                self.first = n.name
                self.dep.add(n.name)
        elif n.op == "output":
            self.template = _map(
                n.args[0], lambda a: _Ref(a.name) if a.name in self.dep else torch.zeros_like(self.env[a])
            )
        elif n.op != "get_attr" and _depends((n.args, n.kwargs), self.dep) and _is_tensor_tree(value):
            kind, rule, fresh = self._rule(n, value)
            self.index[n.name] = len(self.rules)
            self.rules.append((n.name, rule))
            self.kinds[n.name] = kind
            self.dep.add(n.name)
            if fresh:
                self.fresh.add(n.name)
        return value

    # -- helpers -------------------------------------------------------------------------------
    def _isdep(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a.name in self.dep

    def _owned(self, a: Any, value: Any) -> bool:
        """``a``'s tangent is a temporary that only the node being built reads, already of the shape
        of that node's ``value``: the node's result may be written into it."""
        return (
            isinstance(a, fx.Node)
            and a.name in self.fresh
            and len(a.users) == 1
            and isinstance(value, Tensor)
            and self.env[a].shape == value.shape
        )

    def _foldable(self, n: fx.Node, weight: Tensor, build: Callable[[Tensor], Rule], is_linear: bool) -> Rule:
        """The rule ``build(weight)`` of an affine node, recorded so a batch norm after it can fold."""
        self.foldable[n.name] = (weight, build, is_linear)
        return build(weight)

    def _fold(self, n: fx.Node, scale: Tensor, value: Any) -> Rule | None:
        """Fold ``n``'s per-channel ``scale`` into the weight of the affine node before it, if it may."""
        x = n.args[0]
        if x.name not in self.foldable or len(x.users) != 1 or not isinstance(value, Tensor):
            return None
        weight, rebuild, is_linear = self.foldable[x.name]
        if weight.numel() > value.numel():
            # The folded copy would outweigh the pass over the output it saves (late convs at a
            # small batch: ResNet-18's layer4 weights are 19 MB, its output at batch 1 0.1 MB).
            return None
        channels = scale.reshape(-1)
        if channels.numel() != weight.shape[0] or (is_linear and value.dim() != 2):
            return None  # a linear layer's features are its last dim: only then are they BN's dim 1
        folded = weight * channels.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
        self.rules[self.index[x.name]] = (x.name, rebuild(folded))
        return lambda t: t[x.name]

    def _const(self, value: Any) -> Any:
        """``value`` with every node replaced by its recorded value (for input-free arguments)."""
        return _map(value, lambda a: self.env[a])

    def _call(self, n: fx.Node) -> Callable[..., Any]:
        if n.op == "call_function":
            return n.target
        if n.op == "call_method":
            return lambda obj, *a, **k: getattr(obj, n.target)(*a, **k)
        return self.fetch_attr(n.target)

    def _rule(self, n: fx.Node, value: Any) -> tuple[str, Rule, bool]:
        """``(kind, rule, fresh)``: ``fresh`` when the rule returns a new tensor (NOTE [tangent program])."""
        fn, args, kwargs = n.target, n.args, n.kwargs
        func = n.op == "call_function"
        feature_only = bool(args) and self._isdep(args[0]) and not _depends((args[1:], kwargs), self.dep)
        if n.op == "call_module" and feature_only:
            found = self._module_rule(n, self.fetch_attr(n.target), value)
            if found is not None:
                return found
        if func and fn in _AFFINE and feature_only:
            return "affine", self._affine_rule(n), True
        if func and fn is F.batch_norm and feature_only and not self._const(kwargs).get("training", False):
            bound = dict(zip(("running_mean", "running_var", "weight", "bias"), self._const(args[1:])))
            bound.update(self._const(dict(kwargs)))
            like = self.env[args[0]]
            scale = _batch_norm_scale(bound["running_var"], bound.get("weight"), bound.get("eps", 1e-5), like)
            return self._scale_rule(n, scale, value)
        if func and fn in _POINTWISE and feature_only:
            return self._pointwise_rule(n, self._call(n), value)
        if func and fn in _SUMS and isinstance(value, Tensor):
            found = self._sum_rule(n, value)
            if found is not None:
                return ("sum", *found)
        if func and fn in _BILINEAR and not kwargs and len(args) == 2:
            return "product", self._product_rule(n), True
        if (func and fn in _LINEAR) or (n.op == "call_method" and fn in _LINEAR_METHODS):
            return "linear", self._linear_rule(n), False  # may return a view
        if func and fn is F.pad and feature_only and self._const(kwargs).get("mode", "constant") == "constant":
            return "linear", self._linear_rule(n, {"value": 0.0}), False
        return "jvp", self._fallback_rule(n), False

    def _module_rule(self, n: fx.Node, mod: nn.Module, value: Any) -> tuple[str, Rule, bool] | None:
        """Leaf modules left in the graph (plain ``symbolic_trace``): the same rules as their functions."""
        x = n.args[0].name
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros" and len(n.args) == 1:
            conv = lambda w: lambda t: mod._conv_forward(t[x], w, None)  # noqa: E731
            return "affine", self._foldable(n, mod.weight.detach(), conv, False), True
        if isinstance(mod, nn.Linear) and len(n.args) == 1:
            linear = lambda w: lambda t: F.linear(t[x], w)  # noqa: E731
            return "affine", self._foldable(n, mod.weight.detach(), linear, True), True
        if isinstance(mod, _BatchNorm) and not mod.training and mod.running_var is not None:
            scale = _batch_norm_scale(mod.running_var, mod.weight, mod.eps, self.env[n.args[0]])
            return self._scale_rule(n, scale, value)
        if isinstance(mod, _POINTWISE_MODULES):
            return self._pointwise_rule(n, mod, value)
        if isinstance(mod, _LINEAR_MODULES) and not (isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training):
            return "linear", lambda t: mod(t[x]), False
        return None

    def _affine_rule(self, n: fx.Node) -> Rule:
        x, fn = n.args[0].name, n.target
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        rest = [detach(v) for v in self._const(n.args[1:])]
        kwargs = {k: detach(v) for k, v in self._const(dict(n.kwargs)).items()}
        if len(rest) >= 2:  # bias given positionally
            rest[1] = None
        else:
            kwargs["bias"] = None

        def rebuild(weight: Tensor) -> Rule:
            args, kw = list(rest), dict(kwargs)
            if args:
                args[0] = weight
            else:
                kw["weight"] = weight
            return lambda t: fn(t[x], *args, **kw)

        weight = rest[0] if rest else kwargs.get("weight")
        # a transposed conv's output channels are its weight's dim 1, so a batch norm cannot fold into dim 0
        if isinstance(weight, Tensor) and weight.dim() >= 2 and fn is not torch.conv_transpose2d:
            return self._foldable(n, weight, rebuild, fn is F.linear)
        return lambda t: fn(t[x], *rest, **kwargs)

    def _scale_rule(self, n: fx.Node, scale: Tensor, value: Any) -> tuple[str, Rule, bool]:
        """Eval batch norm: folded into the weight before it, else a per-channel multiplication."""
        folded = self._fold(n, scale, value)
        if folded is not None:
            return "folded", folded, True
        x = n.args[0]
        if self._owned(x, value):
            return "scale", lambda t: t[x.name].mul_(scale), True
        return "scale", lambda t: t[x.name] * scale, True

    def _pointwise_rule(self, n: fx.Node, fn: Callable[..., Any], value: Any) -> tuple[str, Rule, bool]:
        x = n.args[0].name
        rest = self._const(n.args[1:])
        kwargs = {k: v for k, v in self._const(dict(n.kwargs)).items() if k != "inplace"}
        a = self.env[n.args[0]].detach()
        # The derivative of an elementwise op is its vjp with ones: reverse mode, so J agrees with
        # the stage's own vjp at kinks too; and no forward-mode set-up. It stays in the feature's
        # dtype even when it is a 0/1 mask (NOTE [tangent program]).
        deriv = vjp(lambda z: fn(z, *rest, **kwargs), a)[1](torch.ones_like(a))[0]
        kind = "mask" if bool(((deriv == 0) | (deriv == 1)).all()) else "derivative"
        if self._owned(n.args[0], value):
            return kind, lambda t: t[x].mul_(deriv), True
        return kind, lambda t: t[x] * deriv, True

    def _sum_rule(self, n: fx.Node, value: Tensor) -> tuple[Rule, bool] | None:
        """``(rule, fresh)`` for sums, differences and negation, in place where the operand is a temporary."""
        fn, (lhs, *more) = n.target, n.args
        if fn in (operator.neg, torch.neg):
            if self._owned(lhs, value):
                return (lambda t: t[lhs.name].neg_()), True
            return (lambda t: -t[lhs.name]), True
        rhs = more[0] if more else n.kwargs.get("other")
        scale = (
            -n.kwargs.get("alpha", 1) if fn in (operator.sub, torch.sub, operator.isub) else n.kwargs.get("alpha", 1)
        )
        if _depends(scale, self.dep):
            return None
        ldep, rdep = self._isdep(lhs), self._isdep(rhs)
        if ldep and rdep:
            if self._owned(lhs, value):
                return (lambda t: t[lhs.name].add_(t[rhs.name], alpha=scale)), True
            if self._owned(rhs, value) and scale == 1:
                return (lambda t: t[rhs.name].add_(t[lhs.name])), True
            return (lambda t: t[lhs.name] + scale * t[rhs.name]), True
        only = lhs if ldep else rhs
        if self.env[only].shape != value.shape:  # broadcast against a constant: leave it to jvp
            return None
        if ldep:
            return (lambda t: t[lhs.name]), False  # the operand itself
        if self._owned(rhs, value):
            return (lambda t: t[rhs.name].mul_(scale)), True
        return (lambda t: scale * t[rhs.name]), True

    def _product_rule(self, n: fx.Node) -> Rule:
        lhs, rhs = n.args
        ldep, rdep = self._isdep(lhs), self._isdep(rhs)
        lval, rval = self._const(lhs), self._const(rhs)
        if ldep and rdep:
            return lambda t: t[lhs.name] * rval + lval * t[rhs.name]
        if ldep:
            return lambda t: t[lhs.name] * rval
        return lambda t: lval * t[rhs.name]

    def _linear_rule(self, n: fx.Node, override: dict | None = None) -> Rule:
        """Ops linear in their floating-point tensor arguments: the same op, constant ones zeroed."""
        fn = self._call(n)

        def const(a: fx.Node) -> Any:
            v = self.env[a]
            return torch.zeros_like(v) if isinstance(v, Tensor) and v.is_floating_point() else v

        dep: set[str] = set()
        consts: dict[str, Any] = {}

        def visit(a: fx.Node) -> fx.Node:
            if self._isdep(a):
                dep.add(a.name)
            else:
                consts[a.name] = const(a)
            return a

        args, kwargs = n.args, dict(n.kwargs) | (override or {})
        _map((args, kwargs), visit)

        def rule(t: dict) -> Any:
            pick = lambda a: t[a.name] if a.name in dep else consts[a.name]  # noqa: E731
            return fn(*_map(args, pick), **_map(kwargs, pick))

        return rule

    def _fallback_rule(self, n: fx.Node) -> Rule:
        """Any other op: ``jvp`` of this node alone at its recorded arguments."""
        fn, values, names = self._call(n), {}, []

        def visit(a: fx.Node) -> fx.Node:
            values[a.name] = self.env[a]
            if self._isdep(a) and a.name not in names:
                names.append(a.name)
            return a

        _map((n.args, n.kwargs), visit)
        primals = tuple(values[name].detach() for name in names)
        args, kwargs = n.args, n.kwargs

        def call(*tangent_inputs: Any) -> Any:
            sub = values | dict(zip(names, tangent_inputs))
            return fn(*_map(args, lambda a: sub[a.name]), **_map(kwargs, lambda a: sub[a.name]))

        def rule(t: dict) -> Any:
            try:
                return jvp(call, primals, tuple(t[name] for name in names))[1]
            except NotImplementedError as exc:  # e.g. nn.LSTM: torch has no forward-mode derivative
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                layer = n.meta.get("naflow.name", n.name)
                raise UnsupportedOpError(
                    f"layer {layer!r} ({n.format_node()}) has no forward-mode derivative in torch ({first}), so its "
                    "stage cannot be linearised. What to do: register an inverse rule for it "
                    "(@naflow_fx.rules.register_inverse), explain the layers before it "
                    "(compile_naflow(..., last_layer=<a layer before it>)), or use a model without this op"
                ) from None

        return rule


def linearize_graph(gm: fx.GraphModule, point: Tensor, *extras: Any) -> tuple[Any, Callable[[Tensor], Any]]:
    """``(gm(point, *extras), t ↦ J·t)`` with ``J`` the Jacobian of ``gm`` in its first input at ``point``.

    The other inputs (``extras``) are held at their values. ``J·t`` costs about one forward pass
    of the graph's linear part and no autograd. ``jvp_fn.kinds`` maps each input-dependent node to
    the rule it got (``"affine"``, ``"scale"``, ``"folded"``, ``"mask"``, ``"derivative"``,
    ``"sum"``, ``"product"``, ``"linear"`` or ``"jvp"``). ``jvp_fn.transposable`` says that
    ``torch.func.vjp(jvp_fn, zeros)`` gives the adjoint (no ``jvp`` fallback in it).

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> block = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()))
        >>> a, t = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
        >>> out, jvp_fn = linearize_graph(block, a)
        >>> torch.allclose(jvp_fn(t), torch.func.jvp(block, (a,), (t,))[1], atol=1e-6)
        True
        >>> sorted(jvp_fn.kinds.values())
        ['affine', 'mask']
    """
    lin = _Linearizer(gm)
    with torch.no_grad():
        out = lin.run(point.detach(), *extras)
    rules, template, first = lin.rules, lin.template, lin.first
    lin.env.clear()
    # Each tangent is dropped after the last rule that reads it (the outputs are kept).
    kept: set[str] = set()
    _map(gm.graph.output_node().args[0], lambda a: kept.add(a.name) or a)
    last: dict[str, int] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, (name, _) in enumerate(rules):
        for a in nodes[name].all_input_nodes:
            if a.name in lin.dep:
                last[a.name] = i
    drops: list[list[str]] = [[] for _ in rules]
    for name, i in last.items():
        if name not in kept:
            drops[i].append(name)

    def apply(t: Tensor) -> Any:
        tangents: dict[str, Any] = {first: t}
        for (name, rule), drop in zip(rules, drops, strict=True):
            tangents[name] = rule(tangents)
            for gone in drop:
                del tangents[gone]
        return _fill(template, tangents)

    apply.kinds = lin.kinds  # type: ignore[attr-defined]  # node → rule used, for inspection and tests
    # its vjp is the adjoint (NOTE [tangent program]) unless a rule is a jvp fallback
    apply.transposable = "jvp" not in lin.kinds.values()  # type: ignore[attr-defined]
    return out, apply

"""codegen: emit the recording forward and the inverse network as new ``torch.fx.GraphModule`` s.

The inverse network reads like hand-written PyTorch, one line per inverse op, named after the
forward node it inverts::

    def forward(self, solver, store):
        lam_features_3 = store.pop('lam_features_3')
        features_3 = store.pop('features_3')
        features_2 = store.pop('features_2')
        inv_features_3 = naflow_fx_rules_linear_conv2d_inverse(solver, features_3, features_2, ...,
                                                               layer = 'features.3')
        chain_features_3 = naflow_fx_passes_codegen_stage_coefficients(
            stage_features_3_coefficients, features_2, lam_features_3)
        lam_features_2 = chain_features_3[0]
        bpfm_features_2 = naflow_fx_rules_abandon(inv_features_3, lam_features_2)
        return ({'features.2': bpfm_features_2, 'features.3': features_3},
                {'features.2': lam_features_2, 'features.3': lam_features_3})

Its inputs are the solver context and a ``store`` dict holding the recorded forward values it
needs (named after their nodes) and the importance coefficients of the last feature layer N
(``lam_<N>``); every other Λ is chained from it stage by stage (NOTE [chained Λ]). Each input
is popped where first used, so the generated code frees it after its last use (NOTE [memory]
in ``api.py``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..rules import abandon
from ..rules.generic import elementwise_affine_inverse, linearized_inverse, region_inverse
from ..solvers.linearize import linearize_graph
from ..solvers.operator import jvp
from ..tracing import collectable, hookless
from .partition import Plan
from .shape_prop import layout

__all__ = [
    "InverseProgram",
    "emit_recorder",
    "emit_inverse",
    "extract_stage",
    "gradients",
    "stage_coefficients",
    "region_images",
    "layer_map",
]


@dataclass(frozen=True)
class InverseProgram:
    """The emitted inverse network and what to feed it."""

    module: fx.GraphModule
    activations: tuple[str, ...]  # forward node names fed as recorded values, in order
    coefficients: tuple[str, ...]  # forward node names whose Λ is fed as lam_<name>: N only
    steps: int = 0  # inverse steps (solver.step calls) per run


def emit_recorder(gm: fx.GraphModule, recorded_nodes: list[str]) -> fx.GraphModule:
    """A copy of the forward graph that returns ``(output, (value of each recorded node, ...))``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    graph.output((out, tuple(env[by_name[name]] for name in recorded_nodes)))
    return collectable(fx.GraphModule(gm, graph, class_name="NAFlowRecorder"))


def extract_stage(gm: fx.GraphModule, input_node: fx.Node, body: list[fx.Node], outputs: list[fx.Node]):
    """The stage ``input_node → outputs`` as a module ``f(x, *extras)``; returns ``(module, extras)``.

    ``extras`` are the forward nodes outside the stage that it reads (other than parameters).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {input_node: graph.placeholder("x")}
    extras: list[fx.Node] = []

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "get_attr":
                env[n] = graph.get_attr(n.target)
            else:
                env[n] = graph.placeholder(n.name)
                extras.append(n)
        return env[n]

    for n in body:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return hookless(collectable(fx.GraphModule(gm, graph, class_name="Stage"))), extras


# NOTE [chained Λ]
# The recording pass hands the inverse network Λ_N only. Each inverse step takes Λ_w of its
# stage's output and gets Λ_u of the stage input, and Λ_v of the requested nodes inside a region,
# from one forward and one backward through the stage at the recorded input:
# Λ_v = (∂a_w/∂a_v)ᵀ Λ_w. That is the chain rule, not an approximation: w is an articulation node,
# so every path from v or u to the score runs through w, and a stage's other inputs (extras) do
# not depend on the model input. The kernels and their inputs are those of one global backward, so
# the values are the same bit for bit (tested). Each Λ is made when the inverse reaches its stage
# and freed after its map and its abandoning mask, so a maps-only flow holds a few Λ at a time
# instead of one per layer (docs/naflow.md, decision 30).


def gradients(out: Tensor, points: list[Tensor], grad_out: Tensor | None = None) -> list[Tensor]:
    """``(∂out/∂p)ᵀ grad_out`` for each tensor ``p`` of the graph that made ``out``; zeros where ``out``
    does not depend on ``p`` (or ``p`` needs no gradient). One backward pass, down to ``points`` only.
    """
    wanted = [i for i, t in enumerate(points) if t.requires_grad]
    grads: list[Tensor | None] = [None] * len(points)
    if out.requires_grad and wanted:
        found = torch.autograd.grad(out, [points[i] for i in wanted], grad_out, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return [torch.zeros_like(t) if g is None else g for t, g in zip(points, grads)]


def stage_coefficients(stage: nn.Module, input: Tensor, coefficients_out: Tensor, *extras) -> tuple[Tensor, ...]:
    """``(Λ_u, Λ_v1, …)`` of a stage's input and inner nodes from its output's Λ_w (NOTE [chained Λ]).

    ``stage`` maps ``input`` to ``a_w`` or ``(a_w, a_v1, …)``; one forward and one backward.
    """
    with torch.enable_grad():
        x = input.detach().requires_grad_(True)
        out = stage(x, *extras)  # a hookless stage (extract_stage): no process-wide module hooks run on it
        out, inner = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        return tuple(gradients(out, [x, *inner], coefficients_out))


def region_images(inner: nn.Module, input: Tensor, bpfm_in: Tensor, *extras) -> tuple[Tensor, ...]:
    """``B_v = J_{u→v} B_u + θ_{u→v}`` for the region's inner nodes: one tangent pass from ``input``."""
    if isinstance(inner, fx.GraphModule):
        primal, jvp_fn = linearize_graph(inner, input, *extras)
        tangent = jvp_fn(bpfm_in - input)
    else:
        primal, tangent = jvp(lambda x: inner(x, *extras), (input,), (bpfm_in - input,))
    if isinstance(primal, Tensor):
        primal, tangent = (primal,), (tangent,)
    return tuple(p + t for p, t in zip(primal, tangent))


def _attr_path(name: str, taken: set[str]) -> str:
    """A fresh attribute name for the stage ending at layer ``name``: ``stage_<name>``, ``.`` and ``#``
    as ``_``, with its ``_coefficients`` and ``_inner`` variants reserved in ``taken`` too.

    Layers ``conv.1`` and ``conv_1`` would both be ``stage_conv_1``: the second gets a numbered
    suffix instead of replacing the first one's module.
    """
    base = "stage_" + re.sub(r"\W", "_", name)
    path, i = base, 1
    while any(p in taken for p in (path, path + "_coefficients", path + "_inner")):
        i += 1
        path = f"{base}_{i}"
    taken.update((path, path + "_coefficients", path + "_inner"))
    return path


def _not_pickled_alone(self: fx.GraphModule) -> None:
    """The generated networks are pickled with their NAFlow, which compiles them again when loaded.

    Pickled alone, ``torch.fx`` would save them and then fail to load them: it re-traces their code,
    which calls the solvers with symbolic values.
    """
    raise TypeError(
        f"the generated {type(self).__name__} network cannot be pickled on its own: pickle the NAFlow it belongs "
        "to instead (pickle.dumps(nf), torch.save(nf, path)), which compiles it again when loaded"
    )


class _Lazy(dict):
    """``d[key]`` builds its value with ``make(key)`` on first access."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> fx.Node:
        self[key] = self._make(key)
        return self[key]


def layer_map(bpfm: Tensor, coefficients: Tensor, *, dims: tuple[int, ...] | None, reduction: str) -> Tensor:
    """A layer's attention map from its BPFM and Λ (spec §1): ``ReLU(Σ_c Λ ⊙ B)`` or ``Σ_c ReLU(Λ ⊙ B)``.

    ``dims`` permutes a channels-last layer to NCHW first (NOTE [layouts]).
    """
    if dims is not None:
        bpfm, coefficients = bpfm.permute(dims), coefficients.permute(dims)
    prod = coefficients * bpfm
    return torch.relu(prod.sum(1)) if reduction == "sum_relu" else torch.relu(prod).sum(1)


def emit_inverse(gm: fx.GraphModule, requested: list[str], maps: str | None = None) -> InverseProgram:
    """Emit the inverse network from N down to the shallowest requested layer (node names).

    It returns ``({layer: BPFM}, {layer: Λ})``, every Λ chained from Λ_N stage by stage (NOTE
    [chained Λ]); with ``maps="sum_relu"`` or ``"relu_sum"`` it returns ``{layer: map}`` instead,
    each map computed as soon as its BPFM exists so that BPFMs and coefficients are freed as the
    network runs. Inputs come from one ``store`` dict (recorded values by node name, Λ_N as
    ``lam_<N>``), popped where first used.
    """
    plan: Plan = gm.meta["naflow.plan"]
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    layer = {n.name: n.meta.get("naflow.name", n.name) for n in gm.graph.nodes}
    requested = sorted(set(requested), key=order.__getitem__)
    shallowest = order[requested[0]] if requested else order[plan.last]
    root: dict[str, object] = {}
    taken = {str(n.target).partition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}  # copied into root

    # 1. Plan: which stages run, and which recorded values they read. Only Λ_N is fed; every
    # other Λ is chained stage by stage from it (NOTE [chained Λ]).
    steps = [nodes[s.output].meta["naflow.inverse"] for s in reversed(plan.stages) if order[s.output] > shallowest]
    acts: set[str] = {plan.last}
    calls: dict[str, tuple] = {}  # stage output -> (stage attr, extras, inner nodes, inner extras, Λ attr, Λ extras)
    for step in steps:
        s = step.stage
        w, u = nodes[s.output], nodes[s.input]
        body = [nodes[b] for b in s.body]
        path = _attr_path(layer[w.name], taken)
        inner = [nodes[b] for b in s.body[:-1] if b in requested]
        acts.add(u.name)
        extras: list[fx.Node] = []
        if step.kind != "rule":
            root[path], extras = extract_stage(gm, u, body, [w])
        # The stage module that gives Λ_u (and the inner Λ) by one backward: without inner nodes
        # it computes exactly what the solve's module does, so that one is reused.
        if step.kind == "rule" or inner:
            lam_path = path + "_coefficients"
            root[lam_path], lam_extras = extract_stage(gm, u, body, [w, *inner])
        else:
            lam_path, lam_extras = path, extras
        acts.update(e.name for e in lam_extras)
        if step.kind == "rule":
            acts.update(a.name for a in w.all_input_nodes if a.op != "get_attr")
            calls[w.name] = (path, [], inner, [], lam_path, lam_extras)
            continue
        inner_extras: list[fx.Node] = []
        if inner:
            root[path + "_inner"], inner_extras = extract_stage(gm, u, body, inner)
        acts.update(e.name for e in extras + inner_extras)
        calls[w.name] = (path, extras, inner, inner_extras, lam_path, lam_extras)

    graph = fx.Graph()
    solver = graph.placeholder("solver")
    store = graph.placeholder("store")
    act_order = tuple(sorted(acts, key=order.__getitem__))

    def take(key: str) -> fx.Node:
        """``store.pop(key)``, named after the key (``add_7 = store.pop('add_7')``)."""
        return graph.create_node("call_method", "pop", (store, key), name=key)

    # Each input is popped where it is first used (``_Lazy`` emits it once), so the generated
    # code frees it after its last use.
    value = _Lazy(take)
    lam = {plan.last: take(f"lam_{plan.last}")}
    bpfm: dict[str, fx.Node] = {}
    out_maps: dict[str, fx.Node] = {}
    wanted = set(requested)

    def set_bpfm(name: str, node: fx.Node) -> None:
        bpfm[name] = node
        if maps is not None and name in wanted:
            perm = layout(nodes[name])
            dims = None if perm == (0, 1, 2, 3) else tuple(sorted(range(4), key=perm.__getitem__))
            kwargs = {"dims": dims, "reduction": maps}
            out_maps[name] = graph.create_node(
                "call_function", layer_map, (node, lam[name]), kwargs, name=f"map_{name}"
            )

    set_bpfm(plan.last, value[plan.last])

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                root.setdefault(a.target, operator.attrgetter(a.target)(gm))
                return graph.get_attr(a.target)
            return value[a.name]
        if isinstance(a, (tuple, list)):
            return type(a)(arg(x) for x in a)
        return a

    # 2. Emit, deep to shallow: solve the stage, chain Λ through it, then abandon at its input.
    for step in steps:
        s = step.stage
        w, u = nodes[s.output], nodes[s.input]
        tag = {"layer": layer[w.name]}
        path, extras, inner, inner_extras, lam_path, lam_extras = calls[w.name]
        if step.kind == "rule":
            args = (solver, bpfm[w.name], value[u.name])
            kwargs = {k: arg(v) for k, v in w.kwargs.items()} | tag
            solved = graph.create_node("call_function", step.rule, args, kwargs, name=f"inv_{w.name}")
        else:
            fn = {"region": region_inverse, "affine": elementwise_affine_inverse}.get(step.kind, linearized_inverse)
            args = (solver, bpfm[w.name], graph.get_attr(path), value[u.name], *(value[e.name] for e in extras))
            solved = graph.create_node("call_function", fn, args, tag, name=f"inv_{w.name}")
        # After the solve, so that the solve holds only Λ_w, not Λ_u and the inner Λ.
        chained = graph.create_node(
            "call_function",
            stage_coefficients,
            (graph.get_attr(lam_path), value[u.name], lam[w.name]) + tuple(value[e.name] for e in lam_extras),
            name=f"chain_{w.name}",
        )
        for i, v in enumerate([u, *inner]):
            lam[v.name] = graph.create_node("call_function", operator.getitem, (chained, i), name=f"lam_{v.name}")
        if inner:
            images = graph.call_function(
                region_images,
                (graph.get_attr(path + "_inner"), value[u.name], solved, *(value[e.name] for e in inner_extras)),
            )
            for i, v in enumerate(inner):
                img = graph.call_function(operator.getitem, (images, i))
                set_bpfm(
                    v.name,
                    graph.create_node("call_function", abandon, (img, lam[v.name]), name=f"bpfm_{v.name}"),
                )
        if u.name != plan.input:
            set_bpfm(u.name, graph.create_node("call_function", abandon, (solved, lam[u.name]), name=f"bpfm_{u.name}"))

    if maps is None:
        graph.output(({layer[r]: bpfm[r] for r in requested}, {layer[r]: lam[r] for r in requested}))
    else:
        graph.output({layer[r]: out_maps[r] for r in requested})
    module = fx.GraphModule(root, graph, class_name="NAFlowInverse" if maps is None else "NAFlowMaps")
    for generated in module.modules():  # with the copies of the stages fx made for it
        if isinstance(generated, fx.GraphModule):
            collectable(generated)
    type(module).__reduce__ = _not_pickled_alone  # fx makes a class per GraphModule: this one only
    return InverseProgram(module, act_order, (plan.last,), len(steps))

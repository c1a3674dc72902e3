"""Stretches: maximal runs of convs found in an FX graph, with the residual bodies inside them
and, for depth compression, the element-wise activations between and after them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

import graphopt.algebra.conv_merge as algebra
from graphopt.fx.branches import conv_branch
from graphopt.fx.names import layer_path
from graphopt.fx.ops import is_add


def spec_of(gm: fx.GraphModule, node: fx.Node) -> algebra.ConvSpec | algebra.Refusal:
    """The conv ``node`` of ``gm`` (module or functional, constant weights) as a ConvSpec, or
    the refusal ``not-a-conv`` / ``padding-mode``."""
    branch = conv_branch(gm, node, single_use=False)
    if branch is None or branch.kind != "conv" or branch.pool:
        return algebra.Refusal("not-a-conv", f"{node.name} is not a conv with constant weights")
    if branch.padding_mode != "zeros":
        return algebra.Refusal("padding-mode", f"{node.name} pads with {branch.padding_mode!r}")
    return algebra.ConvSpec(
        branch.weight, branch.bias, branch.stride, branch.padding, branch.dilation, branch.groups
    )


@dataclass
class Stretch:
    """A run of convs: ``convs`` in order, ``values[p]`` the fx node holding position ``p``
    (``values[0]`` the input; the conv or residual add, before any activation),
    ``residuals`` as ``(a, b, add)`` -- the add after conv index ``b`` (0-based) adds position
    ``a`` --, and ``acts[p]`` the element-wise activation applied to position ``p`` (only when
    the stretch was found through activations, for depth compression; exact-mode stretches
    are activation-free)."""

    convs: list[fx.Node]
    specs: list[algebra.ConvSpec]
    values: list[fx.Node]
    residuals: list[tuple[int, int, fx.Node]] = field(default_factory=list)
    acts: dict[int, fx.Node] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.convs)

    @property
    def name(self) -> str:  # the stretch's key among the graph's stretches
        return f"{self.convs[0].name}..{self.convs[-1].name}"

    @property
    def label(self) -> str:  # how reports name it: module paths, ``features.0.0..features.18.0``
        return f"{layer_path(self.convs[0])}..{layer_path(self.convs[-1])}"


def _conv_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    branch = conv_branch(gm, node, single_use=False)
    return branch.input if branch is not None and isinstance(branch.input, fx.Node) else None


def value_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


_ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
)
_ACT_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.silu,
    F.gelu,
    F.hardswish,
    F.mish,
}
_ACT_METHODS = {"relu", "relu_"}


def activation_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of ``node`` when it is an element-wise activation between convs (a ReLU-like
    module, function or method with one tensor argument), else None."""
    if node.op == "call_module":
        found = isinstance(gm.get_submodule(str(node.target)), _ACT_MODULES)
    elif node.op == "call_function":
        found = node.target in _ACT_FUNCTIONS
    elif node.op == "call_method":
        found = node.target in _ACT_METHODS
    else:
        found = False
    if not found or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return None
    return node.args[0]


def _residual_body(
    gm: fx.GraphModule,
    add: fx.Node,
    convs: dict[fx.Node, tuple[algebra.ConvSpec, fx.Node]],
    through_activations: bool,
) -> tuple[fx.Node, list[fx.Node]] | None:
    """``add`` as ``x + c_1(..c_k(x))`` with single-use convs (and, through activations,
    single-use activations between them): (x, [c_1..c_k]), else None."""
    if not is_add(add) or not all(isinstance(a, fx.Node) for a in add.args):
        return None
    for x, y in (add.args, add.args[::-1]):
        body, node = [], y
        while node in convs and len(node.users) == 1 and node not in body:
            body.append(node)
            node = convs[node][1]
            if node is x:
                if value_shape(x) is None or value_shape(x) != value_shape(add):
                    break  # broadcasting add: not x + f(x) of one shape
                return x, body[::-1]
            inner = activation_input(gm, node) if through_activations else None
            if inner is not None and len(node.users) == 1:
                node = inner
    return None


def find_stretches(
    gm: fx.GraphModule, through_activations: bool = False
) -> tuple[list[Stretch], Counter]:
    """The stretches of ``gm`` (with at least two convs or one residual body), and refusals of
    convs that spec_of cannot read (``skipped:padding-mode``), by reason.

    ``through_activations``: a stretch continues through an element-wise activation between
    two convs (recorded in ``Stretch.acts``), as depth compression needs; the activation
    after a stretch's last position is recorded too.
    """
    stats: Counter = Counter()
    convs: dict[fx.Node, tuple[algebra.ConvSpec, fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function"):
            continue
        spec = spec_of(gm, node)
        if isinstance(spec, algebra.Refusal):
            if spec.reason != "not-a-conv":
                stats[f"skipped:{spec.reason}"] += 1
            continue
        source = _conv_input(gm, node)
        if source is not None:
            convs[node] = (spec, source)
    # the chain graph: an edge u -> v where v continues the linear stretch ending at u
    chain = nx.DiGraph()
    chain.add_nodes_from(convs)
    bodies: dict[fx.Node, tuple[fx.Node, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        found = (
            _residual_body(gm, node, convs, through_activations)
            if node.op == "call_function"
            else None
        )
        if found is not None:
            bodies[node] = found
            chain.add_edge(found[1][-1], node)
    after: dict[fx.Node, fx.Node] = {}  # a stretch value -> the activation applied to it
    for c, (_, source) in convs.items():
        users = set(source.users)
        body_from_here = [a for a, (x, body) in bodies.items() if x is source and body[0] is c]
        value = source
        inner = activation_input(gm, source) if through_activations else None
        if inner is not None and len(inner.users) == 1:
            value = inner
        linear_source = value in convs or value in bodies
        if linear_source and (users == {c} or (body_from_here and users == {c, *body_from_here})):
            chain.add_edge(value, c)
            if value is not source:
                after[value] = source
    if through_activations:  # the activation after a stretch's end
        for value in list(convs) + list(bodies):
            users = list(value.users)
            if value not in after and len(users) == 1 and activation_input(gm, users[0]):
                after[value] = users[0]
    stretches = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for component in nx.weakly_connected_components(chain):
        nodes = sorted(component, key=order.__getitem__)
        if nodes[0] not in convs:
            continue
        path = list(nx.topological_sort(chain.subgraph(nodes)))
        stretch = Stretch([], [], [convs[path[0]][1]])
        for node in path:
            if node in convs:
                stretch.convs.append(node)
                stretch.specs.append(convs[node][0])
                stretch.values.append(node)
            else:  # a residual add: it closes the body that starts at its x
                x, body = bodies[node]
                b = len(stretch.convs) - 1
                stretch.residuals.append((b - len(body) + 1, b, node))
                stretch.values[-1] = node
            if node in after:
                stretch.acts[len(stretch.convs)] = after[node]
        if stretch.length >= 2 or stretch.residuals:
            stretches.append(stretch)
    stretches.sort(key=lambda s: order[s.convs[0]])
    return stretches, stats

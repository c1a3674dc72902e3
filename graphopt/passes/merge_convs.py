"""merge-convs: consecutive convolutions with nothing non-linear between them merged into one,
where the merged conv is measured faster on the target (exact mode of Kim et al., ICML 2023).

A *stretch* is a maximal run of convs ``c_1 .. c_L`` (module or functional, constant weights)
where each conv's output is used only by the next, plus residual bodies ``x + c_a(..c_b(x))``
whose convs all lie in the run (the add continues the stretch). Position ``p`` is the value
after conv ``p`` (after the add where a residual ends there), position 0 the stretch's input. A
span ``(i, j]`` -- convs ``i+1..j`` -- becomes one conv by :func:`graphopt.merge_algebra.merge`
(float64, cast back to the graph's dtype)::

    k = k1 + (k2 - 1)*s1    s = s1*s2    p = p1 + p2*s1    W = W2 * W1    b = b2 + W2 . b1
    x + body(x)             -> +1 at the centre tap (the residual folded, the add removed)

A span must hold a residual body whole, or lie inside it; a span that is exactly a body is
timed both with the residual folded and with the add kept after the merged conv.

Every single conv and every mergeable span is timed on the target's backend
(``PassContext.backend``, default ONNX Runtime on ``PassContext.target``) as a one-conv model at
its real input shape (from ``tensor_meta``), with the residual add in the unit where the add
stays in the graph, so the sum over single convs is the stretch as it is now. All of a stretch's
units are timed interleaved in one run (``time_interleaved``), each median stored in the latency
cache under the unit's structure (conv hyper-parameters, shapes, dtype, backend, version,
settings): identical units are timed once and a second run measures nothing.

Stage 1 of the dynamic program (:func:`graphopt.merge_plan.plan_exact`) then splits each
stretch::

    T_opt(i, j) = min( T'(i, j),  min_{i<k<j} T_opt(i, k) + T'(k, j) )

with ``T' = T * min_speedup`` for merged spans, ``T' = T`` for single convs: a merged span is
chosen only when it beats every other split by the factor ``min_speedup`` (and strictly, ties
go to fewer merges), so the pass never makes a stretch slower on the target by its own
measurements. :func:`plan_stretch` decides from the numbers alone; :func:`apply` only mutates.

``PassResult.decisions`` holds one :class:`StretchPlan` per stretch: convs, the chosen spans,
predicted against unmerged latency, every candidate's latency and every refusal with its reason.

Statistics: ``merged-spans``, ``convs-removed``, ``residuals-folded``, ``timed-units``;
``skipped:<reason>`` per refused candidate span (``padding``, ``bias-at-padding``,
``residual-shape``, ``residual-centre``, ``kernel-size`` -- see :mod:`graphopt.merge_algebra`)
and per stretch left as it is: ``not-faster`` (no merge measured faster), ``all-refused``
(every merge refused; nothing is timed), ``target-not-measurable`` (a phone without an RPC
device), ``no-shape`` (no ``tensor_meta``), ``dtype`` (not floating point); per conv
``padding-mode`` (not zero padding, never part of a stretch).

Not handled: activations between convs (exact mode keeps them; a stretch ends there), a conv
whose output has other users inside a stretch, residual bodies that contain another residual
or a non-conv op, BatchNorm between convs (run ``fold-conv-bn`` first), ConvTranspose,
non-zero padding modes and string padding.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

import graphopt.merge_algebra as algebra
from graphopt.backends.measure import UnitTimer, backend_for, cache_for, measurable
from graphopt.errors import InputError, PipelineError
from graphopt.merge_plan import plan_exact
from graphopt.pass_manager import Numerics, Pass, PassContext, PassResult
from graphopt.passes import merge_depth as depth
from graphopt.passes._tensors import grad_enabled
from graphopt.passes.reparameterize import _conv_branch, _free_name, _is_add
from graphopt.pipeline import register_pass
from graphopt.report import Progress

log = logging.getLogger(__name__)

_UNIT_VERSION = "merge-convs/1"  # bump when a unit's exported form changes


# ------------------------------------------------------------------------------------------------
# finding stretches


def spec_of(gm: fx.GraphModule, node: fx.Node) -> algebra.ConvSpec | algebra.Refusal:
    """The conv ``node`` of ``gm`` (module or functional, constant weights) as a ConvSpec, or
    the refusal ``not-a-conv`` / ``padding-mode``."""
    branch = _conv_branch(gm, node, single_use=False)
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
    def name(self) -> str:
        return f"{self.convs[0].name}..{self.convs[-1].name}"


def _conv_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    branch = _conv_branch(gm, node, single_use=False)
    return branch.input if branch is not None and isinstance(branch.input, fx.Node) else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
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
    if not _is_add(add) or not all(isinstance(a, fx.Node) for a in add.args):
        return None
    for x, y in (add.args, add.args[::-1]):
        body, node = [], y
        while node in convs and len(node.users) == 1 and node not in body:
            body.append(node)
            node = convs[node][1]
            if node is x:
                if _shape(x) is None or _shape(x) != _shape(add):
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


# ------------------------------------------------------------------------------------------------
# candidate spans


@dataclass(frozen=True)
class Candidate:
    """One way to compute span ``(i, j]`` as one conv: ``folded`` residual adds inside it,
    ``keeps_add``: the unit ends in the residual add that stays in the graph. ``latency_ms`` is
    the measured median (None until timed); ``refusal`` why the merge algebra refused it."""

    i: int
    j: int
    folded: int = 0
    keeps_add: bool = False
    latency_ms: float | None = None
    refusal: algebra.Refusal | None = None

    @property
    def merges(self) -> bool:
        return self.j - self.i > 1 or self.folded > 0

    @property
    def label(self) -> str:
        convs = f"conv {self.j}" if self.j - self.i == 1 else f"convs {self.i + 1}..{self.j}"
        extra = " +residual" * self.folded + (" then add" if self.keeps_add else "")
        return convs + extra

    def __str__(self) -> str:
        if self.refusal is not None:
            return f"{self.label}: refused {self.refusal}"
        t = f"{self.latency_ms:.4f} ms" if self.latency_ms is not None else "not timed"
        return f"{self.label}: {t}"


def _span_kind(stretch: Stretch, i: int, j: int) -> tuple[str, list[tuple[int, int]]]:
    """("invalid" | "plain" | "exact-body" | "ends-at-add", residuals folded inside)."""
    folded, kind = [], "plain"
    for a, b, _ in stretch.residuals:
        lo, hi = a, b + 1  # the body is span (a, b+1]
        if i == lo and j == hi:
            kind = "exact-body"
        elif i <= lo and hi <= j:
            folded.append((a, b))
        elif lo <= i and j <= hi:
            if j == hi:
                kind = "ends-at-add"
        elif j <= lo or hi <= i:
            continue
        else:
            return "invalid", []
    return kind, folded


def merge_specs(
    specs: list[algebra.ConvSpec],
    bodies: list[tuple[int, int]],
    max_kernel: int,
    move_padding: bool = False,
) -> algebra.ConvSpec | algebra.Refusal:
    """``specs`` (applied in order) as one conv, the residual ``bodies`` ``(a, b)`` -- convs
    ``a..b`` (0-based, whole) with ``x + body(x)`` around them -- folded in."""
    parts: list[algebra.ConvSpec] = []
    k = 0
    for a, b in sorted(bodies):
        parts.extend(specs[k:a])
        body = algebra.merge(
            specs[a : b + 1], residual=True, max_kernel=max_kernel, move_padding=move_padding
        )
        if isinstance(body, algebra.Refusal):
            return algebra.Refusal(body.reason, body.detail, body.position + a)
        parts.append(body)
        k = b + 1
    parts.extend(specs[k:])
    if len(parts) == 1:
        return parts[0]
    return algebra.merge(parts, max_kernel=max_kernel, move_padding=move_padding)


def _merge_span(
    stretch: Stretch,
    i: int,
    j: int,
    folded: list[tuple[int, int]],
    max_kernel: int,
    move_padding: bool = False,
) -> algebra.ConvSpec | algebra.Refusal:
    """Convs ``i+1..j`` as one conv, the residuals ``folded`` (whole bodies) folded in."""
    relative = [(a - i, b - i) for a, b in folded]
    return merge_specs(stretch.specs[i:j], relative, max_kernel, move_padding)


def candidates(
    stretch: Stretch, max_kernel: int, max_span: int, move_padding: bool = False
) -> list[tuple[Candidate, algebra.ConvSpec | None]]:
    """Every single conv and every span of at most ``max_span`` convs, with its merged conv
    (None for a refused one). ``move_padding``: depth compression's padding moved to the
    span's first conv (see :mod:`graphopt.merge_algebra`)."""
    out: list[tuple[Candidate, algebra.ConvSpec | None]] = []
    for i in range(stretch.length):
        for j in range(i + 1, min(stretch.length, i + max_span) + 1):
            kind, folded = _span_kind(stretch, i, j)
            if kind == "invalid":
                continue
            variants = [(folded, kind == "ends-at-add")]
            if kind == "exact-body":  # fold the add, or keep it after the merged body
                body = next((a, b) for a, b, _ in stretch.residuals if a == i and b + 1 == j)
                variants = [([*folded, body], False), (folded, True)]
            for fold, keeps_add in variants:
                spec = _merge_span(stretch, i, j, fold, max_kernel, move_padding)
                cand = Candidate(i, j, len(fold), keeps_add)
                if isinstance(spec, algebra.Refusal):
                    out.append((Candidate(i, j, len(fold), keeps_add, refusal=spec), None))
                else:
                    out.append((cand, spec))
    return out


# ------------------------------------------------------------------------------------------------
# deciding: pure


@dataclass
class StretchPlan:
    """What was decided for one stretch: its candidates, the chosen spans (one candidate per
    span of the partition), predicted and unmerged latency, or why nothing merges."""

    stretch: str
    convs: tuple[str, ...]
    input_shape: tuple[int, ...]
    candidates: list[Candidate] = field(default_factory=list)
    chosen: list[Candidate] = field(default_factory=list)
    predicted_ms: float | None = None
    unmerged_ms: float | None = None
    reason: str = ""

    @property
    def merged(self) -> list[Candidate]:
        return [c for c in self.chosen if c.merges]

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        head = f"stretch {self.stretch} [{len(self.convs)} convs, input {shape}]"
        if self.merged:
            spans = ", ".join(c.label for c in self.merged)
            verdict = (
                f"merged {spans}: predicted {self.predicted_ms:.4f} ms against "
                f"{self.unmerged_ms:.4f} ms unmerged ({self.unmerged_ms / self.predicted_ms:.2f}x)"
            )
        else:
            unmerged = f"{self.unmerged_ms:.4f} ms" if self.unmerged_ms is not None else "untimed"
            verdict = f"left as it is ({self.reason}); unmerged {unmerged}"
        tried = "; ".join(str(c) for c in self.candidates if c.merges)
        return f"{head}: {verdict}" + (f"  [candidates: {tried}]" if tried else "")


def plan_stretch(layer: StretchPlan, length: int, min_speedup: float) -> StretchPlan:
    """Choose the spans of one stretch from the timed candidates (pure; fills ``chosen``).

    Merged spans enter stage 1 at ``latency * min_speedup``, singles at their latency; the
    residual variants of a span compete as one entry (the faster after that scaling).
    """
    best: dict[tuple[int, int], tuple[float, Candidate]] = {}
    for c in layer.candidates:
        if c.refusal is not None or c.latency_ms is None:
            continue
        t = c.latency_ms * (min_speedup if c.merges else 1.0)
        if (c.i, c.j) not in best or t < best[c.i, c.j][0]:
            best[c.i, c.j] = (t, c)
    singles = [best.get((k, k + 1)) for k in range(length)]
    singles_plain = [
        next(
            (
                c
                for c in layer.candidates
                if (c.i, c.j) == (k, k + 1) and not c.merges and c.latency_ms is not None
            ),
            None,
        )
        for k in range(length)
    ]
    if any(s is None for s in singles_plain):
        return _replace(layer, chosen=[], reason="not-measured")
    layer = _replace(layer, unmerged_ms=sum(s.latency_ms for s in singles_plain))
    if any(s is None for s in singles):
        return _replace(layer, chosen=[], reason="not-measured")
    if not any(c.merges for _, c in best.values()):  # every merge refused by the algebra
        return _replace(
            layer, chosen=singles_plain, predicted_ms=layer.unmerged_ms, reason="all-refused"
        )
    plan = plan_exact(length, {k: t for k, (t, _) in best.items()}, [])
    chosen = [best[span][1] for span in plan.spans]
    predicted = sum(c.latency_ms for c in chosen)
    if not any(c.merges for c in chosen):
        chosen = singles_plain
        return _replace(layer, chosen=chosen, predicted_ms=layer.unmerged_ms, reason="not-faster")
    return _replace(layer, chosen=chosen, predicted_ms=predicted, reason="")


def _replace(layer: StretchPlan, **values: Any) -> StretchPlan:
    return dataclasses.replace(layer, **values)


# ------------------------------------------------------------------------------------------------
# measuring


class _Unit(nn.Module):
    """A conv as the backend times it; with ``add``, followed by the residual add; with
    ``act``, followed by the activation (depth compression times each span with the
    activation after it, which the backend fuses into the conv)."""

    def __init__(self, conv: nn.Module, add: bool, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.add = add
        self.act = act

    def forward(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y + residual[0] if self.add else y
        return self.act(y) if self.act is not None else y


def _conv_module(spec: algebra.ConvSpec, dtype: torch.dtype) -> nn.Module:
    return spec.module(dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# rewriting


def folded_bodies(stretch: Stretch, cand: Candidate) -> list[tuple[int, int, fx.Node]]:
    """The residuals ``(a, b, add)`` of ``stretch`` that ``cand`` folds into its conv."""
    return [
        (a, b, add)
        for a, b, add in stretch.residuals
        if cand.i <= a
        and b + 1 <= cand.j
        and not (cand.keeps_add and (a, b + 1) == (cand.i, cand.j))
    ]


def apply(
    gm: fx.GraphModule,
    stretch: Stretch,
    cand: Candidate,
    module: nn.Module,
    source: fx.Node | None = None,
) -> fx.Node:
    """Put ``module`` (one conv, or depth compression's fine-tunable span) in place of the
    merged span ``cand`` of ``stretch`` (the only mutation of the pass): it reads ``source``
    (default: position ``i``) and replaces position ``j``'s value (the add where the span
    folds the residual that ends there). Returns the new node."""
    name = _free_name(gm, "merged_conv")
    gm.add_submodule(name, module)
    folded = folded_bodies(stretch, cand)
    ends_at_fold = any(b + 1 == cand.j for _, b, _ in folded)
    old = stretch.values[cand.j] if ends_at_fold else stretch.convs[cand.j - 1]
    with gm.graph.inserting_before(old):
        new = gm.graph.call_module(name, (source or stretch.values[cand.i],))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    if stretch.values[cand.j] is old:  # a later span of this stretch reads the new conv
        stretch.values[cand.j] = new
    _erase(gm, [add for _, _, add in folded] + stretch.convs[cand.i : cand.j])
    return new


def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (and get_attr inputs left unused), last first."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(nodes, key=lambda n: -order[n]):
        if node.users:
            continue
        inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for attr in inputs:
            if not attr.users:
                gm.graph.erase_node(attr)


# ------------------------------------------------------------------------------------------------
# the pass


@register_pass
class MergeConvs(Pass):
    """Merge runs of convolutions with nothing non-linear between them where the merged conv is
    measured faster on the target (see the module docstring).

    >>> PassManager("fold-conv-bn,merge-convs{max_kernel=7}").run(gm, ctx)
    >>> print("\\n".join(map(str, result.decisions)))      # why each stretch merged or not
    """

    name = "merge-convs"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        max_kernel: int = 7  # merged kernels larger than this are refused (kernel-size)
        max_span: int = 4  # at most this many convs merged into one
        min_speedup: float = 1.05  # unmerged / merged latency needed to keep a merge
        runs: int = 30  # timed calls per unit
        max_time_s: float = 20.0  # time budget of one stretch's interleaved timing
        cache: bool = True  # reuse (and store) latencies in the on-disk cache
        progress: bool = False  # progress lines and a bar on stderr while measuring
        # depth compression (remove activations): a budget turns it on
        budget: float = 0.0  # the model's latency times this (0 < budget <= 1)
        budget_ms: float = 0.0  # or the model's latency in ms on the target
        importance_batches: int = 4  # calibration batches the importance is measured on
        resolution: int = 1000  # time bins of the budget in the dynamic program
        min_cosine: float = 0.5  # the declared contract of depth compression (output cosine)
        validate_rounds: int = 3  # plans measured whole; a miss re-plans under a smaller budget

    def __init__(
        self,
        options: Any = None,
        *,
        finetune: Callable[[fx.GraphModule], Any] | None = None,
        metric: Callable[[Callable[..., Any]], float] | None = None,
        **values: Any,
    ) -> None:
        super().__init__(options, **values)
        o = self.options
        if o.max_kernel < 1 or o.max_span < 2 or o.runs < 1 or o.min_speedup < 1.0:
            raise PipelineError(
                "merge-convs: max_kernel and runs must be >= 1, max_span >= 2 and "
                f"min_speedup >= 1.0; got {o}."
            )
        if not 0.0 <= o.budget <= 1.0 or o.budget_ms < 0 or (o.budget and o.budget_ms):
            raise PipelineError(
                "merge-convs: give budget as a fraction of the model's latency (0 < budget <= 1)"
                f" or budget_ms as a latency in ms, not both; got budget={o.budget}, "
                f"budget_ms={o.budget_ms}."
            )
        if o.importance_batches < 1 or o.resolution < 10:
            raise PipelineError(
                "merge-convs: importance_batches must be >= 1 and resolution >= 10; "
                f"got {o.importance_batches}, {o.resolution}."
            )
        self.finetune = finetune
        self.metric = metric
        if self.depth:
            self.numerics = Numerics.lossy("cosine", o.min_cosine)

    @property
    def depth(self) -> bool:
        """Depth compression (a budget given) rather than the exact mode."""
        return bool(self.options.budget or self.options.budget_ms)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        stretches, stats = find_stretches(gm, through_activations=self.depth)
        if not stretches:
            return PassResult(gm, modified=False, stats=+stats)
        backend = backend_for(ctx)
        if not measurable(backend):  # a phone is timed only through its RPC device
            stats["skipped:target-not-measurable"] += len(stretches)
            return PassResult(gm, modified=False, stats=+stats)
        cache = cache_for(ctx, backend) if opts.cache else None
        timer = UnitTimer(
            backend,
            cache,
            runs=opts.runs,
            max_time_s=opts.max_time_s,
            progress=opts.progress,
            name="merge-convs",
        )
        say = Progress(opts.progress, prefix="merge-convs ")
        if self.depth:
            return self._run_depth(gm, ctx, stretches, stats, timer, say)
        decisions: list[StretchPlan] = []
        rewrites: list[tuple[Stretch, Candidate, algebra.ConvSpec]] = []
        for n, stretch in enumerate(stretches, start=1):
            say(f"stretch {n}/{len(stretches)}: {stretch.name} ({stretch.length} convs)")
            layer, specs = self._timed(stretch, timer, stats, gm)
            if not layer.reason:
                layer = plan_stretch(layer, stretch.length, opts.min_speedup)
                if layer.reason:
                    stats[f"skipped:{layer.reason}"] += 1
            decisions.append(layer)
            log.info("merge-convs: %s", layer)
            for cand in layer.merged:
                rewrites.append((stretch, cand, specs[cand]))
        for stretch, cand, spec in rewrites:
            dtype = stretch.values[cand.i].meta["tensor_meta"].dtype
            apply(gm, stretch, cand, _conv_module(spec, dtype))
            stats["merged-spans"] += 1
            stats["convs-removed"] += cand.j - cand.i - 1
            stats["residuals-folded"] += cand.folded
        if timer.measured:
            stats["timed-units"] += timer.measured
        if rewrites:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=bool(rewrites), stats=+stats, decisions=list(decisions))

    def _timed(
        self, stretch: Stretch, timer: UnitTimer, stats: Counter, gm: fx.GraphModule
    ) -> tuple[StretchPlan, dict[Candidate, algebra.ConvSpec]]:
        """The stretch's candidates, timed (``layer.reason`` says why nothing was timed). In
        depth mode padding moves to each span's first conv and every unit ends in the
        activation after its last position."""
        opts = self.options
        shape = _shape(stretch.values[0])
        layer = StretchPlan(stretch.name, tuple(c.name for c in stretch.convs), shape or ())
        meta = stretch.values[0].meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if shape is None or any(_shape(v) is None for v in stretch.values):
            layer.reason = "no-shape"
            stats["skipped:no-shape"] += 1
            return layer, {}
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            layer.reason = "dtype"
            stats["skipped:dtype"] += 1
            return layer, {}
        built = candidates(stretch, opts.max_kernel, opts.max_span, move_padding=self.depth)
        for cand, spec in built:
            if spec is None:
                stats[f"skipped:{cand.refusal.reason}"] += 1
        if not any(spec is not None and cand.merges for cand, spec in built):
            layer.candidates = [cand for cand, _ in built]  # nothing to time: all refused
            layer.reason = "all-refused"
            stats["skipped:all-refused"] += 1
            if not self.depth:
                return layer, {}
        units: dict[str, tuple[_Unit, list[tuple[int, ...]]]] = {}
        keys: dict[int, str] = {}
        for n, (cand, spec) in enumerate(built):
            if spec is None:
                continue
            act = stretch.acts.get(cand.j) if self.depth else None
            unit = _Unit(
                _conv_module(spec, dtype),
                cand.keeps_add,
                _activation_module(gm, act) if act is not None else None,
            )
            shapes = [_shape(stretch.values[cand.i])]
            if cand.keeps_add:
                a = next(a for a, b, _ in stretch.residuals if b + 1 == cand.j)
                shapes.append(_shape(stretch.values[a]))
            keys[n] = timer.key(
                unit=_UNIT_VERSION,
                module=repr(unit.conv),
                add=unit.add,
                act=repr(unit.act) if unit.act is not None else None,
                shapes=[list(s) for s in shapes],
                dtype=str(dtype),
            )
            units.setdefault(keys[n], (unit, shapes))
        latencies = timer.latencies(units, dtype)
        timed, specs = [], {}
        for n, (cand, spec) in enumerate(built):
            if n in keys:
                cand = Candidate(
                    cand.i, cand.j, cand.folded, cand.keeps_add, latencies[keys[n]].median_ms
                )
                specs[cand] = spec
            timed.append(cand)
        layer.candidates = timed
        return layer, specs

    # --------------------------------------------------------------------------------------------
    # depth compression

    def _run_depth(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        stretches: list[Stretch],
        stats: Counter,
        timer: UnitTimer,
        say: Progress,
    ) -> PassResult:
        opts = self.options
        metric = self.metric or ctx.metric
        batches = list(itertools.islice(_input_batches(ctx), opts.importance_batches))
        if not batches:
            stats["skipped:no-calibration-data"] += len(stretches)
            return PassResult(gm, modified=False, stats=+stats)
        before = copy.deepcopy(gm)
        # tables: T over the stretches numbered end to end
        usable: list[tuple[Stretch, StretchPlan, dict[Candidate, algebra.ConvSpec]]] = []
        for n, stretch in enumerate(stretches, start=1):
            say(f"timing stretch {n}/{len(stretches)}: {stretch.name} ({stretch.length} convs)")
            layer, specs = self._timed(stretch, timer, stats, gm)
            if layer.reason and layer.reason != "all-refused":
                continue
            usable.append((stretch, layer, specs))
        if not usable:
            return PassResult(gm, modified=False, stats=+stats)
        chain = depth.Chain.of([s for s, _, _ in usable])
        table: dict[tuple[int, int], float] = {}
        best: dict[tuple[int, int], Candidate] = {}
        for (_, layer, _), off in zip(usable, chain.offsets, strict=True):
            for c in layer.candidates:
                if c.refusal is None and c.latency_ms is not None:
                    span = (off + c.i, off + c.j)
                    if span not in table or c.latency_ms < table[span]:
                        table[span], best[span] = c.latency_ms, c
        unmerged = sum(table[k, k + 1] for k in range(chain.length) if (k, k + 1) in table)
        if any((k, k + 1) not in table for k in range(chain.length)):
            raise InputError("merge-convs: a single conv could not be timed; see the log")
        inputs = _traced_inputs(gm) or tuple(ctx.sample_inputs or batches[0])
        model_ms = depth.model_latency(timer, {"model": gm}, inputs)["model"].median_ms
        target_ms = opts.budget * model_ms if opts.budget else opts.budget_ms
        # the model is predicted as scale * sum(T): units timed alone leave out what the whole
        # graph adds around them (layout changes, the head), and that grows with the units
        scale = model_ms / unmerged
        result = depth.DepthPlan(
            budget_ms=target_ms, model_ms=model_ms, scale=scale, unmerged_ms=unmerged
        )
        say(f"importance on {len(batches)} calibration batches")
        importance = depth.Importance(gm, chain.acts(), batches, metric)
        h = depth.importance_table(chain, table, importance, say)
        result.importance_source = (
            f"metric {getattr(metric, '__name__', 'callable')}" if metric else "output error"
        )
        result.evaluated_sets = importance.evaluated
        result.refusals = dict(
            Counter(
                c.refusal.reason
                for _, layer, _ in usable
                for c in layer.candidates
                if c.refusal is not None
            )
        )
        # plan, then measure the merged architecture whole; where it misses the budget, plan
        # again under a budget shrunk by the miss (algorithms.md §6.2: validate end to end)
        fraction = target_ms / model_ms
        acts = set(chain.acts())

        def planned(budget_ms: float) -> Any:
            start = time.perf_counter()
            try:
                return depth.plan_depth(chain.length, table, h, acts, budget_ms, opts.resolution)
            finally:
                result.planning_s += time.perf_counter() - start

        trial_plan = planned(target_ms / scale)
        chosen, best_ratio = trial_plan, math.inf
        for attempt in range(1, opts.validate_rounds + 1):
            trial = copy.deepcopy(before)
            trial_stretches = self._aligned(trial, usable)
            self._realize(trial, trial_stretches, usable, best, trial_plan, None)
            measured = depth.model_latency(timer, {"before": before, "after": trial}, inputs)
            ratio = measured["after"].median_ms / measured["before"].median_ms
            say(
                f"plan {attempt}: predicted {trial_plan.latency * scale:.4f} ms, measured "
                f"{ratio:.3f} x the model (budget {fraction:.3f})"
            )
            result.attempts.append((trial_plan.latency * scale, measured["after"].median_ms, ratio))
            if ratio < best_ratio:
                chosen, best_ratio = trial_plan, ratio
                result.measured_before_ms = measured["before"].median_ms
                result.measured_after_ms = measured["after"].median_ms
            if ratio <= fraction or attempt == opts.validate_rounds:
                break
            try:
                trial_plan = planned(trial_plan.latency * fraction / ratio)
            except InputError:
                break  # nothing faster can be planned
        result.importance = float(chosen.objective or 0.0)
        result.predicted_ms = chosen.latency
        if best_ratio >= 1.0:  # every plan measured no faster than the model: leave it
            result.reason = "not-faster"
            stats["skipped:not-faster"] += 1
            if timer.measured:
                stats["timed-units"] += timer.measured
            return PassResult(gm, modified=False, stats=+stats, decisions=[result])
        nodes = chain.acts()
        result.kept = [nodes[p].name for p in chosen.activations]
        result.removed = [nodes[p].name for p in chosen.removed]
        # the architecture: activations removed, spans in their fine-tunable form
        spans = self._realize(gm, [s for s, _, _ in usable], usable, best, chosen, result)
        stats["activations-removed"] += len(chosen.removed)
        stats["merged-spans"] += len(result.spans)
        for vi, vj in chosen.spans:
            cand = best[vi, vj]
            if cand.merges:
                stats["convs-removed"] += cand.j - cand.i - 1
                stats["residuals-folded"] += cand.folded
        finetune = self.finetune or ctx.finetune
        if finetune is not None:
            say(f"fine-tuning with {getattr(finetune, '__name__', finetune)!s}")
            with grad_enabled():
                returned = finetune(gm)
            if isinstance(returned, fx.GraphModule) and returned is not gm:
                gm = returned
            gm.eval()
            result.finetuned = str(getattr(finetune, "__name__", finetune))
            stats["finetuned"] += 1
        for name, module in spans:  # the final merge: each span becomes its one conv
            dtype = module.convs[0].weight.dtype
            gm.add_submodule(name, _conv_module(module.spec(), dtype))
        gm.delete_all_unused_submodules()
        gm.recompile()
        if timer.measured:
            stats["timed-units"] += timer.measured
        log.info("merge-convs: %s", result)
        return PassResult(gm, modified=True, stats=+stats, decisions=[result])

    def _aligned(self, gm: fx.GraphModule, usable: list[tuple[Stretch, Any, Any]]) -> list[Stretch]:
        """The stretches of a copy of the graph, in the order of ``usable``."""
        found = {s.name: s for s in find_stretches(gm, through_activations=True)[0]}
        return [found[s.name] for s, _, _ in usable]

    def _realize(
        self,
        gm: fx.GraphModule,
        stretches: list[Stretch],
        usable: list[tuple[Stretch, Any, dict[Candidate, algebra.ConvSpec]]],
        best: dict[tuple[int, int], Candidate],
        chosen: Any,
        result: depth.DepthPlan | None,
    ) -> list[tuple[str, depth.MergedSpan]]:
        """Remove the activations ``chosen`` drops and put each merged span in: as its
        fine-tunable :class:`MergedSpan` when ``result`` is given (the spans are described
        there), else directly as the merged conv (a trial to time)."""
        chain = depth.Chain.of(stretches)
        acts = chain.acts()
        for p in chosen.removed:
            node = acts[p]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        spans: list[tuple[str, depth.MergedSpan]] = []
        for vi, vj in chosen.spans:
            cand = best[vi, vj]
            if not cand.merges:
                continue
            s, i, j = chain.local(vi, vj)
            stretch, specs = stretches[s], usable[s][2]
            spec = specs[cand]
            dtype = stretch.values[i].meta["tensor_meta"].dtype
            source = stretch.values[i]
            if i > 0 and i in stretch.acts and vi in chosen.activations:
                source = stretch.acts[i]
            if result is None:
                apply(gm, stretch, cand, _conv_module(spec, dtype), source)
                continue
            folded = [(a - i, b - i) for a, b, _ in folded_bodies(stretch, cand)]
            module = depth.MergedSpan(stretch.specs[i:j], folded, dtype)
            node = apply(gm, stretch, cand, module, source)
            spans.append((str(node.target), module))
            kernel = "x".join(map(str, spec.kernel_size))
            alone = sum(c.latency_ms for c in usable[s][1].candidates if _single(c, i, j))
            result.spans.append(
                f"{stretch.name} {cand.label}: one {kernel} conv (stride "
                f"{'x'.join(map(str, spec.stride))}, groups {spec.groups}) "
                f"{cand.latency_ms:.4f} ms, one at a time {alone:.4f} ms"
            )
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return spans


def _single(c: Candidate, i: int, j: int) -> bool:
    """``c`` is one of the plain single convs of span ``(i, j]``."""
    return i <= c.i and c.j <= j and c.j - c.i == 1 and not c.merges and c.latency_ms is not None


class _Apply(nn.Module):
    """A functional activation as a module (for timing units)."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict, method: bool) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs, self.method = fn, args, kwargs, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method:
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, args={self.args}, kwargs={self.kwargs}"


def _activation_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    if node.op == "call_module":
        return copy.deepcopy(gm.get_submodule(str(node.target)))
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    return _Apply(node.target, tuple(node.args[1:]), kwargs, node.op == "call_method")


def _traced_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    """Random inputs of the traced shapes (the model is timed at the shapes its units were),
    or None where a placeholder has no tensor metadata."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape") or not meta.dtype.is_floating_point:
            return None
        out.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
    return tuple(out)


def _input_batches(ctx: PassContext) -> Iterable[tuple[Any, ...]]:
    if ctx.calibration_data is not None:
        return (b if isinstance(b, tuple | list) else (b,) for b in ctx.calibration_data)
    if ctx.sample_inputs is not None:
        return [tuple(ctx.sample_inputs)]
    return []

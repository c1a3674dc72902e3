"""Depth compression for ``merge-convs{budget=...}``: remove activations under a latency budget
and merge what becomes linear (the second stage of Kim et al., ICML 2023; algorithms.md §3).

The stretches are found *through* activations (``find_stretches(through_activations=True)``)
and numbered end to end as one chain whose positions carry the activations that may go (every
activation between or after the stretch's convs; a position without one keeps none -- a linear
bottleneck stays linear). Spans never cross from one stretch into the next.

Tables, all from the target and the user's data:

* ``T(i, j)``: every valid span ``(i, j]`` merged into one conv -- padding moved to its first
  conv (``move_padding``), residual bodies folded -- followed by its activation, timed on the
  target's backend at its real input shape (the exact mode's units and cache: a second run
  measures nothing).
* ``h(i, j, a_i, a_j)``: the importance of segment ``(i, j]`` with its inner activations removed
  and the one at ``j`` kept or not: the negated relative output error
  ``-sum||y' - y||^2 / sum||y||^2`` over the calibration batches, or, given a ``metric``
  (``metric(predict) -> float``, higher is better, e.g. accuracy on a held-out split;
  ``predict(*arrays)`` runs the network on numpy inputs), the change of the metric. Each distinct set of removed activations is evaluated once, on one copy
  of the graph whose activations are switched off and on.

:func:`graphopt.algebra.merge_dp.plan` then keeps the activations of the largest summed importance
whose predicted latency fits the budget. The budget is ``budget`` times the model's latency, or
``budget_ms``. The model is timed whole and predicted as ``scale * sum T`` over the chosen spans,
``scale = T_model / sum of the single convs`` (algorithms.md §6.2: units timed alone are not
the model; on ONNX Runtime MobileNetV2 takes about 1.6x its convs timed alone, the layout
changes between them and the head growing with the convs), so the spans' budget is
``budget * sum of single convs``, or ``budget_ms / scale``.

Then the architecture is fixed: the removed activations become identities and each chosen span
becomes a :class:`graphopt.nn.MergedSpan` -- its convs with the zero padding moved to the span's input, the
residual skips centre-cropped -- which trains like the convs it holds. The fine-tuning hook
(``finetune``, a constructor argument or ``PassContext.finetune``) trains that graph; then each
span becomes the one conv it computes (exact up to float rounding). Lossy: removing activations
and moving padding change the function; the pass declares ``cosine >= min_cosine``.

:class:`DepthPlan` (in ``PassResult.decisions``) holds the budget, the activations kept and
removed, the spans, the predicted latency against the model measured before and after.

Not handled: inserting an activation where the network had none (the reference does at block
boundaries), importance refined by a short fine-tune per entry (the reference's
``measure_imp``; here the error of the unmerged network without those activations, which
fine-tuning later recovers).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

import graphopt.algebra.conv_merge as algebra
from graphopt.algebra.merge_dp import NoPlan, plan
from graphopt.backends.measure import UnitTimer
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.core.progress import Progress
from graphopt.errors import InputError
from graphopt.fx.names import layer_path
from graphopt.fx.tensors import grad_enabled
from graphopt.nn import MergedSpan
from graphopt.passes.merge_convs.candidates import Candidate, StretchPlan, folded_bodies
from graphopt.passes.merge_convs.exact import apply
from graphopt.passes.merge_convs.importance import Importance
from graphopt.passes.merge_convs.stretches import Stretch, find_stretches
from graphopt.passes.merge_convs.units import conv_module, time_stretch

log = logging.getLogger(__name__)

_MODEL_UNIT = "merge-convs/model/1"


# ------------------------------------------------------------------------------------------------
# the plan over all stretches


@dataclass
class DepthPlan:
    """What depth compression decided: the budget, kept and removed activations, merged spans,
    predicted and measured latency."""

    budget_ms: float
    model_ms: float | None = None
    scale: float = 1.0
    unmerged_ms: float = 0.0
    predicted_ms: float = 0.0
    measured_before_ms: float | None = None
    measured_after_ms: float | None = None
    importance: float = 0.0
    importance_source: str = "output error"
    planning_s: float = 0.0
    evaluated_sets: int = 0
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    finetuned: str = ""
    attempts: list[tuple[float, float, float]] = field(default_factory=list)
    reason: str = ""  # why nothing was changed ("not-faster": no plan measured faster)

    def __str__(self) -> str:
        lines = [
            f"depth compression: budget {self.budget_ms:.4f} ms; convs timed alone "
            f"{self.unmerged_ms:.4f} ms unmerged -> {self.predicted_ms:.4f} ms planned (model = "
            f"{self.scale:.2f} x convs); importance {self.importance:.6g} (what removing the "
            f"activations costs in {self.importance_source}, negated: 0 costs nothing; "
            f"{self.evaluated_sets} sets of removed activations evaluated); planned in "
            f"{self.planning_s:.2f} s"
        ]
        if self.measured_before_ms is not None and self.measured_after_ms is not None:
            predicted = self.scale * self.predicted_ms
            lines.append(
                f"  model measured {self.measured_before_ms:.4f} -> {self.measured_after_ms:.4f} "
                f"ms ({self.measured_before_ms / self.measured_after_ms:.2f}x); predicted "
                f"{predicted:.4f} ms"
            )
        for n, (predicted, measured, ratio) in enumerate(self.attempts, start=1):
            lines.append(
                f"  plan {n}: predicted {predicted:.4f} ms, measured {measured:.4f} ms = "
                f"{ratio:.3f} x the model"
            )
        lines.append(f"  activations removed ({len(self.removed)}): {', '.join(self.removed)}")
        lines.append(f"  activations kept ({len(self.kept)})")
        lines += [f"  {s}" for s in self.spans]
        if self.refusals:
            why = ", ".join(f"{k} {v}" for k, v in sorted(self.refusals.items()))
            lines.append(f"  spans refused by the merge algebra: {why}")
        if self.finetuned:
            lines.append(f"  fine-tuned with {self.finetuned} before the final merge")
        if self.reason:
            lines.append(f"  left as it is ({self.reason}): no plan was measured faster whole")
        return "\n".join(lines)


@dataclass
class Chain:
    """The stretches numbered end to end: stretch ``s`` holds positions
    ``offsets[s] .. offsets[s] + length``."""

    stretches: list[Any]
    offsets: list[int]

    @classmethod
    def of(cls, stretches: list[Any]) -> Chain:
        offsets, total = [], 0
        for s in stretches:
            offsets.append(total)
            total += s.length
        return cls(stretches, offsets)

    @property
    def length(self) -> int:
        return self.offsets[-1] + self.stretches[-1].length if self.stretches else 0

    def acts(self) -> dict[int, fx.Node]:
        return {
            off + p: node
            for s, off in zip(self.stretches, self.offsets, strict=True)
            for p, node in s.acts.items()
            if p > 0
        }

    def local(self, i: int, j: int) -> tuple[int, int, int]:
        """Virtual span ``(i, j]`` as ``(stretch index, i, j)`` in that stretch."""
        for s in range(len(self.stretches) - 1, -1, -1):
            if self.offsets[s] <= i:
                return s, i - self.offsets[s], j - self.offsets[s]
        raise IndexError(i)


def importance_table(
    chain: Chain,
    spans: Iterable[tuple[int, int]],
    importance: Importance,
    say: Progress,
) -> dict[tuple[int, int, int, int], float]:
    """``h(i, j, a_i, a_j)`` for the virtual spans ``spans`` (independent of ``a_i``: the
    activation at ``i`` is the previous segment's)."""
    acts = chain.acts()
    sets: dict[tuple[int, int, int], frozenset] = {}
    for i, j in spans:
        inner = frozenset(p for p in range(i + 1, j) if p in acts)
        for aj in (0, 1):
            sets[i, j, aj] = inner | ({j} if aj == 0 and j in acts else set())
    distinct = sorted(set(sets.values()), key=lambda s: (len(s), sorted(s)))
    for removed in say.track(distinct, "merge-convs: importance", unit="set"):
        importance.score(removed)
    return {
        (i, j, ai, aj): importance.score(sets[i, j, aj])
        for i, j in spans
        for ai in (0, 1)
        for aj in (0, 1)
    }


def model_latency(timer: UnitTimer, modules: dict[str, nn.Module], inputs: tuple[Any, ...]) -> dict:
    """Whole graphs timed interleaved on the timer's backend, through its cache (keyed by the
    graphs' structure, weights aside, and by what they were timed beside: a second run finds
    every measurement the first made)."""
    graphs = {name: str(m) for name, m in modules.items()}
    keys = {  # a graph timed beside others is stored apart from it timed alone
        name: timer.key(
            unit=_MODEL_UNIT,
            graph=graph,
            beside=sorted(g for n, g in graphs.items() if n != name),
            shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        )
        for name, graph in graphs.items()
    }
    modules_by_key = {keys[name]: (m, inputs) for name, m in modules.items()}
    runs = max(timer.runs, 20)
    by_key = timer.cached(list(modules_by_key), lambda: timer.time_modules(modules_by_key, runs))
    return {name: by_key[key] for name, key in keys.items()}


def plan_depth(
    length: int,
    table: dict[tuple[int, int], float],
    h: dict[tuple[int, int, int, int], float],
    candidates: set[int],
    budget_ms: float,
    resolution: int,
) -> Any:
    """Stage 2 over the virtual chain (raises InputError when nothing fits)."""
    return plan(
        length,
        table,
        h,
        budget_ms,
        candidates=candidates,
        resolution=budget_ms / resolution,
    )


# ------------------------------------------------------------------------------------------------
# the run


def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    stretches: list[Stretch],
    stats: Counter,
    timer: UnitTimer,
    say: Progress,
    options: Any,
    *,
    metric: Callable[[Callable[..., Any]], float] | None,
    finetune: Callable[[fx.GraphModule], Any] | None,
) -> PassResult:
    """Depth compression of ``gm`` under ``options.budget`` or ``options.budget_ms`` (see the
    module docstring); ``metric`` and ``finetune`` as given to the pass, else from ``ctx``."""
    opts = options
    metric = metric or ctx.metric
    batches = list(itertools.islice(ctx.calibration_batches() or [], opts.importance_batches))
    if not batches:
        stats["skipped:no-calibration-data"] += len(stretches)
        return PassResult(gm, modified=False, stats=+stats)
    before = copy.deepcopy(gm)
    tables = _time_tables(gm, stretches, stats, timer, say, options)
    if tables is None:
        return PassResult(gm, modified=False, stats=+stats)
    inputs = _traced_inputs(gm) or tuple(ctx.sample_inputs or batches[0])
    model_ms = model_latency(timer, {"model": gm}, inputs)["model"].median_ms
    target_ms = opts.budget * model_ms if opts.budget else opts.budget_ms
    # the model is predicted as scale * sum(T): units timed alone leave out what the whole
    # graph adds around them (layout changes, the head), and that grows with the units
    unmerged = tables.unmerged_ms()
    scale = model_ms / unmerged
    result = DepthPlan(budget_ms=target_ms, model_ms=model_ms, scale=scale, unmerged_ms=unmerged)
    say(f"importance on {len(batches)} calibration batches")
    importance = Importance(gm, tables.chain.acts(), batches, metric)
    h = importance_table(tables.chain, tables.table, importance, say)
    result.importance_source = (
        f"metric {getattr(metric, '__name__', 'callable')}" if metric else "output error"
    )
    result.evaluated_sets = importance.evaluated
    result.refusals = tables.refusals()
    chosen, best_ratio = _validated_plan(before, tables, h, result, timer, inputs, opts, say)
    result.importance = float(chosen.objective or 0.0)
    result.predicted_ms = chosen.latency
    if best_ratio >= 1.0:  # every plan measured no faster than the model: leave it
        result.reason = "not-faster"
        stats["skipped:not-faster"] += 1
        if timer.measured:
            stats["timed-units"] += timer.measured
        return PassResult(gm, modified=False, stats=+stats, decisions=[result])
    gm = _fix_and_merge(gm, ctx, tables, chosen, result, stats, say, finetune)
    if timer.measured:
        stats["timed-units"] += timer.measured
    log.info("merge-convs: %s", result)
    return PassResult(gm, modified=True, stats=+stats, decisions=[result])


@dataclass
class _Tables:
    """``T`` over the stretches numbered end to end: ``usable`` holds each timed stretch with
    its plan and merged specs, ``table[i, j]`` the fastest candidate of virtual span ``(i, j]``
    and ``best[i, j]`` that candidate."""

    usable: list[tuple[Stretch, StretchPlan, dict[Candidate, algebra.ConvSpec]]]
    chain: Chain
    table: dict[tuple[int, int], float]
    best: dict[tuple[int, int], Candidate]

    def unmerged_ms(self) -> float:
        """The sum of the single convs timed alone."""
        table, length = self.table, self.chain.length
        return sum(table[k, k + 1] for k in range(length) if (k, k + 1) in table)

    def refusals(self) -> dict[str, int]:
        """How many candidate spans the merge algebra refused, by reason."""
        return dict(
            Counter(
                c.refusal.reason
                for _, layer, _ in self.usable
                for c in layer.candidates
                if c.refusal is not None
            )
        )


def _time_tables(
    gm: fx.GraphModule,
    stretches: list[Stretch],
    stats: Counter,
    timer: UnitTimer,
    say: Progress,
    options: Any,
) -> _Tables | None:
    """Every stretch's candidates timed, as ``T`` over the virtual chain (None when no stretch
    could be timed)."""
    usable: list[tuple[Stretch, StretchPlan, dict[Candidate, algebra.ConvSpec]]] = []
    for stretch in say.track(stretches, "merge-convs: timing stretches", unit="stretch"):
        say.note(f"{stretch.label}, {stretch.length} convs")
        layer, specs = time_stretch(stretch, timer, stats, gm, options, depth=True)
        if layer.reason and layer.reason != "all-refused":
            continue
        usable.append((stretch, layer, specs))
    if not usable:
        return None
    chain = Chain.of([s for s, _, _ in usable])
    table: dict[tuple[int, int], float] = {}
    best: dict[tuple[int, int], Candidate] = {}
    for (_, layer, _), off in zip(usable, chain.offsets, strict=True):
        for c in layer.candidates:
            if c.refusal is None and c.latency_ms is not None:
                span = (off + c.i, off + c.j)
                if span not in table or c.latency_ms < table[span]:
                    table[span], best[span] = c.latency_ms, c
    if any((k, k + 1) not in table for k in range(chain.length)):
        raise InputError("merge-convs: a single conv could not be timed; see the log")
    return _Tables(usable, chain, table, best)


def _validated_plan(
    before: fx.GraphModule,
    tables: _Tables,
    h: dict[tuple[int, int, int, int], float],
    result: DepthPlan,
    timer: UnitTimer,
    inputs: tuple[Any, ...],
    opts: Any,
    say: Progress,
) -> tuple[Any, float]:
    """Plan, then measure the merged architecture whole; where it misses the budget, plan
    again under a budget shrunk by the miss (algorithms.md §6.2: validate end to end).
    Returns the plan measured fastest and its measured ratio to the model."""
    fraction = result.budget_ms / result.model_ms
    acts = set(tables.chain.acts())
    length, scale = tables.chain.length, result.scale

    def planned(budget_ms: float) -> Any:
        start = time.perf_counter()
        try:
            return plan_depth(length, tables.table, h, acts, budget_ms, opts.resolution)
        finally:
            result.planning_s += time.perf_counter() - start

    trial_plan = planned(result.budget_ms / scale)
    chosen, best_ratio = trial_plan, math.inf
    for attempt in range(1, opts.validate_rounds + 1):
        trial = copy.deepcopy(before)
        trial_stretches = _aligned(trial, tables.usable)
        _realize(trial, trial_stretches, tables.usable, tables.best, trial_plan, None)
        measured = model_latency(timer, {"before": before, "after": trial}, inputs)
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
        except NoPlan:
            break  # nothing faster can be planned
    return chosen, best_ratio


def _fix_and_merge(
    gm: fx.GraphModule,
    ctx: PassContext,
    tables: _Tables,
    chosen: Any,
    result: DepthPlan,
    stats: Counter,
    say: Progress,
    finetune: Callable[[fx.GraphModule], Any] | None,
) -> fx.GraphModule:
    """Fix the architecture ``chosen`` describes (activations removed, spans in their
    fine-tunable form), fine-tune it, then merge each span into its one conv."""
    nodes = tables.chain.acts()
    result.kept = [layer_path(nodes[p]) for p in chosen.activations]
    result.removed = [layer_path(nodes[p]) for p in chosen.removed]
    stretches = [s for s, _, _ in tables.usable]
    spans = _realize(gm, stretches, tables.usable, tables.best, chosen, result)
    stats["activations-removed"] += len(chosen.removed)
    stats["merged-spans"] += len(result.spans)
    for vi, vj in chosen.spans:
        cand = tables.best[vi, vj]
        if cand.merges:
            stats["convs-removed"] += cand.j - cand.i - 1
            stats["residuals-folded"] += cand.folded
    finetune = finetune or ctx.finetune
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
        gm.add_submodule(name, conv_module(module.spec(), dtype))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _aligned(gm: fx.GraphModule, usable: list[tuple[Stretch, Any, Any]]) -> list[Stretch]:
    """The stretches of a copy of the graph, in the order of ``usable``."""
    found = {s.name: s for s in find_stretches(gm, through_activations=True)[0]}
    return [found[s.name] for s, _, _ in usable]


def _realize(
    gm: fx.GraphModule,
    stretches: list[Stretch],
    usable: list[tuple[Stretch, Any, dict[Candidate, algebra.ConvSpec]]],
    best: dict[tuple[int, int], Candidate],
    chosen: Any,
    result: DepthPlan | None,
) -> list[tuple[str, MergedSpan]]:
    """Remove the activations ``chosen`` drops and put each merged span in: as its
    fine-tunable :class:`MergedSpan` when ``result`` is given (the spans are described
    there), else directly as the merged conv (a trial to time)."""
    chain = Chain.of(stretches)
    acts = chain.acts()
    for p in chosen.removed:
        node = acts[p]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    spans: list[tuple[str, MergedSpan]] = []
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
            apply(gm, stretch, cand, conv_module(spec, dtype), source)
            continue
        folded = [(a - i, b - i) for a, b, _ in folded_bodies(stretch, cand)]
        module = MergedSpan(stretch.specs[i:j], folded, dtype)
        node = apply(gm, stretch, cand, module, source)
        spans.append((str(node.target), module))
        kernel = "x".join(map(str, spec.kernel_size))
        alone = sum(c.latency_ms for c in usable[s][1].candidates if _single(c, i, j))
        result.spans.append(
            f"{stretch.label} {cand.label}: one {kernel} conv (stride "
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

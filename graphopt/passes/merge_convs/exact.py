"""Exact mode of merge-convs: stage 1 of the dynamic program splits each stretch into spans
from their measured latencies (:func:`plan_stretch`, pure), and :func:`apply` puts each
merged span in the graph as its one conv (the only mutation)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from torch import fx, nn

import graphopt.algebra.conv_merge as algebra
from graphopt.algebra.merge_dp import plan_exact
from graphopt.backends.measure import UnitTimer
from graphopt.core.pass_infra import PassResult
from graphopt.core.progress import Progress
from graphopt.fx.names import free_name
from graphopt.passes.merge_convs.candidates import Candidate, StretchPlan, folded_bodies
from graphopt.passes.merge_convs.stretches import Stretch
from graphopt.passes.merge_convs.units import conv_module, time_stretch

log = logging.getLogger(__name__)


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
    name = free_name(gm, "merged_conv")
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


def run(
    gm: fx.GraphModule,
    stretches: list[Stretch],
    stats: Counter,
    timer: UnitTimer,
    say: Progress,
    options: Any,
) -> PassResult:
    """Time, plan and merge every stretch of ``gm`` (the exact mode of the pass)."""
    decisions: list[StretchPlan] = []
    rewrites: list[tuple[Stretch, Candidate, algebra.ConvSpec]] = []
    for stretch in say.track(stretches, "merge-convs: timing stretches", unit="stretch"):
        say.note(f"{stretch.label}, {stretch.length} convs")
        layer, specs = time_stretch(stretch, timer, stats, gm, options, depth=False)
        if not layer.reason:
            layer = plan_stretch(layer, stretch.length, options.min_speedup)
            if layer.reason:
                stats[f"skipped:{layer.reason}"] += 1
        decisions.append(layer)
        log.info("merge-convs: %s", layer)
        for cand in layer.merged:
            rewrites.append((stretch, cand, specs[cand]))
    for stretch, cand, spec in rewrites:
        dtype = stretch.values[cand.i].meta["tensor_meta"].dtype
        apply(gm, stretch, cand, conv_module(spec, dtype))
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

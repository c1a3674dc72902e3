"""eliminate-dead-code: remove nodes whose values nothing uses, and the modules and attributes
only they referenced.

    %3 = relu(%2)      # no users, no side effect  ->  removed
Impure nodes (in-place ops: ``Tensor.add_``, ``torch.relu_``, ``inplace=True`` calls and modules,
``setitem``, ``out=``, aten ops whose schema writes an argument; calls FX marks as side-effecting;
random ops) and placeholders are kept.

The in-place rule lives in :mod:`graphopt.fx.effects`, once, for every pass:
:func:`~graphopt.fx.effects.mutates_input` (does a node write?),
:func:`~graphopt.fx.effects.written_in_place` (which values do the graph's writes reach, through
views and aliases) and :func:`~graphopt.fx.effects.written_storages` (which attribute tensors, by
memory, so tied weights count too); this pass removes dead nodes by it
(:func:`~graphopt.fx.effects.remove_dead_nodes`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import remove_dead_nodes


@register_pass
class EliminateDeadCode(Pass):
    """Remove unused nodes, then the submodules and constants no node refers to any more."""

    name = "eliminate-dead-code"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        remove_unused_modules: bool = True  # also delete submodules no node calls any more

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        stats["removed-nodes"] = remove_dead_nodes(gm)
        if self.options.remove_unused_modules:
            modules_before = sum(1 for _ in gm.modules())
            gm.delete_all_unused_submodules()
            stats["removed-modules"] = modules_before - sum(1 for _ in gm.modules())
        stats["removed-constants"] = _drop_unused_attributes(gm)
        gm.recompile()
        changed = sum(stats.values()) > 0
        return PassResult(gm, modified=changed, stats=+stats)


def _drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete top-level buffers/parameters of ``gm`` that no ``get_attr`` reads any more."""
    used = {n.target.split(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    used |= {n.target.split(".")[0] for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
            removed += 1
    for name in list(gm._parameters):
        if name not in used:
            del gm._parameters[name]
            removed += 1
    return removed

"""eliminate-dead-code: remove nodes whose values nothing uses, and the modules and attributes
only they referenced.

    %3 = relu(%2)      # no users, no side effect  ->  removed
Impure nodes (in-place ops, calls FX marks as side-effecting) and placeholders are kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx

from graphopt.pass_manager import Numerics, Pass, PassContext, PassResult
from graphopt.pipeline import register_pass


@register_pass
class EliminateDeadCode(Pass):
    """Remove unused nodes, then the submodules and constants no node refers to any more."""

    name = "eliminate-dead-code"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        remove_unused_modules: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        stats["removed-nodes"] = before - len(gm.graph.nodes)
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

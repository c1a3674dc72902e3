"""eliminate-dead-code: remove nodes whose values nothing uses, and the modules and attributes
only they referenced.

    %3 = relu(%2)      # no users, no side effect  ->  removed
Impure nodes (in-place ops: ``Tensor.add_``, ``torch.relu_``, ``inplace=True`` calls and modules,
``setitem``; calls FX marks as side-effecting; random ops) and placeholders are kept.
"""

from __future__ import annotations

import inspect
import operator
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
        stats["removed-nodes"] = remove_dead_nodes(gm)
        if self.options.remove_unused_modules:
            modules_before = sum(1 for _ in gm.modules())
            gm.delete_all_unused_submodules()
            stats["removed-modules"] = modules_before - sum(1 for _ in gm.modules())
        stats["removed-constants"] = _drop_unused_attributes(gm)
        gm.recompile()
        changed = sum(stats.values()) > 0
        return PassResult(gm, modified=changed, stats=+stats)


def is_impure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` must stay even when nothing reads its value: FX's own rule (placeholders,
    the output, calls it knows to have side effects) or an in-place op (:func:`mutates_input`)."""
    return node.is_impure() or mutates_input(gm, node)


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Erase the nodes of ``gm`` whose values nothing uses and that have no effect; the number
    erased. Every pass that cleans up after itself calls this, never
    ``gm.graph.eliminate_dead_code()`` bare: FX's purity check misses in-place ops
    (``y.add_(1)``, ``F.relu(y, inplace=True)``, ``nn.ReLU(inplace=True)``), whose result is
    often unused while their effect is not."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(gm, n))
    return before - len(gm.graph.nodes)


def mutates_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` writes to one of its inputs (an in-place op), so it must stay without users."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target in (operator.setitem, operator.delitem):
            return True
        name = getattr(node.target, "__name__", "")
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            if bound.arguments.get("inplace") is True:  # F.relu(x, True), F.dropout(...)
                return True
        except (TypeError, ValueError):
            pass  # builtins without a signature
    else:
        return False
    if node.kwargs.get("inplace") is True:
        return True
    return name.endswith("_") and not name.startswith("__")  # add_, relu_, copy_, ...


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

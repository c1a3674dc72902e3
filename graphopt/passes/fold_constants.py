"""fold-constants: evaluate the parts of the graph that depend on no input, once, ahead of time.

    %w  = const f32[64,32]
    %wt = torch.t(%w)              ->   %wt = const f32[32,64]   (computed at rewrite time)
    %y  = F.linear(%x, %wt)             %y  = F.linear(%x, %wt)

A node is folded when every input it reads is a constant (``get_attr`` or a folded node), it
produces a tensor, and it is pure: random ops, in-place ops and impure calls are left alone
(``skipped:impure``). A constant larger than ``max_elements`` is not materialised
(``skipped:too-large``), so a cheap broadcast of a scalar does not become a huge buffer.

A value that ``forward`` writes in place is not a constant: an attribute (or a tensor sharing
its memory) that an in-place op anywhere in the graph writes, directly or through a view
(``self.buf.add_(1)``, ``self.buf[0] = v``, ``buf.view(-1).copy_(v)``, ``out=buf``), and a
computed value that is written in place (``c = w * 2; c.add_(1)``: folding ``c`` would make
every call write into the one stored constant). Nothing computed from such a value is folded
(``skipped:written-in-place``, counted where a fold would have been): ``x + self.buf * 2``
changes on every call when ``forward`` also runs ``self.buf.add_(1)``, before or after it.
The in-place rule is :func:`graphopt.fx.effects.written_in_place`, shared by all passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import is_impure, storage_key, written_in_place, written_storages
from graphopt.fx.names import fetch_attr, free_name

_RANDOM = {
    "rand",
    "randn",
    "randint",
    "rand_like",
    "randn_like",
    "bernoulli",
    "dropout",
    "multinomial",
    "normal",
    "uniform_",
    "feature_dropout",
    "alpha_dropout",
}


def _is_random(target: Any, name: str) -> bool:
    """A random op: by name, or the aten op of that name is tagged ``nondeterministic_seeded``
    (``torch.binomial``, ``F.rrelu``, ``Tensor.geometric``...: no list of names keeps up)."""
    if name in _RANDOM:
        return True
    seeded = torch.Tag.nondeterministic_seeded
    if isinstance(target, torch._ops.OpOverload):
        return seeded in target.tags
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(seeded in getattr(packet, o).tags for o in packet.overloads())


def _is_pure(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False  # call_module may hold state; placeholders are inputs
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    # in place (``c.add_(1)``, ``F.relu(c, inplace=True)``): running it would change a constant
    return not (_is_random(node.target, name) or is_impure(gm, node))


@register_pass
class FoldConstants(Pass):
    """Pre-compute every pure node whose inputs are all constants."""

    name = "fold-constants"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        max_elements: int = 1 << 24  # larger constants are left to compute at run time

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        values: dict[fx.Node, Any] = {}
        # constant but for an in-place write in forward: neither it nor what reads it is folded
        stale: set[fx.Node] = set()
        written = written_in_place(gm)
        memory = written_storages(gm, written)
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = fetch_attr(gm, node.target)
                # written in place (or sharing memory with what is): it changes between calls
                if node in written or (
                    isinstance(value, torch.Tensor) and storage_key(value) in memory
                ):
                    stale.add(node)
                else:
                    values[node] = value
                continue
            inputs = node.all_input_nodes
            if node.op == "output" or not inputs:
                continue
            if any(n not in values and n not in stale for n in inputs):
                continue
            if not _is_pure(gm, node):
                stats["skipped:impure"] += 1
                continue
            # reads a value written in place, or is itself written (c = w * 2; c.add_(1))
            if node in written or any(n in stale for n in inputs):
                stale.add(node)
                continue
            args = fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
            with torch.no_grad():
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                call_args = args[1:] if node.op == "call_method" else args
                value = fn(*call_args, **kwargs)
            values[node] = value
        # each place a fold was refused: a stale computed value that a non-constant node reads
        stats["skipped:written-in-place"] = sum(
            1
            for n in stale
            if n.op != "get_attr" and any(u not in values and u not in stale for u in n.users)
        )
        read = {n for n in gm.graph.nodes if n.op == "get_attr" and n.users}
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" or node not in values or not node.users:
                continue
            value = values[node]
            # fold only where a non-constant user needs the value (the frontier of the subgraph)
            if all(u in values for u in node.users):
                continue
            if not isinstance(value, torch.Tensor):
                continue
            if value.numel() > self.options.max_elements:
                stats["skipped:too-large"] += 1
                continue
            name = free_name(gm, "_folded_constant")
            with torch.inference_mode(False):  # a normal tensor (see graphopt.fx.tensors)
                gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta.update(node.meta)
            node.replace_all_uses_with(const)
            folded += 1
        if folded:
            # drop the constant subgraphs that fed the new constants, nothing else
            # (the constants they read included, but no attribute read that was dead before)
            for node in reversed(list(gm.graph.nodes)):
                if node in values and not node.users and (node.op != "get_attr" or node in read):
                    gm.graph.erase_node(node)
            gm.recompile()
        stats["folded"] = folded
        return PassResult(gm, modified=folded > 0, stats=+stats)

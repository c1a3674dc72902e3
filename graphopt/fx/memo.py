"""What one run of a pass works out about its graph, once, in an object that run owns.

A pass that looks at every weight and every node again at each sweep (reparameterize) would
otherwise convert the same weights to float64 and bind the same call signatures over and over.
The memo is made at the start of a run and passed explicitly to what needs it; when the run ends
it goes with it, so nothing is cached between runs (a cache keyed by ``id()`` that outlived its
tensors could hand a new tensor an old tensor's copy).

Within a run: a weight changes only by being replaced, never in place; a node's target never
changes; no rewrite adds an in-place write (one a rewrite drops only leaves :meth:`written`
more conservative than it need be: more refusals, never a wrong rewrite).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphopt.fx.effects import may_alias_input, mutates_input, shares_storage, written_storages


class RunMemo:
    """Float64 weights and the in-place facts of ``gm``'s nodes, each worked out once."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        # id -> (the tensor, its float64 copy): holding the tensor keeps its id from being reused
        self._float64: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mutates: dict[fx.Node, bool] = {}  # the node writes an input
        self._aliases: dict[fx.Node, bool] = {}  # may share its first operand's memory
        self._storages: set[int] | None = None  # the memory of the attributes forward writes

    def float64(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in float64 (callers never modify the result in place)."""
        hit = self._float64.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self._float64[id(t)] = (t, t.detach().double())
        return hit[1]

    def mutates(self, node: fx.Node) -> bool:
        """:func:`~graphopt.fx.effects.mutates_input` of ``node`` (it binds the call's signature,
        slow to ask again for every node at every candidate rewrite)."""
        if node not in self._mutates:
            self._mutates[node] = mutates_input(self.gm, node)
        return self._mutates[node]

    def aliases(self, node: fx.Node) -> bool:
        """``node``'s value may share memory with its first operand, a graph value (a view, or
        an in-place op, which returns the tensor it wrote): :func:`may_alias_input`."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node not in self._aliases:
            self._aliases[node] = may_alias_input(self.gm, node)
        return self._aliases[node]

    def written(self, *tensors: torch.Tensor | None) -> bool:
        """``forward`` writes one of ``tensors`` (or memory it shares) in place
        (``self.conv.weight.data.mul_(s)``, ``self.bn.running_mean.add_(d)``): rewritten into a
        new layer, every later call would use the values they had when the pass ran."""
        if self._storages is None:
            self._storages = written_storages(self.gm)
        return shares_storage(self._storages, *tensors)

    def written_before(self, x: Any, end: fx.Node) -> bool:
        """Whether an in-place op writes to ``x`` (or a tensor sharing its memory) after ``x`` is
        first read and before ``end``: a rewrite that moves the reads of ``x`` to ``end`` would
        then read the written value where the original read the old one (``a = conv3(x);
        x.mul_(2); b = conv1(x); a + b``). A write before every read changes nothing."""
        if not isinstance(x, fx.Node):
            return False
        order = {n: i for i, n in enumerate(x.graph.nodes)}
        alias, stack = {x}, [x]
        while stack:  # x's alias class: its bases and the views and in-place results of it
            node = stack.pop()
            near = [u for u in node.users if self.aliases(u)]
            if self.aliases(node):
                near.append(node.args[0])
            for n in near:
                if n not in alias:
                    alias.add(n)
                    stack.append(n)
        writes = [
            n
            for n in x.graph.nodes
            if self.mutates(n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in alias
        ]
        # the first read of x (its views read nothing)
        reads = [order[u] for u in x.users if u not in writes and u not in alias]
        start = min(reads, default=order[x])
        return any(start < order[n] < order[end] for n in writes)

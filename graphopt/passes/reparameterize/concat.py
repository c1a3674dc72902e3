"""Concatenation (DBB transform IV): ``cat([conv_a(x), conv_b(x), ...], dim=1)``.

Consecutive convs of one input with the same kernel size, stride, padding and dilation (one
group, zero padding) become one conv with the kernels stacked::

    W = [W_a; W_b; ...]        b = [b_a; b_b; ...]        (along the output channels)

A conv whose weights ``forward`` writes in place stays a conv of its own (``written-in-place``,
counted once per concatenation; the others still stack), as do convs of an ``x`` written
between their reads and the concatenation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from graphopt.fx.branches import Branch, conv_branch
from graphopt.fx.layers import call_args, rank
from graphopt.fx.memo import RunMemo
from graphopt.passes.reparameterize.branches import layer_dtype, new_conv
from graphopt.passes.reparameterize.rule import Rule

aten = torch.ops.aten
_CATS = {torch.cat, torch.concat, aten.cat.default}


@dataclass
class Cat:
    """A concatenation along channels and, per item, its conv (None: not one that may stack)."""

    node: fx.Node
    items: list[Any]
    branches: list[Branch | None]


@dataclass
class WrittenConvs:
    """A concatenation of convs, some of whose weights ``forward`` writes in place."""

    node: fx.Node


def pattern(gm: fx.GraphModule, memo: RunMemo) -> Iterator[Cat | WrittenConvs]:
    """Every ``cat`` along dim 1 (with its written convs first, to be refused)."""
    for node in list(gm.graph.nodes):
        if node.graph is None or node.op != "call_function" or node.target not in _CATS:
            continue
        v = call_args(node, ["tensors", "dim"])
        items, node_rank = list(v["tensors"]), rank(node)
        if node_rank is None or int(v.get("dim", 0)) % node_rank != 1:
            continue
        branches = [
            conv_branch(gm, t, memo=memo)
            if isinstance(t, fx.Node) and items.count(t) == 1
            else None
            for t in items
        ]
        if any(b is not None and b.written for b in branches) and sum(map(bool, branches)) > 1:
            yield WrittenConvs(node)
        yield Cat(node, items, [None if b is None or b.written else b for b in branches])


def check(gm: fx.GraphModule, memo: RunMemo, m: Cat | WrittenConvs) -> str | None:
    if isinstance(m, WrittenConvs):
        return "written-in-place"  # forward writes a conv's weights: it stays a conv of its own
    return None


def rewrite(gm: fx.GraphModule, memo: RunMemo, m: Cat) -> Counter:
    """Each run of stackable convs as one conv; the ``cat`` of what is left."""
    stats: Counter = Counter()
    node, items, branches = m.node, m.items, m.branches
    out: list[Any] = []
    i = 0
    while i < len(items):
        j = i + 1
        ref = branches[i]
        if ref is not None and memo.written_before(ref.input, node):
            ref = None  # x is written between the convs and the cat: they stay apart
        while ref is not None and j < len(items) and _stackable(ref, branches[j]):
            j += 1
        if j - i < 2:
            out.append(items[i])
            i += 1
            continue
        run = branches[i:j]
        weight = torch.cat([b.weight for b in run])
        bias = torch.cat([b.bias for b in run])
        merged = replace(ref, weight=weight, bias=bias)
        name = new_conv(gm, merged, ref.padding, "zeros", layer_dtype(ref.node, run))
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_module(name, (ref.input,))
        conv.meta = dict(ref.node.meta)
        out.append(conv)
        stats["merged-concat"] += 1
        i = j
    if len(out) == len(items):
        return stats
    if len(out) == 1:
        node.replace_all_uses_with(out[0])
    else:
        with gm.graph.inserting_before(node):
            cat = gm.graph.call_function(torch.cat, (out, 1))
        cat.meta = dict(node.meta)
        node.replace_all_uses_with(cat)
    gm.graph.erase_node(node)
    return stats


RULE = Rule("concat", pattern, check, rewrite)


def _stackable(ref: Branch, b: Branch | None) -> bool:
    return (
        b is not None
        and not ref.pool
        and not b.pool
        and b.input is ref.input
        and ref.groups == 1
        and b.groups == 1
        and b.padding_mode == ref.padding_mode == "zeros"
        and b.weight.shape[1:] == ref.weight.shape[1:]
        and (b.stride, b.padding, b.dilation) == (ref.stride, ref.padding, ref.dilation)
    )

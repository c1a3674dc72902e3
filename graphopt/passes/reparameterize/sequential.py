"""Sequential: ``conv2(conv1(x))`` as one conv, when one of them is a 1x1 (stride 1, no padding).

SESR collapsible blocks, DBB's 1x1 -> kxk; nothing in between but an explicit constant pad
(:mod:`~graphopt.passes.reparameterize.padding`), and ``conv1``'s output used only there::

    kxk then 1x1:  W[o,i,taps] = sum_m W2[o,m] W1[m,i,taps]        b = W2 b1 + b2
    1x1 then kxk:  W[o,i,taps] = sum_m W2[o,m,taps] W1[m,i]        b = b2 + sum_{m,taps} W2 b1

Refused: the second form where conv2 reads zero padding of ``conv1(x)`` whose border is not
``b1`` (``bias-at-padding``); weights that ``forward`` writes in place, or a write to ``x``
between its first read and the merged conv (``written-in-place``); a merge that costs more
multiply-adds per output than the two convs, unless a bigger conv of ``x`` beside it in a sum
absorbs it (``more-macs``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import fx

from graphopt.algebra.conv_merge import dense_kernel, regroup
from graphopt.fx.branches import Branch, conv_branch
from graphopt.fx.memo import RunMemo
from graphopt.fx.ops import is_sum
from graphopt.fx.uses import sole_value_user
from graphopt.passes.reparameterize.branches import (
    bn_branch,
    layer_dtype,
    macs,
    new_conv,
    pointwise,
)
from graphopt.passes.reparameterize.padding import Pad, explicit_pad
from graphopt.passes.reparameterize.rule import Rule
from graphopt.passes.reparameterize.terms import terms


@dataclass
class Chain:
    """``second(pad(first(x)))`` and the one conv it is: ``weight``, ``bias``, ``groups``, with
    the stride/dilation/padding of ``outer`` (the non-1x1 one) and ``pad_mode``."""

    node: fx.Node  # second's node: the value the merged conv replaces
    first: Branch
    second: Branch  # its padding and input include the explicit pad's
    pad: Pad | None
    weight: torch.Tensor
    bias: torch.Tensor
    groups: int
    outer: Branch
    pad_mode: str
    bias_at_padding: bool  # the zero border of conv1(x) is not conv1's bias


def pattern(gm: fx.GraphModule, memo: RunMemo) -> Iterator[Chain]:
    """Every conv (or pool) reading, maybe through an explicit pad, a conv used only there, one
    of them a 1x1: the merged weights worked out."""
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        second = conv_branch(gm, node, single_use=False, memo=memo)
        if second is None or not isinstance(second.input, fx.Node):
            continue
        dims = second.weight.dim() - 2
        pad = None if pointwise(second) else explicit_pad(gm, memo, second.input, dims)
        if pad is not None:
            if second.padding_mode != "zeros" or (any(second.padding) and pad.border.any()):
                continue  # a zero ring outside a non-zero border: no single padding says that
            padding = tuple(a + b for a, b in zip(pad.amounts, second.padding, strict=True))
            second = replace(second, padding=padding, input=pad.source)
        first = conv_branch(gm, second.input, memo=memo)
        if first is None or first.weight.dim() != second.weight.dim():
            continue
        chain = _merge(node, first, second, pad)
        if chain is not None:
            yield chain


def _merge(node: fx.Node, first: Branch, second: Branch, pad: Pad | None) -> Chain | None:
    """The merged conv of ``second(pad(first(x)))``; None unless one of them is a 1x1."""
    bias_at_padding = False
    w1, w2 = dense_kernel(first.weight, first.groups), dense_kernel(second.weight, second.groups)
    if pointwise(second) and not second.pool:
        weight = torch.einsum("om,mi...->oi...", w2.flatten(1), w1)
        bias = w2.flatten(1) @ first.bias + second.bias
        outer, pad_mode = first, first.padding_mode
    elif pointwise(first):
        pad_mode = second.padding_mode
        b1 = first.bias + (pad.shift if pad is not None else 0.0)
        border = pad.border if pad is not None else torch.zeros(1, dtype=torch.float64)
        bias_at_padding = any(second.padding) and pad_mode == "zeros" and not _close(b1, border)
        weight = torch.einsum("om...,mi->oi...", w2, w1.flatten(1))
        bias = second.bias + (w2.flatten(2).sum(-1) @ b1)
        outer = second
    else:
        return None
    groups = math.gcd(first.groups, second.groups)
    grouped = regroup(weight, groups)
    if grouped is None:
        groups, grouped = 1, weight
    return Chain(node, first, second, pad, grouped, bias, groups, outer, pad_mode, bias_at_padding)


def check(gm: fx.GraphModule, memo: RunMemo, m: Chain) -> str | None:
    if m.bias_at_padding:
        return "bias-at-padding"  # the border of conv1(x) is not conv1's bias
    if m.first.written or m.second.written:
        return "written-in-place"  # forward changes a weight: merged, it would not
    if memo.written_before(m.first.input, m.node):
        return "written-in-place"  # the merged conv would read x after the write
    more = m.weight.numel() > macs(m.first) + macs(m.second)
    if more and not _absorbed(gm, memo, m.node, m.first.input, m.weight):
        return "more-macs"
    return None


def rewrite(gm: fx.GraphModule, memo: RunMemo, m: Chain) -> Counter:
    outer = m.outer
    merged = Branch(
        m.node, "conv", m.weight, m.bias, outer.stride, outer.dilation, outer.padding, m.groups
    )
    dtype = layer_dtype(m.node, (m.first, m.second))
    new = new_conv(gm, merged, outer.padding, m.pad_mode, dtype)
    with gm.graph.inserting_before(m.node):
        conv = gm.graph.call_module(new, (m.first.input,))
    conv.meta = dict(m.node.meta)
    m.node.replace_all_uses_with(conv)  # its guards too: the merged conv has its shape
    gm.graph.erase_node(m.node)
    for dead in [*(m.pad.nodes if m.pad is not None else []), m.first.node]:
        if not dead.users:
            gm.graph.erase_node(dead)
    return Counter({"collapsed-sequential": 1})


RULE = Rule("sequential", pattern, check, rewrite)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(a.abs().max()), float(b.abs().max()))
    return bool((a - b).abs().max() <= 1e-6 * scale)


def _absorbed(
    gm: fx.GraphModule, memo: RunMemo, node: fx.Node, x: fx.Node, weight: torch.Tensor
) -> bool:
    """Whether ``node`` is (through per-channel ops) a term of a sum that also holds a conv of
    ``x`` with a kernel at least as large as ``weight``'s: the parallel rule will then fold the
    merged kernel into that conv, so its extra multiply-adds are never paid."""
    cur, root = node, None
    for _ in range(8):
        if (user := sole_value_user(cur)) is None:
            break
        cur = user
        if is_sum(cur):
            root = cur
        elif root is not None:
            break
    if root is None:
        return False
    for leaf, _ in terms(gm, memo, root, root):
        if leaf is node:
            continue
        b = conv_branch(gm, leaf, memo=memo) or bn_branch(gm, memo, leaf)
        if (
            b is not None
            and b.kind == "conv"
            and not b.pool
            and not b.written  # stays apart: the merged kernel's multiply-adds would be paid
            and b.input is x
            and all(k >= m for k, m in zip(b.weight.shape[2:], weight.shape[2:], strict=True))
        ):
            return True
    return False

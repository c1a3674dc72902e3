"""Parallel (RepVGG, ACNet, MobileOne): a sum of branches of one input as one convolution.

``y = sum_i B_i(x)`` where every ``B_i`` is, on the same ``x``,

- a convolution (module or functional; any kernel size, groups, dilation, zero padding) whose
  output feeds only this sum,
- an eval-mode BatchNorm of ``x`` (the identity-BN branch: a per-channel affine ``a*x + t``),
- ``x`` itself (a plain identity branch),

becomes one convolution (:mod:`~graphopt.passes.reparameterize.branches` has the maths). The sum
may be signed and its terms scaled per channel (``a*conv3(x) - conv1(x)``); terms of other
inputs stay terms of the rebuilt sum. Conv branches beside an FC of the same ``x`` fold into the
FC instead (:mod:`~graphopt.passes.reparameterize.into_fc`).

Refused, the branches left as they are: ``padding-mode``, ``mismatch``, ``misaligned``,
``identity-shape`` (see :func:`~graphopt.passes.reparameterize.branches.why_not_merge`); a write
to ``x`` between the branches' reads and the sum, or a branch whose weights ``forward`` writes
(``written-in-place``: that branch stays a term of its own, the others still merge).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import fx

from graphopt.fx.branches import Branch, conv_branch
from graphopt.fx.layers import rank
from graphopt.fx.memo import RunMemo
from graphopt.fx.names import free_name
from graphopt.fx.ops import is_sum
from graphopt.fx.tensors import as_normal
from graphopt.passes.reparameterize import into_fc
from graphopt.passes.reparameterize.branches import (
    affine_branch,
    bn_branch,
    layer_dtype,
    merge_branches,
    merged_padding,
    new_conv,
    why_not_merge,
)
from graphopt.passes.reparameterize.terms import is_inner, scaled, terms


@dataclass
class Sum:
    """A sum (``root``) as its ``terms`` (leaf, coef), the branch each leaf is (or None), and
    the terms' indices by the input their branch reads."""

    root: fx.Node
    terms: list[tuple[fx.Node, Any]]
    found: list[Branch | None]
    by_input: dict[fx.Node, list[int]]


def pattern(gm: fx.GraphModule, memo: RunMemo) -> Iterator[Sum]:
    """Every outermost sum of two or more terms, its branches grouped by input."""
    for node in list(gm.graph.nodes):
        if node.graph is None or not is_sum(node) or not node.users:
            continue
        if is_inner(gm, memo, node):
            continue  # the bigger sum's root handles it
        found = terms(gm, memo, node, node)
        if len(found) >= 2:
            yield _branches(gm, memo, node, found)


def _branches(gm: fx.GraphModule, memo: RunMemo, root: fx.Node, leaves: list) -> Sum:
    found = [(conv_branch(gm, leaf, memo=memo) or bn_branch(gm, memo, leaf)) for leaf, _ in leaves]
    by_input: dict[fx.Node, list[int]] = {}
    for i, b in enumerate(found):
        if b is not None:
            by_input.setdefault(b.input, []).append(i)
    for i, (leaf, _) in enumerate(leaves):
        if found[i] is None and leaf in by_input:  # x itself is summed: an identity branch
            found[i] = Branch(leaf, "identity", input=leaf)
            by_input[leaf].append(i)
    return Sum(root, leaves, found, by_input)


def check(gm: fx.GraphModule, memo: RunMemo, x: fx.Node, s: Sum, branches: list) -> str | None:
    """Why the ``branches`` of ``x`` in ``s`` cannot become one conv, or None."""
    if reason := why_not_merge(branches):
        return reason
    if memo.written_before(x, s.root):
        return "written-in-place"  # x changes between the branches' reads and the sum
    return None


def rewrite(gm: fx.GraphModule, root: fx.Node, x: fx.Node, branches: list[Branch]) -> fx.Node:
    """A conv of ``x`` equal to the sum of ``branches``, inserted before ``root``."""
    ref = next(b for b in branches if b.kind == "conv")
    weight, bias = merge_branches(branches, ref.weight.shape[0])
    padding = merged_padding(branches, weight)
    merged = Branch(root, "conv", weight, bias, ref.stride, ref.dilation, padding, ref.groups)
    name = new_conv(gm, merged, padding, "zeros", layer_dtype(root, branches))
    with gm.graph.inserting_before(root):
        node = gm.graph.call_module(name, (x,))
    node.meta = dict(root.meta)
    return node


def apply(gm: fx.GraphModule, memo: RunMemo, stats: Counter) -> None:
    """Merge the branches of each input of each sum; rebuild the sums that changed."""
    for s in pattern(gm, memo):
        operands: list[tuple[fx.Node, Any]] = []
        used: set[int] = set()
        for x, idxs in s.by_input.items():
            merged = _merge_input(gm, memo, s, x, idxs, stats)
            if merged is not None:
                operands.append((merged[0], None))
                used.update(merged[1])
        if operands:
            operands += [term for i, term in enumerate(s.terms) if i not in used]
            _rebuild(gm, memo, s.root, operands)


def _merge_input(
    gm: fx.GraphModule, memo: RunMemo, s: Sum, x: fx.Node, idxs: list[int], stats: Counter
) -> tuple[fx.Node, list[int]] | None:
    """The branches of ``x`` as one conv (or folded into an FC of ``x``): the node that now
    computes them and the terms it replaces; None where they stay as they are."""
    # forward writes a branch's weights in place: it stays a term of its own
    if any(s.found[i].written for i in idxs):
        if len(idxs) > 1:
            stats["skipped:written-in-place"] += 1
        idxs = [i for i in idxs if not s.found[i].written]
    branches = [
        affine_branch(s.found[i], c) if (c := s.terms[i][1]) is not None else s.found[i]
        for i in idxs
    ]
    if not any(b.kind == "conv" for b in branches):
        return None
    reason = check(gm, memo, x, s, branches)
    fc = next(
        (
            (j, f)
            for j, (leaf, c) in enumerate(s.terms)
            if j not in idxs and c is None and (f := into_fc.fc_leaf(gm, memo, leaf, x))
        ),
        None,
    )
    if fc is not None and not reason:
        planned = into_fc.plan(fc[1], branches, x)
        if not isinstance(planned, str):
            into_fc.rewrite(gm, fc[1], planned)
            stats["merged-into-fc"] += 1
            stats["branches-merged"] += len(branches)
            return fc[1].out, [*idxs, fc[0]]
        stats[f"skipped:{planned}"] += 1
    if len(branches) < 2:
        return None
    if reason:
        stats[f"skipped:{reason}"] += 1
        return None
    stats["collapsed"] += 1
    stats["branches-merged"] += len(branches)
    return rewrite(gm, s.root, x, branches), idxs


def _rebuild(gm: fx.GraphModule, memo: RunMemo, root: fx.Node, operands: list) -> None:
    """Replace the sum ``root`` by the sum of ``operands`` (leaf, coef)."""
    with gm.graph.inserting_before(root):
        total = _scaled_node(gm, root, *operands[0])
        for leaf, coef in operands[1:]:
            if coef is not None and coef.numel() == 1 and float(coef) == -1.0:
                total = gm.graph.call_function(operator.sub, (total, leaf))
            else:
                total = gm.graph.call_function(
                    operator.add, (total, _scaled_node(gm, root, leaf, coef))
                )
            total.meta = dict(root.meta)
    root.replace_all_uses_with(total)
    _erase_tree(gm, memo, root)


def _erase_tree(gm: fx.GraphModule, memo: RunMemo, root: fx.Node) -> None:
    """Erase a replaced sum and the sums and scales under it that nothing else reads (dead-code
    elimination keeps in-place adds, which count as side effects)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.graph is None or node.users:
            continue
        if node is not root and not (is_sum(node) or scaled(gm, memo, node)):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        gm.graph.erase_node(node)
        stack += args


def _scaled_node(gm: fx.GraphModule, root: fx.Node, leaf: fx.Node, coef: Any) -> fx.Node:
    """``leaf`` times its per-channel coefficient, as graph nodes (a constant for the scale)."""
    if coef is None:
        return leaf
    node_rank = rank(root) or 1
    view = (-1,) + (1,) * (node_rank - 2) if coef.numel() > 1 else (1,)
    name = free_name(gm, "reparam_scale")
    gm.register_buffer(name, as_normal(coef.reshape(view).to(layer_dtype(root))))
    const = gm.graph.get_attr(name)
    node = gm.graph.call_function(operator.mul, (leaf, const))
    node.meta = dict(root.meta)
    return node

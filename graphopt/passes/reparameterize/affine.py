"""Affine around a Linear or a conv: a per-feature ``a * y + t`` folded into the layer.

**Linear** (SLAB's re-parameterized BN in transformers): a per-feature affine of the Linear's
input or output -- ``x * c``, ``x + c``, ``x - c``, ``x / c`` with ``c`` a constant scalar or a
vector over the last dimension, or an eval BatchNorm1d applied between two transposes of the
last two dimensions (BN over the feature axis of ``(N, T, C)`` tokens)::

    after it:   W' = a W        b' = a b + t
    before it:  W' = W a        b' = b + W t

Only a ``nn.Linear`` called once, its weight owned by it alone (``F.linear`` is left alone: its
weights may be read elsewhere).

**Conv**: a conv whose only use is a per-channel affine (``* c``, ``+ c``, ``- c``, ``/ c``, an
eval BatchNorm) becomes one conv (a new module: a shared conv module is never changed).

Refused (``written-in-place``): weights, statistics or constants that ``forward`` writes in
place, or a write to ``x`` between its first read and the folded layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from graphopt.algebra.bn_fold import bn_affine
from graphopt.fx.branches import Branch, conv_branch
from graphopt.fx.layers import as_bn, as_layer, call_counts, param_owners, rank
from graphopt.fx.memo import RunMemo
from graphopt.fx.tensors import as_parameter
from graphopt.passes.reparameterize.branches import affine_branch, layer_dtype, new_conv
from graphopt.passes.reparameterize.rule import Rule
from graphopt.passes.reparameterize.terms import constant_operand, full

_F64 = torch.float64
_TRANSPOSES = {torch.transpose}


def affine(
    gm: fx.GraphModule,
    memo: RunMemo,
    node: fx.Node,
    features: int,
    axis: int = -1,
    writable: bool = False,
) -> tuple[fx.Node, Any, Any] | None:
    """``node`` as ``a * x + t`` per feature along ``axis``: (x, a, t), or None; ``a`` and ``t``
    from constants and BN statistics that ``forward`` does not write in place (``writable``:
    also those it writes, only to name a refusal)."""
    found = constant_operand(gm, memo, node, axis, writable)
    if found is not None:
        x, op, vec, x_first = found
        vec = full(vec, features)
        if vec is None:
            return None
        ones, zeros = torch.ones(features, dtype=_F64), torch.zeros(features, dtype=_F64)
        if op == "mul":
            return x, vec, zeros
        if op == "add":
            return x, ones, vec
        if op == "sub":
            return (x, ones, -vec) if x_first else (x, -ones, vec)
        if op == "div" and x_first and bool((vec != 0).all()):
            return x, 1 / vec, zeros
        return None
    if axis != -1:
        return None
    # transpose -> BatchNorm1d -> transpose: BN over the feature axis of (N, T, C)
    inner = _is_swap(node)
    if inner is None:
        return None
    bn = as_bn(gm, inner)
    if bn is None or bn.training or bn.mean is None or bn.mean.numel() != features:
        return None
    source = _is_swap(bn.input_node) if isinstance(bn.input_node, fx.Node) else None
    if source is None or len(bn.input_node.users) != 1 or len(inner.users) != 1:
        return None
    if not writable and memo.written(bn.mean, bn.var, bn.gamma, bn.beta):
        return None  # the statistics change at every call
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    return source, a.double(), t.double()


def _is_swap(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if it swaps the last two dims of a rank-3 tensor, else None."""
    if rank(node) != 3 or not isinstance(node.args[0] if node.args else None, fx.Node):
        return None
    if (
        node.op == "call_method"
        and node.target == "transpose"
        or (node.op == "call_function" and node.target in _TRANSPOSES)
    ):
        dims = {d % 3 for d in node.args[1:3]}
        return node.args[0] if dims == {1, 2} else None
    if node.op == "call_method" and node.target == "permute":
        order = node.args[1:] if len(node.args) > 2 else node.args[1]
        return node.args[0] if [d % 3 for d in order] == [0, 2, 1] else None
    return None


def _chain_end(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The last node of a single-use affine chain after ``node``: its only user, or for
    transpose -> BatchNorm1d -> transpose the second transpose."""
    users = list(node.users)
    if len(users) != 1:
        return None
    first = users[0]
    if _is_swap(first) is node and len(first.users) == 1:
        bn = next(iter(first.users))
        if as_bn(gm, bn) is not None and len(bn.users) == 1:
            return next(iter(bn.users))
    return first


# ------------------------------------------------------------------------------------------------
# Linear


@dataclass
class LinearAffine:
    """A Linear with a per-feature affine ``around`` it (``after`` it or ``before`` it)."""

    node: fx.Node
    module: nn.Linear
    after: bool
    weight: torch.Tensor  # float64
    bias: torch.Tensor  # float64
    written: bool  # forward writes the Linear's weights in place
    around: fx.Node  # the affine's last node (after) or the Linear's input (before)
    affine: tuple[fx.Node, Any, Any] | None  # (x, a, t); None where constants are written


def linear_pattern(gm: fx.GraphModule, memo: RunMemo) -> Iterator[LinearAffine]:
    """Every Linear module, called once, with an affine of its output or of its input (tried
    when the one after it is not folded for its constants)."""
    calls, owners = call_counts(gm), param_owners(gm)
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        layer = as_layer(gm, node, include_linear=True)
        if layer is None or layer.kind != "linear" or layer.module is None:
            continue  # F.linear is left alone: its weights may be read elsewhere
        if calls[id(layer.module)] != 1 or owners[id(layer.module.weight)] != 1:
            continue  # a shared Linear: changing it would change its other uses
        m = layer.module
        out_f, in_f = m.weight.shape
        weight = m.weight.detach().double()
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(out_f, dtype=_F64)
        written = memo.written(m.weight, m.bias)
        # after: the Linear's only use is a per-feature affine of it
        end = _chain_end(gm, node)
        after = affine(gm, memo, end, out_f, writable=True) if end is not None else None
        if after is not None and after[0] is node:
            aff = None if written else affine(gm, memo, end, out_f)
            yield LinearAffine(node, m, True, weight, bias, written, end, aff)
            if written or aff is not None:
                continue  # folded, or its own weights written: nothing more to try
        # before: the Linear's input is a per-feature affine used only by it
        x = layer.input_node
        single = isinstance(x, fx.Node) and len(x.users) == 1
        if single and affine(gm, memo, x, in_f, writable=True):
            aff = None if written else affine(gm, memo, x, in_f)
            yield LinearAffine(node, m, False, weight, bias, written, x, aff)


def linear_check(gm: fx.GraphModule, memo: RunMemo, m: LinearAffine) -> str | None:
    if m.affine is None:  # the weights or the affine's constants written in place
        return "written-in-place"
    if not m.after and memo.written_before(m.affine[0], m.node):
        return "written-in-place"
    return None


def linear_rewrite(gm: fx.GraphModule, memo: RunMemo, m: LinearAffine) -> Counter:
    source, a, t = m.affine
    if m.after:
        _set_linear(m.module, m.weight * a[:, None], a * m.bias + t)
        m.around.replace_all_uses_with(m.node)
        m.node.meta = dict(m.around.meta)
    else:
        _set_linear(m.module, m.weight * a[None, :], m.bias + m.weight @ t)
        m.node.replace_input_with(m.around, source)
    return Counter({"folded-affine": 1})


LINEAR_RULE = Rule("affine-linear", linear_pattern, linear_check, linear_rewrite)


def _set_linear(m: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """New parameters (never an in-place write: the old ones may be inference tensors, and the
    run's float64 memo relies on weights not changing in place)."""
    m.weight = as_parameter(weight.to(m.weight.dtype), m.weight.requires_grad)
    m.bias = as_parameter(bias.to(m.weight.dtype), m.weight.requires_grad)


# ------------------------------------------------------------------------------------------------
# conv


@dataclass
class ConvAffine:
    """A conv (``branch``) whose only use is ``a * conv(x) + t``, ending at ``end``."""

    node: fx.Node
    branch: Branch
    a: torch.Tensor
    t: torch.Tensor
    end: fx.Node
    dead: list[fx.Node]  # the affine's nodes, erased once folded
    written: bool  # weights, statistics or constants written in place


def conv_pattern(gm: fx.GraphModule, memo: RunMemo) -> Iterator[ConvAffine]:
    """Every conv used only by a per-channel affine (a BatchNorm, or ``* c``, ``+ c``...)."""
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        b = conv_branch(gm, node, memo=memo)
        if b is None or b.pool:
            continue  # pools stay pools unless they merge with a conv
        user = next(iter(node.users))
        bn = as_bn(gm, user)
        if bn is not None:
            if bn.training or bn.mean is None or not bn.constant or bn.input_node is not node:
                continue
            a, t = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
            end, dead = bn.output_node, [bn.output_node, bn.node]
            written = b.written or memo.written(bn.mean, bn.var, bn.gamma, bn.beta)
        else:
            channels = b.weight.shape[0]
            aff = affine(gm, memo, user, channels, axis=1, writable=True)
            if aff is None or aff[0] is not node:
                continue
            _, a, t = aff
            end, dead = user, [user]
            written = b.written or affine(gm, memo, user, channels, axis=1) is None
        yield ConvAffine(node, b, a, t, end, dead, written)


def conv_check(gm: fx.GraphModule, memo: RunMemo, m: ConvAffine) -> str | None:
    if m.written:  # forward writes the weights, statistics or constants in place
        return "written-in-place"
    if memo.written_before(m.branch.input, m.end):
        return "written-in-place"
    return None


def conv_rewrite(gm: fx.GraphModule, memo: RunMemo, m: ConvAffine) -> Counter:
    b = m.branch
    merged = affine_branch(b, m.a, m.t)
    name = new_conv(gm, merged, b.padding, b.padding_mode, layer_dtype(m.node, (b,)))
    with gm.graph.inserting_before(m.end):
        conv = gm.graph.call_module(name, (b.input,))
    conv.meta = dict(m.end.meta)
    m.end.replace_all_uses_with(conv)
    for n in [*dict.fromkeys(m.dead), m.node]:
        if n.graph is not None and not n.users:
            gm.graph.erase_node(n)
    return Counter({"folded-affine": 1})


CONV_RULE = Rule("affine-conv", conv_pattern, conv_check, conv_rewrite)

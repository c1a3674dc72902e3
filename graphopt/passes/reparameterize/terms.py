"""A node read as a linear expression: a binary op with a constant per-channel operand, and a
signed, per-channel-scaled sum of terms (``a*conv3(x) + conv1(x) - bn(x)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphopt.fx.constants import constant
from graphopt.fx.layers import rank
from graphopt.fx.memo import RunMemo
from graphopt.fx.ops import BINARY, INPLACE, is_sub, is_sum
from graphopt.fx.uses import sole_value_user, value_users

_F64 = torch.float64


def vector(c: torch.Tensor, ndim: int | None, axis: int) -> torch.Tensor | None:
    """``c`` as a vector along ``axis`` of a rank-``ndim`` tensor it broadcasts against: shape
    [n], or [1] for a scalar; None if it varies along any other axis."""
    if c.numel() == 1:
        return c.reshape(1)
    ndim = c.dim() if ndim is None and axis < 0 else ndim
    if ndim is None or c.dim() > ndim:
        return None
    shape = (1,) * (ndim - c.dim()) + tuple(c.shape)
    axis %= ndim
    if any(s != 1 for i, s in enumerate(shape) if i != axis):
        return None
    return c.reshape(-1)


def full(v: torch.Tensor, n: int) -> torch.Tensor | None:
    """A [1] or [n] vector as [n]; None for any other length."""
    if v.numel() == 1:
        return v.reshape(1).expand(n).clone()
    return v.reshape(n) if v.numel() == n else None


def constant_operand(
    gm: fx.GraphModule, memo: RunMemo, node: fx.Node, axis: int, writable: bool = False
) -> tuple[fx.Node, str, torch.Tensor, bool] | None:
    """``node`` as a binary op (``mul``, ``add``, ``sub``, ``div``; not in place) of a graph
    value ``x`` and a constant that is a vector along ``axis`` ([n], or [1] for a scalar):
    ``(x, op, vector, x is the first operand)``, or None (``writable``: see
    :func:`graphopt.fx.constants.constant`)."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs or node.target in INPLACE:
        return None
    op = next((name for name, targets in BINARY.items() if node.target in targets), None)
    if op is None:
        return None
    x, c = node.args
    if constant(gm, x, memo, writable) is not None:
        x, c = c, x  # c * x, c + x, c - x
    const = constant(gm, c, memo, writable)
    if not isinstance(x, fx.Node) or constant(gm, x, memo, writable) is not None or const is None:
        return None
    vec = vector(const, rank(node), axis)
    return (x, op, vec, node.args[0] is x) if vec is not None else None


def scaled(gm: fx.GraphModule, memo: RunMemo, node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``node`` as ``c * inner`` (or ``inner / c``) with ``c`` a constant per channel (axis 1)."""
    found = constant_operand(gm, memo, node, 1)
    if found is None:
        return None
    x, op, vec, x_first = found
    if op == "mul":
        return x, vec
    if op == "div" and x_first and bool((vec != 0).all()):
        return x, 1 / vec
    return None


def _times(c: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    return factor if c is None else c * factor


def _expand(gm: fx.GraphModule, memo: RunMemo, node: fx.Node, root: fx.Node) -> list:
    """The terms of a signed, per-channel-scaled sum that ``node`` contributes: (leaf, coef)."""
    if node is root or len(value_users(node)) != 1:
        return [(node, None)]
    if is_sum(node):
        return terms(gm, memo, node, root)
    found = scaled(gm, memo, node)
    if found is not None:
        inner, vec = found
        return [(leaf, _times(c, vec)) for leaf, c in _expand(gm, memo, inner, root)]
    return [(node, None)]


def terms(gm: fx.GraphModule, memo: RunMemo, node: fx.Node, root: fx.Node) -> list:
    """The sum ``node`` (under ``root``) as its terms ``(leaf, coef)``: ``coef`` a per-channel
    float64 factor, or None for 1; sums and scales used only inside it are expanded."""
    a, b = node.args
    second = _expand(gm, memo, b, root)
    if is_sub(node):
        minus = torch.tensor([-1.0], dtype=_F64)
        second = [(leaf, _times(c, minus)) for leaf, c in second]
    return _expand(gm, memo, a, root) + second


def is_inner(gm: fx.GraphModule, memo: RunMemo, node: fx.Node) -> bool:
    """A sum whose value only feeds a bigger sum (possibly through a per-channel scale): the
    bigger sum's root handles it."""
    user = sole_value_user(node)
    if user is None:
        return False
    if is_sum(user):
        return True
    found = scaled(gm, memo, user)
    return (
        found is not None
        and found[0] is node
        and (outer := sole_value_user(user)) is not None
        and is_sum(outer)
    )

"""Elementwise arithmetic in all its spellings: ``x + y``, ``torch.add(x, y)``, ``x.add(y)``,
``x += y`` and the aten ops ``torch.export`` writes."""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# in-place forms (``out += y``; aten's add_) mutate their first operand: binary() requires that
# operand to have no other use, so reading it as an out-of-place op is sound
INPLACE = {operator.iadd, operator.isub, operator.imul, aten.add_.Tensor, aten.sub_.Tensor}
INPLACE |= {aten.mul_.Tensor}
ADDS = {operator.add, torch.add, operator.iadd, aten.add.Tensor, aten.add_.Tensor}
SUBS = {operator.sub, torch.sub, operator.isub, aten.sub.Tensor, aten.sub_.Tensor}
MULS = {operator.mul, torch.mul, operator.imul, aten.mul.Tensor, aten.mul_.Tensor}
DIVS = {operator.truediv, torch.div, aten.div.Tensor}
BINARY = {"mul": MULS, "add": ADDS, "sub": SUBS, "div": DIVS}


def binary(node: fx.Node, functions: set, method: str) -> bool:
    """``node`` calls one of ``functions`` or the method ``method`` on two operands (no
    ``alpha``; an in-place form only where nothing else reads the operand it writes)."""
    if node.op == "call_function" and node.target in functions:
        if node.target in INPLACE and (
            not isinstance(node.args[0], fx.Node) or len(node.args[0].users) != 1
        ):
            return False
        return len(node.args) == 2 and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target == method and len(node.args) == 2


def is_add(node: fx.Node) -> bool:
    """``a + b`` in any spelling (see :func:`binary`)."""
    return binary(node, ADDS, "add")


def is_sub(node: fx.Node) -> bool:
    """``a - b`` in any spelling (see :func:`binary`)."""
    return binary(node, SUBS, "sub")


def is_sum(node: fx.Node) -> bool:
    """An add or subtract of two graph values (not of a scalar)."""
    return (is_add(node) or is_sub(node)) and all(isinstance(a, fx.Node) for a in node.args)

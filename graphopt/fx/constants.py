"""Constants a graph reads: attribute tensors (``get_attr``) and plain numbers."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphopt.fx.memo import RunMemo
from graphopt.fx.names import fetch_attr


class NotConstant(Exception):
    """An operand that should be a constant is a computed graph value."""


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for an absent operand, or an attribute that is
    not a tensor); raises :class:`NotConstant` for any other graph value."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = fetch_attr(gm, node.target)
        return obj if isinstance(obj, torch.Tensor) else None
    raise NotConstant


def constant(
    gm: fx.GraphModule, arg: Any, memo: RunMemo, writable: bool = False
) -> torch.Tensor | None:
    """``arg`` as a float64 constant: a number, or an attribute tensor that ``forward`` does not
    write in place (``writable``: also one it writes, only to name a refusal); else None."""
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj = fetch_attr(gm, arg.target)
        if not isinstance(obj, torch.Tensor) or (not writable and memo.written(obj)):
            return None  # written in place: a different value at every call
        return obj.detach().double()
    return None

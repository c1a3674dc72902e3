"""An explicit constant pad in front of a conv, in the forms DiverseBranchBlock's BN-and-pad
takes: ``F.pad(z, p, value=c)``; ``F.pad(z, p) + v``; ``F.pad(z, p)`` then in-place writes of
``v`` over the border rows and columns (the reference ``BNAndPadLayer``; FX cannot trace item
assignment, so capture uses torch.export, which writes them as slice -> ``copy_``).

A pad the next conv can absorb is symmetric per spatial dim, and its border holds one value per
channel (``border``): the sequential rule merges it into the conv's own padding where the
first conv's bias equals that border.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from graphopt.fx.constants import constant
from graphopt.fx.layers import call_args, shape
from graphopt.fx.memo import RunMemo
from graphopt.passes.reparameterize.terms import constant_operand, vector

aten = torch.ops.aten
_PADS = {F.pad, aten.pad.default, aten.constant_pad_nd.default}


@dataclass
class Pad:
    """An explicit constant pad in front of a conv: ``pad(source)`` (+ ``shift``), border value
    ``border`` per channel (shape [1] or [C]); ``nodes`` are what to erase once merged."""

    source: fx.Node
    amounts: tuple[int, ...]  # symmetric padding per spatial dim
    border: torch.Tensor
    shift: torch.Tensor
    nodes: list[fx.Node] = field(default_factory=list)


def _is_pad(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _PADS


def explicit_pad(gm: fx.GraphModule, memo: RunMemo, node: Any, dims: int) -> Pad | None:
    """``node`` as a constant pad of a tensor (see the module docstring), or None."""
    if not isinstance(node, fx.Node):
        return None
    shift, nodes = torch.zeros(1, dtype=torch.float64), []
    found = constant_operand(gm, memo, node, 1) if len(node.users) == 1 else None
    if found is not None and found[1] == "add":
        pad, _, vec, _ = found
        if not _is_pad(pad) or len(pad.users) != 1:
            return None
        shift, nodes, node = vec, [node], pad
    if not _is_pad(node):
        return None
    names = ["input", "pad", "value"] if node.target is aten.constant_pad_nd.default else None
    v = call_args(node, names or ["input", "pad", "mode", "value"])
    pads = list(v["pad"])
    if v.get("mode", "constant") != "constant" or len(pads) % 2 or len(pads) > 2 * dims:
        return None
    pads += [0] * (2 * dims - len(pads))
    if any(pads[2 * i] != pads[2 * i + 1] for i in range(dims)):
        return None  # asymmetric: no conv padding expresses it
    amounts = tuple(int(pads[2 * i]) for i in reversed(range(dims)))
    border = shift + float(v.get("value") or 0.0)
    chains = {u: _write_chain(u) for u in node.users}
    writes = [chain for chain in chains.values() if chain is not None]
    readers = [u for u, chain in chains.items() if chain is None]
    if len(readers) != 1:
        return None
    if writes:
        if nodes:
            return None
        value = _border_writes(gm, memo, node, writes, readers[0], amounts)
        if value is None:
            return None
        border = value
    dead = [n for chain in writes for n in reversed(chain)]
    return Pad(node.args[0], amounts, border, shift, [*nodes, *dead, node])


def _write_chain(node: fx.Node) -> list[fx.Node] | None:
    """``node`` (a user of a padded tensor) as an in-place write into a region of it, aten's
    slice -> ... -> slice -> ``copy_``: the nodes, in order; None if it is anything else."""
    chain = [node]
    while chain[-1].target is aten.slice.Tensor and len(chain[-1].users) == 1:
        chain.append(next(iter(chain[-1].users)))
    last = chain[-1]
    if len(chain) < 2 or last.op != "call_function" or last.target is not aten.copy_.default:
        return None
    return None if last.users else chain


def _write_region(chain: list[fx.Node], rank: int) -> tuple[tuple, Any] | None:
    """The index (one slice per dim) and the value of a write chain."""
    index = [slice(None)] * rank
    for s in chain[:-1]:
        args = [*s.args, None, None, None, 1][1:5]
        dim, start, end, step = (int(args[0]) % rank, args[1], args[2], args[3] or 1)
        if index[dim] != slice(None) or step != 1:
            return None
        index[dim] = slice(start, end)
    return tuple(index), chain[-1].args[1]


def _border_writes(
    gm: fx.GraphModule,
    memo: RunMemo,
    pad: fx.Node,
    writes: list[list[fx.Node]],
    reader: fx.Node,
    amounts: tuple[int, ...],
) -> torch.Tensor | None:
    """The per-channel value that the write chains put on exactly the padded border, before
    ``reader`` reads it; None if they do anything else."""
    pad_shape = shape(pad)
    if pad_shape is None:
        return None
    order = {n: i for i, n in enumerate(pad.graph.nodes)}
    written = torch.zeros(pad_shape[2:], dtype=torch.bool)
    value = None
    every = slice(None)
    for chain in writes:
        region = _write_region(chain, len(pad_shape))
        if region is None or order[chain[-1]] > order[reader]:
            return None
        index, val = region
        if index[:2] != (every, every):
            return None
        # x.expand(region) only broadcasts x; with a dynamic batch the region's size is
        # symbolic and constant folding leaves the expand: read the value it broadcasts
        while isinstance(val, fx.Node) and (
            val.target is torch.ops.aten.expand.default
            or (val.op == "call_method" and val.target == "expand")
        ):
            val = val.args[0]
        const = constant(gm, val, memo)
        vec = _channel_values(const, len(pad_shape)) if const is not None else None
        if vec is None or (value is not None and not torch.equal(vec, value)):
            return None
        value = vec
        written[index[2:]] = True
    interior = torch.ones_like(written)
    interior[tuple(slice(a, n - a) for a, n in zip(amounts, pad_shape[2:], strict=True))] = False
    return value if torch.equal(written, interior) else None


def _channel_values(c: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A per-channel constant, also when already broadcast to a region's shape (aten graphs
    write ``v.expand(region)``, which constant folding turns into a full tensor)."""
    vec = vector(c, rank, 1)
    if vec is not None or c.dim() != rank:
        return vec
    vec = c[(0, slice(None)) + (0,) * (rank - 2)]
    view = (1, -1) + (1,) * (rank - 2)
    return vec if torch.equal(vec.reshape(view).expand_as(c), c) else None

"""Ordering, indexing and scan converters: TopK, ArgMax/ArgMin, CumSum, Trilu, GatherElements,
ScatterElements, ScatterND, Einsum -- and Mod.

Each follows ONNX's spec exactly and is written with torch ops that the TorchScript exporter
(opset 17) writes back as the same ONNX op, so an imported graph re-exports as it came:

    TopK             a stable sort, cut to k (ties: the lower index first, as ONNX says; torch's
                     own topk orders ties as it likes); exports as TopK through
                     :class:`_TopKOp`'s symbolic, a runtime k kept as its input
    ArgMax/ArgMin    torch.argmax/argmin (the first index of a tie, ONNX's default);
                     select_last_index=1:  (n - 1) - argmax(flip(x))
    CumSum           torch.cumsum in x's dtype (torch widens integers to int64);
                     reverse:    flip . cumsum . flip
                     exclusive:  the inclusive sum shifted one step, a zero first (not y - x,
                                 which rounds differently for floats)
                     an axis known only at run time: one cumsum per possible axis, picked with
                     where(axis == d)
    Trilu            torch.triu/tril for a constant k; a runtime k: where(col - row >= k, x, 0)
                     (<= k for the lower triangle), which stays exact for every k
    GatherElements   torch.gather, indices made non-negative: where(i < 0, i + n, i)
    ScatterElements  torch.scatter, or torch.scatter_reduce(include_self=True) for
                     reduction add/mul/max/min (sum/prod/amax/amin); indices as above (also
                     Scatter, its name in opsets 9-10)
    ScatterND        ScatterElements over data flattened to [prod(shape[:q]), *shape[q:]]: an
                     index tuple (i0, ..., iq-1) is the row i0 * n1 * ... + iq-1 (Horner), so
                     duplicates reduce exactly as ScatterND's reduction does
    Einsum           torch.einsum (spaces removed; implicit output and ellipses as numpy's)
    Mod              fmod=1: torch.fmod (C's fmod, the sign of the dividend);
                     fmod=0, integers: torch.remainder (the sign of the divisor);
                     fmod=0, floats: m = fmod(a, b);  m + b where m != 0 and sign(m) != sign(b);
                     a zero takes b's sign (numpy's mod, which ONNX's reference is)

Refused (the node stays an ONNX node, run by ONNX Runtime): TopK sorted=0 (ONNX leaves the order
unspecified and ONNX Runtime's order is its own), ScatterND whose index depth is unknown or 0,
unknown reductions.
"""

from __future__ import annotations

import operator
from typing import Any

import onnx
import torch
import torch.fx as fx

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.values import Value, is_int_dtype

# --------------------------------------------------------------------------- run-time helpers


class _TopKOp(torch.autograd.Function):
    """ONNX ``TopK(x, k)`` with ``sorted=1``: a stable sort cut to ``k`` (ties: lower index
    first); exports as the ONNX op, a runtime ``k`` kept as its input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: Any, axis: int, largest: bool) -> Any:
        count = int(k.reshape(-1)[0]) if isinstance(k, torch.Tensor) else int(k)
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)

    @staticmethod
    def symbolic(g: Any, x: Any, k: Any, axis: int, largest: bool) -> Any:
        if isinstance(k, int):
            k = g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64))
        else:
            k = g.op("Cast", k, to_i=onnx.TensorProto.INT64)
            k = g.op("Reshape", k, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        return g.op("TopK", x, k, axis_i=axis, largest_i=int(largest), sorted_i=1, outputs=2)


def topk_onnx(x: torch.Tensor, k: Any, axis: int, largest: bool) -> tuple[torch.Tensor, ...]:
    """ONNX TopK (sorted): values and int64 indices; ``k`` an int or a 1-element tensor."""
    return _TopKOp.apply(x, k, axis, largest)


def arg_extreme_last(x: torch.Tensor, axis: int, keepdim: bool, largest: bool) -> torch.Tensor:
    """ArgMax/ArgMin with select_last_index=1: the last index of a tie."""
    fn = torch.argmax if largest else torch.argmin
    return (x.shape[axis] - 1) - fn(x.flip(axis), axis, keepdim)


def cumsum_onnx(x: torch.Tensor, axis: int, exclusive: bool, reverse: bool) -> torch.Tensor:
    """ONNX CumSum along a known axis, in x's dtype."""
    axis = axis % x.dim()
    y = x.flip(axis) if reverse else x
    total = torch.cumsum(y, axis, dtype=x.dtype)
    if exclusive:  # shift by one along the axis: [0, y0, y0 + y1, ...]
        lead = (slice(None),) * axis
        zero = torch.zeros_like(y[lead + (slice(0, 1),)])
        total = torch.cat([zero, total[lead + (slice(None, -1),)]], axis)
    return total.flip(axis) if reverse else total


def cumsum_runtime_axis(
    x: torch.Tensor, axis: torch.Tensor, exclusive: bool, reverse: bool
) -> torch.Tensor:
    """ONNX CumSum whose axis is a runtime 0-D tensor: one sum per axis, picked by where."""
    rank = x.dim()
    y = cumsum_onnx(x, rank - 1, exclusive, reverse)
    for d in range(rank - 1):
        chosen = (axis == d) | (axis == d - rank)
        y = torch.where(chosen, cumsum_onnx(x, d, exclusive, reverse), y)
    return y


def trilu_runtime_k(x: torch.Tensor, k: torch.Tensor, upper: bool) -> torch.Tensor:
    """ONNX Trilu with ``k`` a runtime 0-D tensor: keep where col - row >= k (upper) or <= k."""
    rows = torch.arange(x.shape[-2], device=x.device).unsqueeze(-1)
    cols = torch.arange(x.shape[-1], device=x.device)
    offset = cols - rows
    keep = offset >= k if upper else offset <= k
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def nonnegative(index: torch.Tensor, size: Any) -> torch.Tensor:
    """int64 indices with a negative one counted from the end: where(i < 0, i + n, i)."""
    index = index.to(torch.int64)
    return torch.where(index < 0, index + size, index)


def gather_elements(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.gather(x, axis, nonnegative(index, x.shape[axis]))


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def scatter_onnx(
    data: torch.Tensor, axis: int, index: torch.Tensor, updates: torch.Tensor, reduction: str
) -> torch.Tensor:
    """ScatterElements on non-negative int64 indices."""
    if reduction == "none":
        return torch.scatter(data, axis, index, updates)
    return torch.scatter_reduce(
        data, axis, index, updates, _SCATTER_REDUCE[reduction], include_self=True
    )


def scatter_elements(
    data: torch.Tensor, index: torch.Tensor, updates: torch.Tensor, axis: int, reduction: str
) -> torch.Tensor:
    index = nonnegative(index, data.shape[axis])
    return scatter_onnx(data, axis, index, updates, reduction)


def scatter_nd(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, depth: int, reduction: str
) -> torch.Tensor:
    """ONNX ScatterND with index tuples of ``depth`` entries, as ScatterElements along the rows
    of ``data`` flattened over its first ``depth`` axes."""
    row = nonnegative(indices[..., 0], data.shape[0])
    for i in range(1, depth):
        row = row * data.shape[i] + nonnegative(indices[..., i], data.shape[i])
    rest = data.shape[depth:]
    target = data.reshape(-1, *rest)
    source = updates.reshape(-1, *rest)
    index = row.reshape(-1, *[1] * len(rest)).expand_as(source)
    return scatter_onnx(target, 0, index, source, reduction).reshape(data.shape)


def mod_floor_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Mod fmod=0 on floats (numpy's mod): the remainder has the divisor's sign."""
    m = torch.fmod(a, b)
    m = torch.where((m != 0) & ((m < 0) != (b < 0)), m + b, m)
    # a zero remainder is +0 or -0 as the divisor is
    return torch.where(m == 0, torch.where(b < 0, -m.abs(), m.abs()), m)


# --------------------------------------------------------------------------- converters


@converter("TopK")
def _topk(ctx: Ctx) -> list[Value]:
    if not ctx.attr("sorted", 1):
        raise ctx.fail(
            "sorted=0 is not supported: ONNX leaves the order of the k elements unspecified "
            "and ONNX Runtime returns its own, which a sorted result would not match",
            "Export with sorted=1 (torch.topk's default).",
        )
    axis = int(ctx.attr("axis", -1))
    largest = bool(ctx.attr("largest", 1))
    x = ctx.tensor(0)
    if ctx.opset < 10:
        k: Any = int(ctx.attr("k"))
    elif (const := ctx.const(1)) is not None:
        k = int(const.reshape(-1)[0])
    else:
        k = ctx.tensor(1)
    both = ctx.call(topk_onnx, x, k, axis, largest)
    return [ctx.call(operator.getitem, both, 0), ctx.call(operator.getitem, both, 1)]


@converter("ArgMax", "ArgMin")
def _arg_extreme(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    keepdim = bool(ctx.attr("keepdims", 1))
    largest = ctx.op == "ArgMax"
    x = ctx.tensor(0)
    if ctx.attr("select_last_index", 0):
        return ctx.call(arg_extreme_last, x, axis, keepdim, largest)
    fn = torch.argmax if largest else torch.argmin
    return ctx.call(fn, x, axis, keepdim)


@converter("CumSum")
def _cumsum(ctx: Ctx) -> Value:
    exclusive = bool(ctx.attr("exclusive", 0))
    reverse = bool(ctx.attr("reverse", 0))
    x = ctx.tensor(0)
    axis = ctx.materialize(ctx.value(1))  # a shape value (Sym) becomes a runtime tensor
    if isinstance(axis, fx.Node):  # known only at run time: every axis is a candidate
        if ctx.rank(0) is None:
            raise ctx.fail(
                "the axis is a runtime input and the rank of the input is unknown",
                "Give the axis as a constant (torch's exporter does).",
            )
        return ctx.call(cumsum_runtime_axis, x, axis, exclusive, reverse)
    (dim,) = ctx.const_ints(1, "axis") or [0]
    if not (exclusive or reverse):
        return ctx.call(torch.cumsum, x, dim, dtype=ctx.dtype(0))
    return ctx.call(cumsum_onnx, x, dim, exclusive, reverse)


@converter("Trilu")
def _trilu(ctx: Ctx) -> Value:
    upper = bool(ctx.attr("upper", 1))
    x = ctx.tensor(0)
    k = ctx.materialize(ctx.value(1)) if ctx.has(1) else None
    if isinstance(k, fx.Node):  # runtime k: a mask, exact for every k
        return ctx.call(trilu_runtime_k, x, k, upper)
    (diagonal,) = ctx.const_ints(1, "k") or [0]
    return ctx.call(torch.triu if upper else torch.tril, x, diagonal)


@converter("GatherElements")
def _gather_elements(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    x, index = ctx.tensor(0), ctx.tensor(1)
    size = ctx.static_dim(0, axis)
    if isinstance(index, torch.Tensor) and size is not None:  # normalized now
        return ctx.call(torch.gather, x, axis, nonnegative(index, size))
    return ctx.call(gather_elements, x, index, axis)


def _reduction(ctx: Ctx) -> str:
    reduction = ctx.attr("reduction", "none")
    if reduction != "none" and reduction not in _SCATTER_REDUCE:
        raise ctx.fail(f"reduction={reduction!r} is not supported")
    return reduction


@converter("ScatterElements", "Scatter")  # Scatter: its name before opset 11
def _scatter_elements(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    reduction = _reduction(ctx)
    data, index, updates = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    size = ctx.static_dim(0, axis)
    if isinstance(index, torch.Tensor) and size is not None:  # normalized now
        return ctx.call(scatter_onnx, data, axis, nonnegative(index, size), updates, reduction)
    return ctx.call(scatter_elements, data, index, updates, axis, reduction)


@converter("ScatterND")
def _scatter_nd(ctx: Ctx) -> Value:
    reduction = _reduction(ctx)
    depth = ctx.static_dim(1, -1)
    if not depth:
        raise ctx.fail(
            f"the last dim of indices (the index depth) is {'0' if depth == 0 else 'unknown'}, "
            "which is not supported"
        )
    data, indices, updates = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    return ctx.call(scatter_nd, data, indices, updates, depth, reduction)


@converter("Einsum")
def _einsum(ctx: Ctx) -> Value:
    equation = str(ctx.attr("equation", "")).replace(" ", "")
    operands = [ctx.tensor(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    return ctx.call(torch.einsum, equation, *operands)


@converter("Mod")
def _mod(ctx: Ctx) -> Value:
    a, b = ctx.tensor(0), ctx.tensor(1)
    if ctx.attr("fmod", 0):
        return ctx.call(torch.fmod, a, b)
    if is_int_dtype(ctx.dtype(0)):
        return ctx.call(torch.remainder, a, b)
    return ctx.call(mod_floor_float, a, b)

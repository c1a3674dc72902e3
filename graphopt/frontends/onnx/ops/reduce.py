"""Reduction converters: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceL2.

Integer inputs keep their dtype (ONNX's integer mean truncates), an empty set reduces to the
dtype's extreme where torch's amax/amin would raise, and axes known only at run time go through
:func:`~graphopt.frontends.onnx.runtime.reduce_onnx`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import refuse_dtype, wide_uint_dtype
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import reduce_extreme, reduce_onnx
from graphopt.frontends.onnx.values import Value, is_int_dtype

_REDUCE: dict[str, Callable[..., torch.Tensor]] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
}


@converter(*_REDUCE, "ReduceL2")
def _reduce(ctx: Ctx) -> Value:
    keepdim = bool(ctx.attr("keepdims", 1))
    noop = bool(ctx.attr("noop_with_empty_axes", 0))
    x = ctx.tensor(0)
    dtype = ctx.dtype(0)
    wide = wide_uint_dtype(ctx)
    if wide is not None and ctx.op not in ("ReduceSum", "ReduceMax", "ReduceMin"):
        raise refuse_dtype(ctx, wide)
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(reduce_onnx, x, ctx.tensor(1), ctx.op, keepdim, noop)
    if axes is None and ctx.has(1):
        axes = ctx.const_ints(1, "axes")
    if not axes:
        if noop:
            return x
        rank = ctx.rank(0)
        if rank is None:
            return ctx.call(reduce_onnx, x, None, ctx.op, keepdim, noop)
        axes = list(range(rank))
    axes = list(axes)
    if wide is not None or ctx.op in ("ReduceMean", "ReduceSum") and is_int_dtype(dtype):
        return ctx.call(reduce_onnx, x, axes, ctx.op, keepdim, noop)
    if ctx.op == "ReduceL2":
        return ctx.call(torch.linalg.vector_norm, x, 2, dim=axes, keepdim=keepdim)
    if ctx.op in ("ReduceMax", "ReduceMin"):
        sizes = [ctx.static_dim(0, a) for a in axes]
        if not all(isinstance(n, int) and n > 0 for n in sizes):  # may reduce an empty set
            return ctx.call(reduce_extreme, x, axes, keepdim, ctx.op == "ReduceMax")
    return ctx.call(_REDUCE[ctx.op], x, dim=axes, keepdim=keepdim)

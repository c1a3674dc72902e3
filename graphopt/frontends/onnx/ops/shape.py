"""Shape and data-movement converters: Shape, Size, Constant, ConstantOfShape, Range, Reshape,
Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice, Gather, Expand, Tile, Pad,
DepthToSpace, SpaceToDepth.

``Shape`` produces a :class:`~graphopt.frontends.onnx.values.Sym` and the converters here keep it
symbolic, so that the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains of a dynamic
batch become ``x.reshape(x.size(0), -1)``.  What is known only at run time goes through the
``*_dynamic`` / ``slice_onnx`` functions of :mod:`graphopt.frontends.onnx.runtime`.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import refuse_dtype, scalar_of
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import (
    depth_to_space_dcr,
    expand_dynamic,
    full_dynamic,
    gather,
    gather_any,
    onnx_slice_range,
    pad_axis,
    pad_dynamic,
    range_dynamic,
    reshape_dynamic,
    shape_tensor,
    slice_onnx,
    space_to_depth,
    split_dynamic,
    squeeze_dynamic,
    tile_dynamic,
    torch_pad,
    unsqueeze_dynamic,
)
from graphopt.frontends.onnx.values import (
    WIDE_UINT,
    Sym,
    Value,
    make_sym,
    sym_items,
    tensor_from_proto,
)

logger = logging.getLogger(__name__)


# ONNX int64 "infinity" used by Slice ends; anything beyond this magnitude means "to the end".
_BIG = 2**62


@converter("Shape")
def _shape(ctx: Ctx) -> Value:
    start, end = int(ctx.attr("start", 0)), ctx.attr("end")
    v = ctx.value(0)
    if isinstance(v, Sym):
        dims: list[Any] = [] if v.scalar else [len(v.items)]
        return torch.tensor(dims[start:end], dtype=torch.int64)
    dims = ctx.dims_of(0)
    if dims is None:
        logger.debug(
            "Shape %s: rank of %r unknown, computing the shape at run time",
            ctx.name,
            ctx.node.input[0],
        )
        return ctx.call(shape_tensor, v, start, end)
    return make_sym(dims[start:end])


@converter("Size")
def _size(ctx: Ctx) -> Value:
    if isinstance(sym := ctx.value(0), Sym):  # a shape value: its length is known at import
        return torch.tensor(1 if sym.scalar else len(sym.items))
    v = ctx.tensor(0)
    if isinstance(v, torch.Tensor):
        return torch.tensor(v.numel())
    return Sym([ctx.method("numel", v)], scalar=True)  # a Python int at run time


@converter("Constant")
def _constant(ctx: Ctx) -> Value:
    a = ctx.attrs
    if "value" in a:
        return tensor_from_proto(a["value"])
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    raise ctx.fail(
        f"constant attribute {sorted(a)} is not supported (only value, value_float(s) "
        f"and value_int(s))"
    )


@converter("ConstantOfShape")
def _constant_of_shape(ctx: Ctx) -> Value:
    proto = ctx.attr("value")
    fill = tensor_from_proto(proto) if proto is not None else torch.zeros(1)
    value, dtype = fill.reshape(-1)[0].item(), fill.dtype
    shape = ctx.value(0)
    items = sym_items(shape)
    if items is not None:
        return ctx.call(torch.full, items, value, dtype=dtype)
    return ctx.call(full_dynamic, ctx.materialize(shape), value, dtype)


@converter("Range")
def _range(ctx: Ctx) -> Value:
    args = []
    for i in range(3):
        v = ctx.value(i)
        if isinstance(v, Sym):
            args.append(v.items[0])
        elif isinstance(v, torch.Tensor):
            args.append(v.item())
        else:
            args.append(v)
    dtype = ctx.dtype(0) or ctx.dtype(1)
    if any(isinstance(a, fx.Node) for a in args):  # bounds computed at run time
        return ctx.call(range_dynamic, *args, dtype)
    return ctx.call(torch.arange, *args, dtype=dtype)


def _reshape_dims(ctx: Ctx, items: list[Any], allowzero: bool) -> list[Any] | None:
    """Target dims for torch's reshape: ONNX 0 ("copy the input dim") resolved."""
    if allowzero or not any(isinstance(d, int) and d == 0 for d in items):
        return items
    dims = ctx.dims_of(0)
    out = []
    for k, d in enumerate(items):
        if isinstance(d, int) and d == 0:
            if dims is None or k >= len(dims):
                return None
            out.append(dims[k])
        else:
            out.append(d)
    return out


@converter("Reshape")
def _reshape(ctx: Ctx) -> Value:
    data, shape = ctx.value(0), ctx.value(1)
    allowzero = bool(ctx.attr("allowzero", 0))
    items = sym_items(shape)
    if isinstance(data, Sym) and items is not None and all(isinstance(d, int) for d in items):
        if items in ([-1], [len(data.items)]):
            return Sym(data.items, False, data.dtype)
        if items == [] and len(data.items) == 1:
            return Sym(data.items, True, data.dtype)
    x = ctx.materialize(data)
    if items is not None:
        dims = _reshape_dims(ctx, items, allowzero)
        if dims is not None:
            return ctx.method("reshape", x, *dims) if dims else ctx.method("reshape", x, ())
    return ctx.call(reshape_dynamic, x, ctx.materialize(shape), int(allowzero))


@converter("Flatten")
def _flatten(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 1))
    x = ctx.tensor(0)
    rank = ctx.rank(0)
    if axis < 0:
        if rank is None:
            raise ctx.fail(f"a negative axis ({axis}) needs the input rank, which is unknown")
        axis += rank
    if axis == 0:
        return ctx.method("reshape", x, 1, -1)
    if rank is not None and axis == rank:
        return ctx.method("reshape", x, -1, 1)
    y = ctx.method("flatten", x, axis)
    return y if axis == 1 else ctx.method("flatten", y, 0, axis - 1)


@converter("Transpose")
def _transpose(ctx: Ctx) -> Value:
    perm = ctx.attr("perm")
    if perm is None:
        rank = ctx.rank(0)
        if rank is None:
            raise ctx.fail("perm is absent and the input rank is unknown")
        perm = list(reversed(range(rank)))
    v = ctx.value(0)
    if isinstance(v, Sym) and len(perm) <= 1:
        return v
    return ctx.method("permute", ctx.materialize(v), *perm)


@converter("Squeeze")
def _squeeze(ctx: Ctx) -> Value:
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(squeeze_dynamic, ctx.tensor(0), ctx.tensor(1))
    if axes is None and ctx.has(1):
        axes = ctx.const_ints(1, "axes")
    v = ctx.value(0)
    if isinstance(v, Sym) and not v.scalar and len(v.items) == 1 and axes in (None, [0], [-1]):
        return Sym(v.items, True, v.dtype)
    x = ctx.materialize(v)
    rank = ctx.rank(0)
    if axes is None:  # squeeze every dim of size 1; static only if every dim is known
        shape = ctx.shape(0)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return ctx.method("squeeze", x)
        axes = [k for k, d in enumerate(shape) if d == 1]
        if not axes:
            return x
    if rank is not None:
        axes = [a % rank for a in axes]
    elif len(axes) > 1 and any(a < 0 for a in axes):
        return ctx.method("squeeze", x, tuple(axes))
    for a in sorted(axes, reverse=True):
        x = ctx.method("squeeze", x, a)
    return x


@converter("Unsqueeze")
def _unsqueeze(ctx: Ctx) -> Value:
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(unsqueeze_dynamic, ctx.tensor(0), ctx.tensor(1))
    if axes is None:
        axes = ctx.const_ints(1, "axes")
    if axes is None:
        raise ctx.fail("the axes are missing")
    v = ctx.value(0)
    if isinstance(v, Sym) and v.scalar and axes in ([0], [-1]):
        return Sym(v.items, False, v.dtype)
    x = ctx.materialize(v)
    if len(axes) == 1:
        return ctx.method("unsqueeze", x, axes[0])
    rank = ctx.rank(0)
    if rank is None:
        if any(a < 0 for a in axes):
            raise ctx.fail(f"negative axes {axes} need the input rank, which is unknown")
    else:
        axes = [a % (rank + len(axes)) for a in axes]
    for a in sorted(axes):
        x = ctx.method("unsqueeze", x, a)
    return x


@converter("Concat")
def _concat(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    values = [ctx.value(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    if any(isinstance(v, Sym) for v in values) and axis in (0, -1):
        parts = [sym_items(v) for v in values]
        if all(
            p is not None and not (isinstance(v, Sym) and v.scalar)
            for p, v in zip(parts, values, strict=True)
        ):
            return make_sym([item for p in parts for item in p])
    return ctx.call(torch.cat, [ctx.materialize(v) for v in values], axis)


@converter("Split")
def _split(ctx: Ctx) -> list[Value]:
    axis = int(ctx.attr("axis", 0))
    outputs = len(ctx.node.output)
    split = ctx.attr("split")
    if split is None and isinstance(ctx.value(1), fx.Node):  # sizes known only at run time
        parts = ctx.call(split_dynamic, ctx.tensor(0), ctx.tensor(1), axis)
        return [ctx.call(operator.getitem, parts, k) for k in range(outputs)]
    if split is None and ctx.has(1):
        split = ctx.const_ints(1, "split")
    x = ctx.tensor(0)
    if split:
        parts = ctx.call(torch.split, x, list(split), axis)
    else:
        count = int(ctx.attr("num_outputs", outputs))
        size = ctx.static_dim(0, axis)
        if size is not None:
            parts = ctx.call(torch.split, x, math.ceil(size / count), axis)
        else:
            parts = ctx.call(torch.chunk, x, count, axis)
    return [ctx.call(operator.getitem, parts, k) for k in range(outputs)]


@converter("Slice")
def _slice(ctx: Ctx) -> Value:
    if ctx.opset < 10 and "starts" in ctx.attrs:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = sym_items(ctx.value(1)), sym_items(ctx.value(2))
        if any(isinstance(ctx.value(i), fx.Node) for i in (3, 4)):  # axes/steps at run time
            runtime = [ctx.tensor(i) if ctx.has(i) else None for i in (1, 2, 3, 4)]
            return ctx.call(slice_onnx, ctx.tensor(0), *runtime)
        axes, steps = ctx.const_ints(3, "axes"), ctx.const_ints(4, "steps")
    data = ctx.value(0)
    if starts is None or ends is None:  # bounds computed at run time by real tensor ops
        return ctx.call(
            slice_onnx, ctx.materialize(data), ctx.tensor(1), ctx.tensor(2), axes, steps
        )
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)

    if (
        isinstance(data, Sym)
        and axes in ([0], [-1])
        and all(isinstance(v, int) for v in starts + ends)
    ):
        return make_sym(data.items[slice(starts[0], ends[0], steps[0])], False, data.dtype)

    x = ctx.materialize(data)
    rank = ctx.rank(0)
    if rank is not None:
        axes = [a % rank for a in axes]
    elif any(a < 0 for a in axes) and any(a >= 0 for a in axes):
        raise ctx.fail(f"mixed negative and positive axes {axes} need the input rank")
    negative = bool(axes) and axes[0] < 0
    width = (-min(axes) if negative else max(axes) + 1) if axes else 0
    index: list[Any] = [slice(None)] * width
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st == 0:
            raise ctx.fail("a slice step of 0 is invalid")
        if st < 0:
            size = ctx.static_dim(0, a)
            if size is None or not isinstance(s, int) or not isinstance(e, int):
                # dim or bounds known only at run time: ONNX's clamping needs the dim's size
                bounds = [ctx.size_tensor(v) for v in (s, e)]
                x = ctx.call(slice_onnx, x, [bounds[0]], [bounds[1]], [a], [st])
                continue
            begin, stop = onnx_slice_range(s, e, st, size)
            picked = list(range(begin, stop, st))
            x = ctx.call(gather_any, x, a, torch.tensor(picked, dtype=torch.int64))
            continue
        start = None if isinstance(s, int) and s == 0 else s
        if isinstance(s, int) and s <= -_BIG:
            start = None
        stop = None if isinstance(e, int) and e >= _BIG else e
        if isinstance(e, int) and e <= -_BIG:
            stop = 0
        index[a] = slice(start, stop, None if st == 1 else st)
    if all(i == slice(None) for i in index):
        return x
    full = tuple([Ellipsis] + index) if negative else tuple(index)
    return ctx.call(operator.getitem, x, full)


@converter("Gather")
def _gather_op(ctx: Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    data, idx = ctx.value(0), ctx.value(1)
    if isinstance(data, Sym) and isinstance(idx, torch.Tensor) and idx.dim() <= 1:
        n = len(data.items)
        picked = [data.items[int(i) % n] for i in idx.reshape(-1).tolist()]
        return make_sym(picked, idx.dim() == 0, data.dtype)
    x = ctx.materialize(data)
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 0:
            return ctx.method("select", x, axis, int(idx))
        if idx.dim() == 1:
            size = ctx.static_dim(0, axis)
            if size is not None:
                idx = torch.where(idx < 0, idx + size, idx).to(torch.int64)
            if size is not None or bool((idx >= 0).all()):
                rank = ctx.rank(0)
                return ctx.call(_index_select_fn(ctx), x, axis % rank if rank else axis, idx)
    return ctx.call(gather, x, ctx.materialize(idx), axis)


def _index_select_fn(ctx: Ctx) -> Callable[..., torch.Tensor]:
    # torch.index_select stays what passes match; uint16/32/64 need the bitcast variant
    return gather_any if ctx.dtype(0) in WIDE_UINT else torch.index_select


@converter("Expand")
def _expand(ctx: Ctx) -> Value:
    x = ctx.tensor(0)
    items = sym_items(ctx.value(1))
    rank = ctx.rank(0)
    if items is None or rank is None:
        return ctx.call(expand_dynamic, x, ctx.tensor(1))
    out_rank = max(rank, len(items))
    dims: list[Any] = []
    for j in range(out_rank):
        k_in, k_tgt = j - (out_rank - rank), j - (out_rank - len(items))
        target = items[k_tgt] if k_tgt >= 0 else -1
        if isinstance(target, int) and target == 1 and k_in >= 0:
            target = -1  # broadcasting with 1 keeps the input's dim
        dims.append(target)
    if all(isinstance(d, int) and d == -1 for d in dims) and out_rank == rank:
        return x
    return ctx.method("expand", x, *dims)


@converter("Tile")
def _tile(ctx: Ctx) -> Value:
    repeats = sym_items(ctx.value(1))
    if repeats is None:  # computed at run time by tensor ops
        return ctx.call(tile_dynamic, ctx.tensor(0), ctx.tensor(1))
    if not repeats:  # a 0-D input has no dims to repeat
        return ctx.tensor(0)
    return ctx.method("repeat", ctx.tensor(0), *repeats)


@converter("Pad")
def _pad(ctx: Ctx) -> Value:
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11 or "pads" in ctx.attrs:
        pads, value = list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
        axes = None
    elif any(isinstance(ctx.value(i), fx.Node | Sym) for i in (1, 2, 3)):
        # pads, the constant value or the axes known only at run time
        return _pad_at_run_time(ctx, mode)
    else:
        pads = ctx.const_ints(1, "pads")
        value = scalar_of(ctx, 2, "constant_value") if ctx.has(2) else 0
        axes = ctx.const_ints(3, "axes")
    rank = ctx.rank(0)
    if axes is not None:
        if rank is None:
            raise ctx.fail("the axes input needs the input rank, which is unknown")
        full = [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a % rank], full[a % rank + rank] = pads[k], pads[k + len(axes)]
        pads = full
    n = len(pads) // 2
    first = next((i for i in range(n) if pads[i] or pads[i + n]), n)
    trailing = pads[first:n] + pads[n + first :]
    x = ctx.tensor(0)
    if not any(trailing):
        return x
    torch_mode = _TORCH_PAD_MODE.get(mode)
    if torch_mode is None:
        raise ctx.fail(f"pad mode {mode!r} is not supported")
    if torch_mode == "constant":
        return ctx.call(F.pad, x, torch_pad(trailing), value=value or 0)
    if ctx.dtype(0) in WIDE_UINT and torch_mode != "circular":
        raise refuse_dtype(ctx, ctx.dtype(0))
    if any(p < 0 for p in pads):
        raise ctx.fail(f"negative pads {pads} (cropping) in {mode} mode are not supported")
    for axis in range(n):
        size = ctx.static_dim(0, axis)
        if mode == "reflect" and size is not None and max(pads[axis], pads[axis + n]) >= size:
            raise ctx.fail(
                f"reflect pads ({pads[axis]}, {pads[axis + n]}) of axis {axis} are not smaller "
                f"than its size {size} (torch reflects at most once)"
            )
    # torch pads these modes on the last k <= 3 dims of a batched (k + 2)-D input
    if n - first <= 3 and n == (n - first) + 2:
        return ctx.call(F.pad, x, torch_pad(trailing), mode=torch_mode)
    for axis in range(first, n):  # otherwise one axis at a time (the modes are separable)
        if pads[axis] or pads[axis + n]:
            x = ctx.call(pad_axis, x, axis, pads[axis], pads[axis + n], torch_mode)
    return x


_TORCH_PAD_MODE = {
    "constant": "constant",
    "reflect": "reflect",
    "edge": "replicate",
    "wrap": "circular",
}


def _pad_at_run_time(ctx: Ctx, mode: str) -> Value:
    torch_mode = _TORCH_PAD_MODE.get(mode)
    if torch_mode is None:
        raise ctx.fail(f"pad mode {mode!r} is not supported")
    if ctx.dtype(0) in WIDE_UINT and torch_mode not in ("constant", "circular"):
        raise refuse_dtype(ctx, ctx.dtype(0))
    optional = [ctx.tensor(i) if ctx.has(i) else None for i in (2, 3)]
    return ctx.call(pad_dynamic, ctx.tensor(0), ctx.tensor(1), torch_mode, *optional)


@converter("DepthToSpace")
def _depth_to_space(ctx: Ctx) -> Value:
    return _move_blocks(ctx, crd=F.pixel_shuffle, dcr=depth_to_space_dcr)


@converter("SpaceToDepth")
def _space_to_depth_op(ctx: Ctx) -> Value:
    return _move_blocks(ctx, crd=F.pixel_unshuffle, dcr=space_to_depth)


def _move_blocks(ctx: Ctx, *, crd: Callable[..., Any], dcr: Callable[..., Any]) -> Value:
    """DepthToSpace / SpaceToDepth by ``mode``: CRD is torch's pixel (un)shuffle, DCR ours."""
    block, mode = int(ctx.attr("blocksize")), ctx.attr("mode", "DCR")
    if mode == "CRD":
        return ctx.call(crd, ctx.tensor(0), block)
    if mode != "DCR":
        raise ctx.fail(f"{ctx.op} mode {mode!r} is not DCR or CRD")
    return ctx.call(dcr, ctx.tensor(0), block)

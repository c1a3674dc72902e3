"""Functions the imported graph calls when it runs.

Converters emit calls to these (``call_function`` nodes) where a value cannot stay symbolic
(shapes, axes, bounds or repeats known only at run time) and where torch's op differs from
ONNX's: empty reductions, integer means, padding modes on any axis, uint16/32/64 arithmetic that
torch has no kernels for.  The runtime-shape ones (``reshape_dynamic``, ``expand_dynamic``,
``full_dynamic``, ``slice_onnx``, ``range_dynamic``) are registered with
:func:`graphopt.backends.shape_ops.exports_as`: the export replaces them with twins that export
as the ONNX op when it re-exports an imported graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.backends.shape_ops import exports_as
from graphopt.frontends.onnx.values import WIDE_UINT

_SIGNED_OF = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_SIGN_BIT = -(2**63)  # int64 with only the sign bit set: x ^ _SIGN_BIT orders uint64 as int64


def torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX pads [b1..bn, e1..en] (over the last n dims) -> F.pad order (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def shape_tensor(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """ONNX Shape as a runtime int64 tensor; ``torch._shape_as_tensor`` traces (and exports)
    as the Shape op itself, where ``torch.tensor(x.shape)`` froze the example's sizes."""
    return torch._shape_as_tensor(x)[start:end].to(torch.int64)


def gather(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Gather with runtime indices (negative indices allowed)."""
    axis = axis % data.dim()
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    out = gather_any(data, axis, indices.reshape(-1))
    return out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


@exports_as("Reshape")
def reshape_dynamic(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@exports_as("Expand")
def expand_dynamic(x: torch.Tensor, shape: Any) -> torch.Tensor:
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    return x.expand(torch.broadcast_shapes(x.shape, tuple(int(d) for d in dims)))


@exports_as("ConstantOfShape")
def full_dynamic(shape: torch.Tensor, value: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.full([int(d) for d in shape.tolist()], value, dtype=dtype)


def _udiv64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned 64-bit division of int64 bit patterns (uint64 values above 2**63 - 1 are
    negative as int64).  With h = a >> 1 (logical), floor(a / b) is 2 * (h // b) or one more."""
    a, b = torch.broadcast_tensors(a, b)
    big_b = b < 0  # b >= 2**63: the quotient is 1 when a >= b, else 0
    safe_b = torch.where(big_b | (b == 0), torch.ones_like(b), b)  # ONNX: x / 0 is undefined
    half = (a >> 1) & (2**63 - 1)
    q = torch.div(half, safe_b, rounding_mode="floor") * 2
    r = a - q * safe_b  # in [0, 2b): compare as unsigned
    q = q + ((r ^ _SIGN_BIT) >= (safe_b ^ _SIGN_BIT)).to(torch.int64)
    return torch.where(big_b, ((a ^ _SIGN_BIT) >= (b ^ _SIGN_BIT)).to(torch.int64), q)


def _int_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates toward zero


def _reduce_max(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return reduce_extreme(x, dims, keepdim, True)


def _reduce_min(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return reduce_extreme(x, dims, keepdim, False)


# ONNX op -> (torch function on int64, whether it orders values: comparisons, max, min, clamp)
_WIDE_UINT_FNS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "Add": (torch.add, False),
    "Sum": (torch.add, False),
    "Sub": (torch.sub, False),
    "Mul": (torch.mul, False),
    "Pow": (torch.pow, False),
    "Div": (_int_div, False),
    "Neg": (torch.neg, False),
    "Sign": (torch.sign, False),
    "ReduceSum": (torch.sum, False),
    "Equal": (torch.eq, True),
    "Less": (torch.lt, True),
    "LessOrEqual": (torch.le, True),
    "Greater": (torch.gt, True),
    "GreaterOrEqual": (torch.ge, True),
    "Max": (torch.maximum, True),
    "Min": (torch.minimum, True),
    "Clip": (torch.clamp, True),
    "ReduceMax": (_reduce_max, True),
    "ReduceMin": (_reduce_min, True),
}


def wide_uint(op: str, dtype: torch.dtype, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ONNX ``op`` on uint16/uint32/uint64 tensors, for which torch has no kernels.

    Computed in int64 and cast back to ``dtype``, which wraps modulo 2**bits as the unsigned type
    does.  uint64 values above 2**63 - 1 become negative int64 bit patterns: + - * still wrap
    exactly; ops that order values (comparisons, max, min, clamp) flip the sign bit before and
    after, which makes int64's order the unsigned order; uint64 Div divides unsigned (_udiv64).
    """
    fn, ordered = _WIDE_UINT_FNS[op]
    big = dtype == torch.uint64
    if op == "Div" and big:
        fn = _udiv64
    flip = ordered and big
    # next to a float operand (Pow's exponent or base) the unsigned value itself is needed
    to_float = any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)

    def widen(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dtype in WIDE_UINT:
            if to_float:
                return a.to(torch.float64)
            a = a.to(torch.int64)
            return a ^ _SIGN_BIT if flip else a
        return a

    y = fn(*[widen(a) for a in args], **kwargs)
    if y.dtype != torch.int64:  # a comparison, or a float exponent / base: not in the uint domain
        return y
    return (y ^ _SIGN_BIT if flip else y).to(dtype)


def _bitcast_signed(x: torch.Tensor) -> torch.Tensor:
    """uint16/32/64 as the same-width signed type (bits unchanged), for data-movement kernels
    (index_select, flip) that torch lacks for the wide unsigned types."""
    signed = _SIGNED_OF.get(x.dtype)
    return x if signed is None else x.view(signed)


def gather_any(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``torch.index_select`` that also moves uint16/32/64 tensors."""
    if x.dtype in WIDE_UINT:
        return torch.index_select(_bitcast_signed(x), axis, index).view(x.dtype)
    return torch.index_select(x, axis, index)


def onnx_slice_range(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    """ONNX Slice's clamped [start, end) on one axis of ``size`` (step != 0)."""
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


def _ints(v: Any) -> list[int]:
    """A list of ints from a runtime 0-D/1-D tensor or a list."""
    if isinstance(v, torch.Tensor):
        return [int(a) for a in v.reshape(-1).tolist()]
    return [int(a) for a in v]


@exports_as("Slice")
def slice_onnx(
    x: torch.Tensor, starts: Any, ends: Any, axes: Any = None, steps: Any = None
) -> torch.Tensor:
    """ONNX Slice at run time (bounds, axes, steps or dims known only then), negative steps
    included."""
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    y = x
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = a % x.dim()
        begin, stop = onnx_slice_range(int(s), int(e), int(st), x.shape[a])
        if st > 0:
            y = y.narrow(a, begin, max(stop - begin, 0))[
                (slice(None),) * a + (slice(None, None, st),)
            ]
        else:  # x[begin], x[begin + st], ... while > stop: slice the flipped axis forwards
            n = x.shape[a]
            count = max(-(-(begin - stop) // -st), 0)
            y = _bitcast_signed(y).flip(a).view(y.dtype) if y.dtype in WIDE_UINT else y.flip(a)
            if not count:
                y = y.narrow(a, 0, 0)
                continue
            y = y.narrow(a, n - 1 - begin, (count - 1) * -st + 1)
            y = y[(slice(None),) * a + (slice(None, None, -st),)]
    return y


def unsqueeze_dynamic(x: torch.Tensor, axes: Any) -> torch.Tensor:
    """ONNX Unsqueeze with axes known only at run time."""
    axes = _ints(axes)
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return x


def squeeze_dynamic(x: torch.Tensor, axes: Any) -> torch.Tensor:
    """ONNX Squeeze with axes known only at run time."""
    for a in sorted({a % x.dim() for a in _ints(axes)}, reverse=True):
        x = x.squeeze(a)
    return x


def split_dynamic(x: torch.Tensor, split: Any, axis: int) -> tuple[torch.Tensor, ...]:
    """ONNX Split with split sizes known only at run time."""
    return tuple(torch.split(x, _ints(split), axis))


def tile_dynamic(x: torch.Tensor, repeats: Any) -> torch.Tensor:
    """ONNX Tile with repeats known only at run time."""
    repeats = _ints(repeats)
    return x.repeat(*repeats) if repeats else x


def pad_dynamic(x: torch.Tensor, pads: Any, mode: str, value: Any, axes: Any) -> torch.Tensor:
    """ONNX Pad with pads, axes or the constant value known only at run time (``mode`` is
    torch's name: constant, reflect, replicate, circular)."""
    pads, rank = _ints(pads), x.dim()
    if axes is not None:
        axes, full = _ints(axes), [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a % rank], full[a % rank + rank] = pads[k], pads[k + len(axes)]
        pads = full
    if mode == "constant":
        if isinstance(value, torch.Tensor):
            value = value.reshape(-1)[0].item() if value.numel() else 0
        return F.pad(x, torch_pad(pads), value=value or 0)
    for axis in range(rank):
        if pads[axis] or pads[axis + rank]:
            x = pad_axis(x, axis, pads[axis], pads[axis + rank], mode)
    return x


@exports_as("Range")
def range_dynamic(start: Any, limit: Any, delta: Any, dtype: torch.dtype) -> torch.Tensor:
    """ONNX Range with bounds known only at run time (0-D tensors or Python numbers)."""

    def num(v: Any) -> Any:
        return v.item() if isinstance(v, torch.Tensor) else v

    return torch.arange(num(start), num(limit), num(delta), dtype=dtype)


def reduce_extreme(x: torch.Tensor, dims: list[int], keepdim: bool, largest: bool) -> torch.Tensor:
    """ONNX ReduceMax/ReduceMin, which also reduce an empty set: to -inf/+inf (the dtype's
    lowest/highest value for integers), where torch's amax/amin raise."""
    fn = torch.amax if largest else torch.amin
    if x.numel():
        return fn(x, dim=dims, keepdim=keepdim)
    dims = [d % x.dim() for d in dims]
    shape = [1 if k in dims else n for k, n in enumerate(x.shape) if keepdim or k not in dims]
    if x.dtype.is_floating_point:
        fill = -math.inf if largest else math.inf
    elif x.dtype == torch.bool:
        fill = not largest
    else:
        info = torch.iinfo(x.dtype)
        fill = info.min if largest else info.max
    return torch.full(shape, fill, dtype=x.dtype)


def pad_axis(x: torch.Tensor, axis: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Reflect/replicate/circular padding of one axis of any tensor, as a gather of source
    indices (the modes are separable, so axes are padded one after another).

    F.pad pads these modes only on the last 1-3 dims of 2-D to 5-D inputs, and its export of a
    replicate pad on a reshaped tensor came out wrong at static shapes (ONNX Runtime refused
    the Reshape after it); ``index_select`` exports as one Gather.
    """
    n = x.shape[axis]
    idx = torch.arange(-before, n + after, device=x.device)
    if mode == "replicate":
        idx = torch.minimum(idx.clamp(min=0), torch.ones_like(idx) * (n - 1))
    elif mode == "circular":
        idx = idx.remainder(n)
    else:  # reflect: mirror without repeating the edge, period 2 (n - 1)
        period = max(2 * (n - 1), 1)
        idx = idx.abs().remainder(period)
        idx = torch.where(idx > n - 1, period - idx, idx)
    return x.index_select(axis, idx)


def layer_norm_manual(
    x: torch.Tensor, axis: int, eps: float, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    dims = tuple(range(axis % x.dim(), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def layer_norm_stats(
    x: torch.Tensor, axis: int, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNormalization's Mean and InvStdDev outputs: mean and 1 / sqrt(var + eps) over the
    axes from ``axis`` on (kept as size-1 dims), computed in ``dtype`` (the stash type)."""
    xs = x.to(dtype)
    dims = tuple(range(axis % x.dim(), x.dim()))
    mean = xs.mean(dim=dims, keepdim=True)
    var = (xs - mean).pow(2).mean(dim=dims, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def max_pool_with_indices(
    x: torch.Tensor,
    kernel: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    ceil_mode: bool,
    storage_order: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaxPool's values and ONNX's Indices: the position of each maximum in the input flattened
    whole, (n * C + c) * plane + the position in its plane -- row-major, or column-major with
    storage_order=1 (torch's indices count within the plane, row-major)."""
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    y, within = pool(x, kernel, strides, pads, dilations, ceil_mode, return_indices=True)
    spatial = list(x.shape[2:])
    if storage_order:
        rest, index, step = within, torch.zeros_like(within), [1]
        for size in spatial[:-1]:
            step.append(step[-1] * size)
        for d in reversed(range(len(spatial))):  # unravel row-major, ravel column-major
            index = index + (rest % spatial[d]) * step[d]
            rest = rest // spatial[d]
        within = index
    plane = math.prod(spatial)
    planes = torch.arange(x.shape[0] * x.shape[1], dtype=torch.int64)
    offset = planes.reshape(x.shape[0], x.shape[1], *[1] * len(spatial)) * plane
    return y, within + offset


def avg_pool_exclude_pad(
    x: torch.Tensor, pads: list[int], kernel: list[int], strides: list[int], ceil_mode: bool
) -> torch.Tensor:
    """Average pooling over an explicitly padded input that does not count the padding."""
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    ones = torch.ones_like(x[:1, :1])
    total = pool(F.pad(x, pads), kernel, strides, 0, ceil_mode, True)
    count = pool(F.pad(ones, pads), kernel, strides, 0, ceil_mode, True)
    return total / count


def reduce_onnx(
    x: torch.Tensor, axes: Any, op: str, keepdim: bool, noop: bool = False
) -> torch.Tensor:
    """ONNX ReduceSum/Mean/Max/Min/L2 at run time: axes known only then (a tensor, or None for
    all axes), integer dtypes (the result keeps the input's dtype: torch.sum widens to int64,
    torch.mean refuses integers; ONNX's integer mean truncates toward zero), uint16/32/64."""
    if isinstance(axes, torch.Tensor):
        axes = [int(a) for a in axes.reshape(-1).tolist()]
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    if x.dtype in WIDE_UINT:
        if op == "ReduceSum":
            return wide_uint(op, x.dtype, x, dim=axes, keepdim=keepdim)
        return wide_uint(op, x.dtype, x, axes, keepdim)
    if op in ("ReduceMax", "ReduceMin"):
        return reduce_extreme(x, axes, keepdim, op == "ReduceMax")
    if op == "ReduceL2":
        return torch.linalg.vector_norm(x, 2, dim=axes, keepdim=keepdim)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return (torch.sum if op == "ReduceSum" else torch.mean)(x, dim=axes, keepdim=keepdim)
    total = torch.sum(x, dim=axes, keepdim=keepdim, dtype=torch.int64)
    if op == "ReduceMean":
        count = math.prod(x.shape[a] for a in axes)
        total = torch.div(total.to(x.dtype).to(torch.int64), count, rounding_mode="trunc")
    return total.to(x.dtype)


def depth_to_space_dcr(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX DepthToSpace, mode DCR (depth-column-row: the block index varies slowest)."""
    n, c, h, w = x.shape
    x = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // (block * block), h * block, w * block)


def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX SpaceToDepth, mode DCR (the default; output channels ordered (row-in-block,
    column-in-block, channel); mode CRD, opset 28, is torch's pixel_unshuffle: (channel, row,
    column))."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * block * block, h // block, w // block)

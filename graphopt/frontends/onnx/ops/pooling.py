"""Pooling converters: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.

Padding torch's pooling cannot express (asymmetric, or more than half a window) is made explicit
first; with ``ceil_mode`` the output is then trimmed to ONNX's size, and the shape ONNX's shape
inference gives is corrected (it ignores the ceil_mode rule).
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import resolve_pads, spatial_attrs
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import avg_pool_exclude_pad, max_pool_with_indices, torch_pad
from graphopt.frontends.onnx.values import Value

logger = logging.getLogger(__name__)


def _pool_out_size(
    size: int,
    kernel: int,
    stride: int,
    dilation: int,
    begin: int,
    end: int,
    ceil_mode: bool,
    pad_l: int | None = None,
) -> int:
    """Output length of a pooling window sweep, as ONNX Runtime and torch compute it.

    With ceil_mode a last window that would start in the right padding is dropped; ``pad_l`` is
    where that padding starts counting from (``begin`` for ONNX; 0 once padding is explicit).
    """
    eff = (kernel - 1) * dilation + 1
    span = size + begin + end - eff
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + (begin if pad_l is None else pad_l):
        out -= 1
    return out


def _pool_trim(
    ctx: Ctx, y: Any, pads: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> Any:
    """After pooling an explicitly padded input with ceil_mode, drop windows that ONNX drops.

    Once the padding is explicit torch no longer knows where the right padding begins, so it may
    keep a last window starting there; slice the output to ONNX's size.
    """
    n = len(kernel)
    index: list[Any] = [slice(None), slice(None)]
    trimmed = False
    for i in range(n):
        size, begin, end = ctx.static_dim(0, 2 + i), pads[i], pads[i + n]
        if end == 0:
            index.append(slice(None))
            continue
        if size is None:
            raise ctx.fail(
                "ceil_mode=1 with explicit end padding needs static spatial sizes",
                "Export the model with static spatial sizes or ceil_mode=0.",
            )
        args = (kernel[i], strides[i], dilations[i])
        out_onnx = _pool_out_size(size, *args, begin, end, True)
        out_torch = _pool_out_size(size + begin + end, *args, 0, 0, True)
        index.append(slice(0, out_onnx))
        trimmed = trimmed or out_onnx < out_torch
    return ctx.call(operator.getitem, y, tuple(index)) if trimmed else y


def _correct_pool_shape(
    ctx: Ctx, pads: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> None:
    """ONNX shape inference ignores the ceil_mode rule above; fix the inferred output shape."""
    out = ctx.node.output[0]
    in_shape, out_shape = ctx.shape(0), ctx.imp.shapes.get(out)
    if in_shape is None or out_shape is None or len(in_shape) != len(out_shape):
        return
    n = len(kernel)
    fixed = list(out_shape)
    for i in range(n):
        size = in_shape[2 + i]
        if isinstance(size, int):
            fixed[2 + i] = _pool_out_size(
                size, kernel[i], strides[i], dilations[i], pads[i], pads[i + n], True
            )
    if fixed != out_shape:
        logger.debug(
            "%s: ONNX shape inference says %s, the output is %s", ctx.name, out_shape, fixed
        )
        ctx.imp.distrust_shapes_after(out, fixed)


def _pool_geometry(ctx: Ctx) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = ctx.attr("kernel_shape")
    if kernel is None:
        raise ctx.fail("the kernel_shape attribute is missing")
    kernel = list(kernel)
    if len(kernel) not in (1, 2, 3):
        raise ctx.fail(f"{len(kernel)}-D pooling is not supported")
    strides, dilations = spatial_attrs(ctx, len(kernel))
    pads = resolve_pads(ctx, kernel, strides, dilations)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    if ceil_mode:
        _correct_pool_shape(ctx, pads, kernel, strides, dilations)
    return kernel, strides, dilations, pads, ceil_mode


def _torch_can_pad(pads: list[int], kernel: list[int], dilations: list[int]) -> bool:
    """Whether torch's own (symmetric, at most half a window) pooling padding expresses pads."""
    n = len(kernel)
    return pads[:n] == pads[n:] and all(
        2 * p <= (k - 1) * d + 1 for p, k, d in zip(pads[:n], kernel, dilations, strict=True)
    )


@converter("MaxPool")
def _max_pool(ctx: Ctx) -> Value | list[Value]:
    kernel, strides, dilations, pads, ceil_mode = _pool_geometry(ctx)
    n = len(kernel)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    x = ctx.tensor(0)
    if ctx.output_used(1):  # Indices: flat positions in the input, as ONNX counts them
        if not _torch_can_pad(pads, kernel, dilations):
            raise ctx.fail(
                f"the Indices output with pads {pads} (asymmetric or over half a window, which "
                "torch's pooling cannot express) is not supported"
            )
        order = int(ctx.attr("storage_order", 0))
        both = ctx.call(
            max_pool_with_indices, x, kernel, strides, pads[:n], dilations, ceil_mode, order
        )
        return [ctx.call(operator.getitem, both, 0), ctx.call(operator.getitem, both, 1)]
    if _torch_can_pad(pads, kernel, dilations):
        return ctx.call(fn, x, kernel, strides, pads[:n], dilations, ceil_mode)
    x = ctx.call(F.pad, x, torch_pad(pads), value=-math.inf)
    y = ctx.call(fn, x, kernel, strides, 0, dilations, ceil_mode)
    return _pool_trim(ctx, y, pads, kernel, strides, dilations) if ceil_mode else y


@converter("AveragePool")
def _avg_pool(ctx: Ctx) -> Value:
    kernel, strides, dilations, pads, ceil_mode = _pool_geometry(ctx)
    if any(d != 1 for d in dilations):
        raise ctx.fail(
            f"dilations {dilations} are not supported for AveragePool "
            f"(torch's avg_pool has no dilation)"
        )
    n = len(kernel)
    include = bool(ctx.attr("count_include_pad", 0))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    x = ctx.tensor(0)
    if _torch_can_pad(pads, kernel, dilations):
        return ctx.call(fn, x, kernel, strides, pads[:n], ceil_mode, include)
    if include:
        y = ctx.call(fn, ctx.call(F.pad, x, torch_pad(pads)), kernel, strides, 0, ceil_mode, True)
    else:
        y = ctx.call(avg_pool_exclude_pad, x, torch_pad(pads), kernel, strides, ceil_mode)
    return _pool_trim(ctx, y, pads, kernel, strides, dilations) if ceil_mode else y


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx: Ctx) -> Value:
    x = ctx.tensor(0)
    rank = ctx.rank(0)
    avg = ctx.op == "GlobalAveragePool"
    if rank in (3, 4, 5):
        if avg:
            fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[rank - 3]
        else:
            fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[rank - 3]
        return ctx.call(fn, x, 1)
    if rank is not None:
        return ctx.call(
            torch.mean if avg else torch.amax, x, dim=list(range(2, rank)), keepdim=True
        )
    raise ctx.fail("the input rank is unknown")

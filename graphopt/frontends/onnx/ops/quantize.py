"""QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.

    QuantizeLinear:    y = saturate(round_half_even(x / scale) + zero_point)
    DequantizeLinear:  y = (x - zero_point) * scale
    DynamicQuantizeLinear (uint8):  scale = (max(0, max x) - min(0, min x)) / 255 (1 if equal),
        zero_point = round(clip(-min(0, min x) / scale, 0, 255)), y = QuantizeLinear(x, scale, zp)

scale / zero_point are per tensor (0-D or one element), per axis (1-D along ``axis``) or blocked
(``block_size`` > 0: same rank as x, one value per block of ``block_size`` along ``axis``).
Integer types int8, uint8 and int16 (and int32 for DequantizeLinear) are converted; float8,
int4/uint4, int2/uint2, float4 and uint16 are refused (torch has no dtype or no arithmetic for
them), as is ``precision``/``output_dtype`` other than the input's own float type.

The runtime functions are registered with :func:`~graphopt.backends.shape_ops.exports_as`: an
exported graph writes each as the ONNX op itself where opset 17 can say it (float32, int8/uint8,
per tensor or per axis), so a QDQ model keeps its QuantizeLinear/DequantizeLinear pairs for ONNX
Runtime's quantized kernels; elsewhere the arithmetic above is exported op by op.
"""

from __future__ import annotations

import operator

import torch

from graphopt.backends.shape_ops import exports_as
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Value

# the integer types converted, with their ranges (saturation)
_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-32768, 32767),
}
# the quantized weights (and int32 biases) ONNX Runtime's integer kernels read through a DQ
_WEIGHT_TYPES = (torch.int8, torch.uint8, torch.int32)
_ONNX_NAMES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32"}


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """scale / zero_point made broadcastable to ``x`` (ONNX's per-tensor/axis/block rules)."""
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    if block_size:
        v = v.repeat_interleave(block_size, dim=axis)
        return v.narrow(axis, 0, x.shape[axis])
    dims = [1] * x.dim()
    dims[axis] = -1
    return v.reshape(dims)


@exports_as("QuantizeLinear")
def quantize_linear(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """ONNX QuantizeLinear to an integer type: the division in x's (promoted) type, rounded half
    to even, the zero point added as an integer, saturated."""
    lo, hi = _RANGES[dtype]
    r = torch.round(x / _broadcast(scale, x, axis, block_size))
    # out-of-range values saturate: clip before the integer cast so it cannot overflow
    q = r.clamp(lo - 2**16, hi + 2**16).to(torch.int32)
    if zero_point is not None:
        q = q + _broadcast(zero_point, x, axis, block_size).to(torch.int32)
    return q.clamp(lo, hi).to(dtype)


# Kept out of constant folding (FX's side-effect registry, which fold-constants and dead-code
# removal read): ONNX Runtime computes DequantizeLinear(int8 weight) -> Conv/Gemm/MatMul with its
# integer kernels, and a float weight between QDQ activations it quantizes again per tensor
# (its WeightBiasQuantization) -- other numbers than the original's.
@torch.fx.node.has_side_effect
@exports_as("DequantizeLinear")
def dequantize_linear(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """ONNX DequantizeLinear: (x - zero_point) in integers, times scale in float32, in
    ``dtype`` (the scale's type)."""
    d = x.to(torch.int64)
    if zero_point is not None:
        d = d - _broadcast(zero_point, x, axis, block_size).to(torch.int64)
    y = d.to(torch.float32) * _broadcast(scale, x, axis, block_size).to(torch.float32)
    return y.to(dtype)


def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear (uint8): y, y_scale (0-D, x's type), y_zero_point (0-D)."""
    high = torch.clamp(x.max().float(), min=0.0)
    low = torch.clamp(x.min().float(), max=0.0)
    span = torch.where(high == low, torch.ones_like(high), high - low)
    scale = span / 255.0
    zero_point = torch.round(torch.clamp(-low / scale, 0.0, 255.0))
    y = torch.clamp(torch.round(x.float() / scale) + zero_point, 0.0, 255.0)
    return y.to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)


def _axis(ctx: Ctx) -> int:
    axis = int(ctx.attr("axis", 1))
    rank = ctx.rank(0)
    if ctx.shape(1) in ([], [1]):  # per tensor: the axis is not read
        return 0
    if rank is None:
        raise ctx.fail("per-axis or blocked quantization needs the input rank, which is unknown")
    if not -rank <= axis < rank:
        raise ctx.fail(f"axis={axis} is out of range for rank {rank}")
    return axis % rank


def _params(ctx: Ctx) -> tuple[Value, Value | None, int, int]:
    """scale, zero_point (None when absent), axis, block_size of a (De)QuantizeLinear node."""
    block_size = int(ctx.attr("block_size", 0))
    if ctx.rank(1) is None:
        raise ctx.fail("the rank of the scale is unknown")
    if block_size < 0 or (block_size == 0 and ctx.rank(1) > 1):
        raise ctx.fail(f"a scale of rank {ctx.rank(1)} needs block_size > 0 (got {block_size})")
    zero_point = ctx.tensor(2) if ctx.has(2) else None
    return ctx.tensor(1), zero_point, _axis(ctx), block_size


def _refuse_type(ctx: Ctx, what: str, elem_type: int) -> None:
    name = _ONNX_NAMES.get(elem_type, f"ONNX type {elem_type}")
    raise ctx.fail(
        f"{what} {name} is not supported (int8, uint8 and int16 are: torch has no dtype or no "
        "arithmetic for float8, int4/uint4, int2/uint2, float4 and uint16)"
    )


def _float_type(ctx: Ctx, i: int, what: str) -> torch.dtype:
    dtype = ctx.dtype(i)
    if dtype is None or not dtype.is_floating_point:
        raise ctx.fail(f"{what} has dtype {dtype}, not a float type torch computes with")
    return dtype


@converter("QuantizeLinear")
def _quantize(ctx: Ctx) -> Value:
    _float_type(ctx, 0, "the input")
    _float_type(ctx, 1, "the scale")
    if ctx.attr("precision", 0):
        raise ctx.fail(f"precision={ctx.attr('precision')} is not supported")
    if ctx.has(2):
        elem_type = ctx.imp.elem_types.get(ctx.node.input[2], 0)
        dtype = ctx.dtype(2)
    else:
        elem_type = int(ctx.attr("output_dtype", 0)) or 2  # uint8 by default
        dtype = ONNX_TO_TORCH.get(elem_type)
    if dtype not in _RANGES:
        _refuse_type(ctx, "output type", elem_type)
    scale, zero_point, axis, block_size = _params(ctx)
    return ctx.call(quantize_linear, ctx.tensor(0), scale, zero_point, axis, block_size, dtype)


@converter("DequantizeLinear")
def _dequantize(ctx: Ctx) -> Value:
    dtype = ctx.dtype(0)
    if dtype not in _RANGES and dtype != torch.int32:
        _refuse_type(ctx, "input type", ctx.imp.elem_types.get(ctx.node.input[0], 0))
    out = _float_type(ctx, 1, "the scale")
    if ctx.attr("output_dtype", 0):
        requested = ONNX_TO_TORCH.get(int(ctx.attr("output_dtype")))
        if requested != out:
            raise ctx.fail(f"output_dtype={ctx.attr('output_dtype')} differs from the scale's type")
    scale, zero_point, axis, block_size = _params(ctx)
    args = (ctx.tensor(0), scale, zero_point, axis, block_size, out)
    if not isinstance(args[0], torch.Tensor) or dtype not in _WEIGHT_TYPES:
        return ctx.call(dequantize_linear, *args)
    # a constant (a quantized weight or bias): kept a runtime node, not folded (see above)
    node = ctx.imp.graph.call_function(dequantize_linear, ctx.imp.lift(args))
    node.meta.update(onnx_node=ctx.name, onnx_op=ctx.op)
    return node


@converter("DynamicQuantizeLinear")
def _dynamic_quantize(ctx: Ctx) -> list[Value]:
    if ctx.dtype(0) != torch.float32:
        raise ctx.fail(f"input dtype {ctx.dtype(0)} (float32 only)")
    out = ctx.call(dynamic_quantize_linear, ctx.tensor(0))
    return [ctx.call(operator.getitem, out, j) for j in range(3)]

"""The ONNX op converters, grouped by kind, and the table that maps op types to them.

A converter takes a :class:`~graphopt.frontends.onnx.context.Ctx` and returns the values of the
node's outputs.  Each module registers its converters with ``@converter("OpType", ...)``;
importing this package fills :data:`CONVERTERS`, and :data:`SUPPORTED_OPS` is its set of keys.

    nn             Conv, ConvTranspose, Gemm, MatMul (-> nn.Conv*d, nn.ConvTranspose*d, nn.Linear)
    normalization  BatchNormalization (-> OnnxBatchNorm*d), Layer/Instance/Group/RMS
                   normalization, LRN, Softmax
    elementwise    unary and binary arithmetic, comparisons, activations, Clip, Where, Cast
    reduce         ReduceSum/Mean/Max/Min/L2
    pooling        MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool
    shape          Shape, Reshape, Slice, Gather, Concat, Pad, ... (shape values kept symbolic)
    resize         Resize, Upsample, GridSample (resize_math: index tables, interpolation
                   matrices)
    control        If (a constant condition inlines the taken branch)
    recurrent      LSTM, GRU, RNN (recurrent_loop: ONNX's equations step by step, for what
                   torch's modules do not compute)
    indexing       TopK, ArgMax/ArgMin, CumSum, Trilu, GatherElements, Scatter*, Einsum, Mod
    attention      Attention (opsets 23-25)
    quantize       QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear
    microsoft      com.microsoft ops that ONNX Runtime's tools emit (keyed "com.microsoft::Op";
                   microsoft_attention: Attention, MultiHeadAttention; contrib: their helpers)
    opaque         a node without a converter, kept as it is and run by ONNX Runtime
"""

from __future__ import annotations

from graphopt.backends.arrays import FLOAT8
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops import (
    attention,
    control,
    elementwise,
    indexing,
    microsoft,
    nn,
    normalization,
    pooling,
    quantize,
    recurrent,
    reduce,
    resize,
    shape,
)
from graphopt.frontends.onnx.ops.common import refuse_dtype
from graphopt.frontends.onnx.ops.registry import CONVERTERS, Converter, converter, key
from graphopt.frontends.onnx.values import WIDE_UINT

__all__ = [
    "CONTRIB_OPS",
    "CONVERTERS",
    "SUPPORTED_OPS",
    "Converter",
    "check_storage_dtypes",
    "converter",
    "key",
    "attention",
    "control",
    "elementwise",
    "indexing",
    "microsoft",
    "nn",
    "normalization",
    "pooling",
    "quantize",
    "recurrent",
    "reduce",
    "resize",
    "shape",
]

# ops of the default domain (ai.onnx); CONTRIB_OPS: those of other domains, as "domain::type"
SUPPORTED_OPS: frozenset[str] = frozenset(k for k in CONVERTERS if "::" not in k)
CONTRIB_OPS: frozenset[str] = frozenset(k for k in CONVERTERS if "::" in k)


# Ops that only move or reinterpret data, which torch does for every dtype it stores.
_DATA_MOVEMENT = frozenset(
    [
        "Identity",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Expand",
        "Tile",
        "Where",
        "Cast",
        "CastLike",
        "Shape",
        "Size",
        "Dropout",
    ]
)
# uint16/32/64 inputs: data movement, and the converters that compute them via wide_uint (those
# refuse themselves for the variants they do not handle).
_WIDE_UINT_OPS = _DATA_MOVEMENT | frozenset(
    [
        "Gather",
        "Slice",
        "Pad",
        "Equal",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Sum",
        "Max",
        "Min",
        "Mean",
        "Abs",
        "Neg",
        "Sign",
        "Clip",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceMean",
        "ReduceL2",
    ]
)


def check_storage_dtypes(ctx: Ctx) -> None:
    """Refuse, at import, ops on dtypes torch stores but cannot compute with (float8 except
    for data movement; uint16/32/64 outside _WIDE_UINT_OPS), instead of a NotImplementedError
    when the graph runs."""
    for i in range(len(ctx.node.input)):
        dtype = ctx.dtype(i)
        if (dtype in FLOAT8 and ctx.op not in _DATA_MOVEMENT) or (
            dtype in WIDE_UINT and ctx.op not in _WIDE_UINT_OPS
        ):
            raise refuse_dtype(ctx, dtype)

"""What the com.microsoft converters share: their registration, which also records the dtypes of
the node's outputs.

ONNX's shape inference knows no contrib op, so the outputs of a com.microsoft node have no
declared element type, and a converter downstream that reads ``ctx.dtype`` (DynamicQuantizeLinear,
integer Div, Cast, ...) would see None. :func:`ms_converter` fills them in after converting: by
default every output has input 0's dtype; ``dtypes`` overrides that per node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import Converter, converter
from graphopt.frontends.onnx.values import ONNX_TO_TORCH

MS = "com.microsoft"
_TORCH_TO_ONNX = {dtype: elem for elem, dtype in ONNX_TO_TORCH.items()}
Dtypes = Callable[[Ctx], list[torch.dtype | None]]


def declare_dtypes(ctx: Ctx, dtypes: list[torch.dtype | None]) -> None:
    """Record the ONNX element types of the node's outputs that shape inference left unknown."""
    for name, dtype in zip(ctx.node.output, dtypes, strict=False):
        if name and dtype in _TORCH_TO_ONNX and name not in ctx.imp.elem_types:
            ctx.imp.elem_types[name] = _TORCH_TO_ONNX[dtype]


def ms_converter(*op_types: str, dtypes: Dtypes | None = None) -> Callable[[Converter], Converter]:
    """``@converter(*op_types, domain="com.microsoft")`` that also declares the output dtypes
    (``dtypes(ctx)``, by default input 0's for every output)."""

    def register(fn: Converter) -> Converter:
        @functools.wraps(fn)
        def convert(ctx: Ctx) -> object:
            result = fn(ctx)
            declare_dtypes(ctx, dtypes(ctx) if dtypes else [ctx.dtype(0)] * len(ctx.node.output))
            return result

        converter(*op_types, domain=MS)(convert)
        return fn

    return register

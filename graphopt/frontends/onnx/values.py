"""Values at import time: dtypes, tensors and shape values.

A value flowing between converters (:data:`Value`) is a constant ``torch.Tensor``, a runtime
``torch.fx.Node`` or a :class:`Sym` (a small integer tensor kept as a Python list, so that shape
arithmetic stays symbolic).  :func:`to_numpy` / :func:`from_numpy` convert bfloat16 and float8
tensors to and from the ml_dtypes arrays that ONNX Runtime and ``onnx.reference`` use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper

from graphopt.backends.arrays import from_numpy  # one conversion pair for every layer

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    onnx.TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    onnx.TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}

# uint16/32/64: torch stores them but has no arithmetic or comparison kernels; the converters
# that support them compute in int64 (see runtime.wide_uint) and the others refuse them at
# import.
WIDE_UINT = (torch.uint16, torch.uint32, torch.uint64)
# float8: storage only in torch (no arithmetic); only Cast and data movement accept them.


@dataclass
class Sym:
    """A small integer tensor (a shape or part of one) kept as a Python list at import time.

    ``items`` are ints or FX nodes that evaluate to Python ints (e.g. ``x.size(0)``).  ``scalar``
    marks a 0-D value (then ``items`` has exactly one element).
    """

    items: list[int | bool | fx.Node]
    scalar: bool = False
    dtype: torch.dtype = torch.int64


Value = torch.Tensor | fx.Node | Sym


def make_sym(items: Sequence[Any], scalar: bool = False, dtype: torch.dtype = torch.int64) -> Value:
    """A shape value, or a plain constant tensor when no item is an FX node."""
    items = list(items)
    if not any(isinstance(i, fx.Node) for i in items):
        t = torch.tensor(items, dtype=dtype)
        return t.reshape(()) if scalar else t
    return Sym(items, scalar, dtype)


def is_int_dtype(dtype: torch.dtype | None) -> bool:
    return (
        dtype is not None
        and not dtype.is_floating_point
        and not dtype.is_complex
        and dtype != torch.bool
    )


def sym_items(value: Value | None) -> list[int | fx.Node] | None:
    """The items of a shape-like value: a Sym or a small 0-D/1-D integer constant."""
    if isinstance(value, Sym):
        return list(value.items)
    if (
        isinstance(value, torch.Tensor)
        and value.dim() <= 1
        and value.numel() <= 64
        and (is_int_dtype(value.dtype) or value.dtype == torch.bool)
    ):
        return value.reshape(-1).tolist()
    return None


def tensor_from_proto(proto: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    return from_numpy(numpy_helper.to_array(proto, base_dir or ""))

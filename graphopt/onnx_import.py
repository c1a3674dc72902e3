"""Import an ONNX model as a ``torch.fx.GraphModule``.

``import_onnx(model)`` walks the ONNX graph in order and hands every node to a converter looked up
in a table (``op_type -> function``); ``SUPPORTED_OPS`` is the set of the table's keys.  A
converter receives a :class:`_Ctx` (the node, its attributes and inputs, and helpers that emit FX
nodes) and returns the values of the node's outputs.

Values flowing between converters are one of three kinds:

* ``torch.Tensor`` -- a constant known at import time (initializers, ``Constant`` nodes, and the
  results of nodes whose inputs are all constant: every emit helper evaluates eagerly when none of
  its arguments is an FX node, so constant subgraphs are folded away).  Constants that reach a
  runtime op become buffers of the root module, read through ``get_attr``.
* ``torch.fx.Node`` -- a runtime tensor.
* :class:`_Sym` -- a "shape value": a small 1-D (or 0-D) integer tensor kept as a Python list
  whose items are ints or FX nodes such as ``x.size(0)``.  ``Shape`` produces these and
  ``Gather``/``Slice``/``Concat``/``Unsqueeze``/``Squeeze``/``Cast``/arithmetic keep them
  symbolic, so that the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains that torch's
  exporter emits for a dynamic batch become ``x.reshape(x.size(0), -1)`` -- which keeps working
  for any batch size and stays dynamic when the GraphModule is exported to ONNX again.

Conv, ConvTranspose, BatchNormalization, Gemm and MatMul-by-a-constant become real ``nn.Conv*d``,
``nn.ConvTranspose*d``, ``nn.BatchNorm*d`` and ``nn.Linear`` submodules (``call_module``), so graph
passes written for traced PyTorch models apply to imported ONNX models too.  A ``MatMul`` whose only
consumer is an ``Add`` of a 1-D constant becomes one ``nn.Linear`` with a bias.

The GraphModule comes back in eval mode.  ONNX's BatchNormalization (``training_mode=0``) is an
inference op, so its modules are :class:`OnnxBatchNorm2d` (and 1d/3d): ``nn.BatchNorm*d``
subclasses that stay in eval mode whatever ``.train()`` says -- running statistics, never updated.

Dtypes and shapes follow the ONNX spec, not torch's promotion: ``Pow`` has the base's type,
integer ``Div`` truncates, ``ReduceSum``/``ReduceMean`` keep integer types, 0-D values stay 0-D.
uint16/32/64 (which torch stores but cannot compute with) are computed in int64 and wrapped back
for arithmetic, comparisons, Max/Min/Clip and ReduceSum/Max/Min; float8 (storage only in torch)
is accepted by Cast and data movement.  Any other op on these dtypes, and graph inputs of types
torch lacks (int4, string, ...), are refused at import with a :class:`CaptureError` naming the node
-- rather than a NotImplementedError when the graph runs.  :func:`to_numpy` / :func:`from_numpy`
convert bfloat16 and float8 tensors to and from the ml_dtypes arrays that ONNX Runtime and
``onnx.reference`` use.

Placeholders carry the ONNX input's declared shape and dtype in ``node.meta["onnx_shape"]`` (dims
are ints, strings for symbolic dims, or None) and ``node.meta["onnx_dtype"]`` (a ``torch.dtype``;
``node.meta["onnx_elem_type"]`` holds the ONNX enum) and its name in ``node.meta["onnx_name"]``.
Every graph input gets a placeholder, in order, used or not.  ``gm.meta`` records the ONNX input
names (``"onnx_input_names"``), output names (``"onnx_output_names"``) and the opset
(``"onnx_opset"``); the output node's ``meta["onnx_output_names"]`` repeats the output names,
since graph passes keep node meta but may build a new GraphModule.

Note for re-export: ``torch.onnx.export(gm, ..., dynamo=False, dynamic_axes=...)`` needs
``input_names`` and ``output_names`` passed explicitly (the TorchScript exporter otherwise mistakes
the GraphModule's ``graph`` attribute for a TorchScript graph).
"""

from __future__ import annotations

import keyword
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from graphopt.errors import CaptureError

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_OPS",
    "OnnxBatchNorm1d",
    "OnnxBatchNorm2d",
    "OnnxBatchNorm3d",
    "from_numpy",
    "import_onnx",
    "load_onnx",
    "to_numpy",
]

ModelSource = str | os.PathLike | bytes | bytearray | memoryview | onnx.ModelProto

# ONNX int64 "infinity" used by Slice ends; anything beyond this magnitude means "to the end".
_BIG = 2**62

_ONNX_TO_TORCH: dict[int, torch.dtype] = {
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
# that support them compute in int64 (see _wide_uint) and the others refuse them at import.
_WIDE_UINT = (torch.uint16, torch.uint32, torch.uint64)
# float8: storage only in torch (no arithmetic); only Cast and data movement accept them.
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
_SIGNED_OF = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_SIGN_BIT = -(2**63)  # int64 with only the sign bit set: x ^ _SIGN_BIT orders uint64 as int64


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_onnx(model: ModelSource) -> onnx.ModelProto:
    """Read and validate an ONNX model from a path, serialized bytes or a ``ModelProto``.

    Raises :class:`CaptureError` (never anything else) when the file is missing or unreadable,
    the bytes are not a valid serialized model, or the model fails ``onnx.checker``.
    """
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "the given onnx.ModelProto"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        source = f"the given {len(data)} bytes"
        proto = _parse_bytes(data, source)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        source = repr(path)
        if not os.path.exists(path):
            raise CaptureError(
                f"ONNX model file {path!r} does not exist. Check the path (relative paths are "
                f"resolved against the current directory {os.getcwd()!r})."
            )
        if not os.path.isfile(path):
            raise CaptureError(
                f"ONNX model path {path!r} is not a file. Pass the path of a .onnx file."
            )
        try:
            proto = onnx.load(path)
        except Exception as exc:  # DecodeError, OSError, external-data errors, ...
            raise CaptureError(
                f"Could not read ONNX model {path!r}: {type(exc).__name__}: {exc}. The file is "
                f"probably truncated or not an ONNX model; re-export or re-download it."
            ) from exc
    else:
        raise CaptureError(
            f"Cannot load an ONNX model from a {type(model).__name__}. Pass a file path, the "
            f"serialized bytes, or an onnx.ModelProto."
        )

    if not proto.HasField("graph") or not proto.graph.output:
        raise CaptureError(
            f"The ONNX model from {source} has no graph or no graph outputs; it is empty or was "
            f"truncated. Re-export or re-download it."
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        reason = str(exc).strip().rstrip(".")
        raise CaptureError(
            f"The ONNX model from {source} fails onnx.checker: {reason}. The file is corrupt, "
            f"truncated or was written by a broken exporter; re-export it."
        ) from exc
    return proto


def _parse_bytes(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError, RuntimeWarning, ...
        raise CaptureError(
            f"Could not parse {source} as an ONNX model: {type(exc).__name__}: {exc}. The data "
            f"is truncated or not a serialized onnx.ModelProto."
        ) from exc
    return proto


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass
class _Sym:
    """A small integer tensor (a shape or part of one) kept as a Python list at import time.

    ``items`` are ints or FX nodes that evaluate to Python ints (e.g. ``x.size(0)``).  ``scalar``
    marks a 0-D value (then ``items`` has exactly one element).
    """

    items: list[int | bool | fx.Node]
    scalar: bool = False
    dtype: torch.dtype = torch.int64


Value = torch.Tensor | fx.Node | _Sym


def _make_sym(
    items: Sequence[Any], scalar: bool = False, dtype: torch.dtype = torch.int64
) -> Value:
    """A shape value, or a plain constant tensor when no item is an FX node."""
    items = list(items)
    if not any(isinstance(i, fx.Node) for i in items):
        t = torch.tensor(items, dtype=dtype)
        return t.reshape(()) if scalar else t
    return _Sym(items, scalar, dtype)


def _is_int_dtype(dtype: torch.dtype | None) -> bool:
    return (
        dtype is not None
        and not dtype.is_floating_point
        and not dtype.is_complex
        and dtype != torch.bool
    )


def _sym_items(value: Value | None) -> list[int | fx.Node] | None:
    """The items of a shape-like value: a _Sym or a small 0-D/1-D integer constant."""
    if isinstance(value, _Sym):
        return list(value.items)
    if (
        isinstance(value, torch.Tensor)
        and value.dim() <= 1
        and value.numel() <= 64
        and (_is_int_dtype(value.dtype) or value.dtype == torch.bool)
    ):
        return value.reshape(-1).tolist()
    return None


def _has_node(obj: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, fx.Node)
        return a

    fx.node.map_aggregate(obj, visit)
    return found


def _sanitize(name: str, default: str) -> str:
    """A valid Python identifier derived from an ONNX name."""
    s = re.sub(r"\W", "_", name)
    s = re.sub(r"_+", "_", s).strip("_")
    if not s:
        s = default
    if s[0].isdigit():
        s = f"{default}_{s}"
    if keyword.iskeyword(s):
        s += "_"
    return s


_NUMPY_FLOAT8 = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(
            torch.bfloat16
        )
    float8 = _NUMPY_FLOAT8.get(array.dtype.name)
    if float8 is not None:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy()).view(float8)
    if array.dtype == object or array.dtype.kind in "SUV":
        raise TypeError(f"tensors of numpy dtype {array.dtype} have no torch equivalent")
    return torch.from_numpy(np.array(array, copy=True))


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A torch tensor (a copy) of a numpy array, including the ml_dtypes arrays ONNX uses for
    bfloat16 and float8.  Raises TypeError for dtypes torch has no equivalent of (int4, str)."""
    return _to_torch(np.asarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of a tensor, as ONNX Runtime and ``onnx.reference`` take and return them:
    bfloat16 and float8 become ml_dtypes arrays (``tensor.numpy()`` raises ``TypeError: Got
    unsupported ScalarType BFloat16`` for them), every other dtype goes through ``.numpy()``.

        >>> to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype.name
        'bfloat16'
    """
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16 or t.dtype in _FLOAT8:
        import ml_dtypes  # a dependency of onnx

        bits = t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        name = str(t.dtype).replace("torch.", "")
        return bits.view(getattr(ml_dtypes, name))
    return t.numpy()


def _tensor_from_proto(proto: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    return _to_torch(numpy_helper.to_array(proto, base_dir or ""))


# --------------------------------------------------------------------------------------------
# Runtime helpers called from generated code (used only where a value cannot stay symbolic)
# --------------------------------------------------------------------------------------------


def _dims_to_tensor(dims: list[Any], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A 1-D tensor from a list of ints / size values (traces dynamically)."""
    return torch.stack([torch.as_tensor(d, dtype=torch.int64) for d in dims]).to(dtype)


def _dim_to_tensor(dim: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.as_tensor(dim, dtype=torch.int64).to(dtype)


def _shape_tensor(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _gather(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Gather with runtime indices (negative indices allowed)."""
    axis = axis % data.dim()
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    out = _gather_any(data, axis, indices.reshape(-1))
    return out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


def _reshape_dynamic(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _expand_dynamic(x: torch.Tensor, shape: Any) -> torch.Tensor:
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    return x.expand(torch.broadcast_shapes(x.shape, tuple(int(d) for d in dims)))


def _full_dynamic(shape: torch.Tensor, value: Any, dtype: torch.dtype) -> torch.Tensor:
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
    return _reduce_extreme(x, dims, keepdim, True)


def _reduce_min(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return _reduce_extreme(x, dims, keepdim, False)


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


def _wide_uint(op: str, dtype: torch.dtype, *args: Any, **kwargs: Any) -> torch.Tensor:
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
        if isinstance(a, torch.Tensor) and a.dtype in _WIDE_UINT:
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


def _gather_any(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``torch.index_select`` that also moves uint16/32/64 tensors."""
    if x.dtype in _WIDE_UINT:
        return torch.index_select(_bitcast_signed(x), axis, index).view(x.dtype)
    return torch.index_select(x, axis, index)


def _onnx_slice_range(start: int, end: int, step: int, size: int) -> tuple[int, int]:
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


def _slice_onnx(
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
        begin, stop = _onnx_slice_range(int(s), int(e), int(st), x.shape[a])
        if st > 0:
            y = y.narrow(a, begin, max(stop - begin, 0))[
                (slice(None),) * a + (slice(None, None, st),)
            ]
        else:  # x[begin], x[begin + st], ... while > stop: slice the flipped axis forwards
            n = x.shape[a]
            count = max(-(-(begin - stop) // -st), 0)
            y = _bitcast_signed(y).flip(a).view(y.dtype) if y.dtype in _WIDE_UINT else y.flip(a)
            if not count:
                y = y.narrow(a, 0, 0)
                continue
            y = y.narrow(a, n - 1 - begin, (count - 1) * -st + 1)
            y = y[(slice(None),) * a + (slice(None, None, -st),)]
    return y


def _unsqueeze_dynamic(x: torch.Tensor, axes: Any) -> torch.Tensor:
    """ONNX Unsqueeze with axes known only at run time."""
    axes = _ints(axes)
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze_dynamic(x: torch.Tensor, axes: Any) -> torch.Tensor:
    """ONNX Squeeze with axes known only at run time."""
    for a in sorted({a % x.dim() for a in _ints(axes)}, reverse=True):
        x = x.squeeze(a)
    return x


def _split_dynamic(x: torch.Tensor, split: Any, axis: int) -> tuple[torch.Tensor, ...]:
    """ONNX Split with split sizes known only at run time."""
    return tuple(torch.split(x, _ints(split), axis))


def _tile_dynamic(x: torch.Tensor, repeats: Any) -> torch.Tensor:
    """ONNX Tile with repeats known only at run time."""
    repeats = _ints(repeats)
    return x.repeat(*repeats) if repeats else x


def _pad_dynamic(x: torch.Tensor, pads: Any, mode: str, value: Any, axes: Any) -> torch.Tensor:
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
        return F.pad(x, _torch_pad(pads), value=value or 0)
    for axis in range(rank):
        if pads[axis] or pads[axis + rank]:
            x = _pad_axis(x, axis, pads[axis], pads[axis + rank], mode)
    return x


def _range_dynamic(start: Any, limit: Any, delta: Any, dtype: torch.dtype) -> torch.Tensor:
    """ONNX Range with bounds known only at run time (0-D tensors or Python numbers)."""

    def num(v: Any) -> Any:
        return v.item() if isinstance(v, torch.Tensor) else v

    return torch.arange(num(start), num(limit), num(delta), dtype=dtype)


def _reduce_extreme(x: torch.Tensor, dims: list[int], keepdim: bool, largest: bool) -> torch.Tensor:
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


def _pad_axis(x: torch.Tensor, axis: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Reflect/replicate/circular padding of one axis of any tensor: torch's F.pad pads these
    modes only on the last 1-3 dims of 2-D to 5-D inputs, so move the axis last and fold the
    others into one (the modes are separable, so axes can be padded one after another)."""
    y = x.movedim(axis, -1)
    lead = y.shape[:-1]
    y = F.pad(y.reshape(1, -1, y.shape[-1]), [before, after], mode=mode)
    return y.reshape(*lead, y.shape[-1]).movedim(-1, axis)


def _layer_norm_manual(
    x: torch.Tensor, axis: int, eps: float, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    dims = tuple(range(axis % x.dim(), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def _avg_pool_exclude_pad(
    x: torch.Tensor, pads: list[int], kernel: list[int], strides: list[int], ceil_mode: bool
) -> torch.Tensor:
    """Average pooling over an explicitly padded input that does not count the padding."""
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    ones = torch.ones_like(x[:1, :1])
    total = pool(F.pad(x, pads), kernel, strides, 0, ceil_mode, True)
    count = pool(F.pad(ones, pads), kernel, strides, 0, ceil_mode, True)
    return total / count


# --------------------------------------------------------------------------------------------
# Importer
# --------------------------------------------------------------------------------------------


class _Importer:
    """Holds the FX graph under construction and the ONNX-name -> value environment."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = 1
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.shapes: dict[str, list[int | str | None] | None] = {}
        self.elem_types: dict[str, int] = {}
        self.consumers: dict[str, int] = {}
        self._names: set[str] = set()
        self._const_hint: dict[int, str] = {}
        self._const_nodes: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self._size_nodes: dict[tuple[fx.Node, int], fx.Node] = {}
        # Linear nodes (from MatMul) whose only consumer may absorb an Add of a bias.
        self.bias_fusable: dict[fx.Node, nn.Linear] = {}

    # -- names and constants -------------------------------------------------------------

    def unique_name(self, hint: str, default: str) -> str:
        base = _sanitize(hint, default)
        name, k = base, 1
        while name in self._names or hasattr(self.root, name) or hasattr(fx.GraphModule, name):
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def set_const_hint(self, tensor: torch.Tensor, name: str) -> None:
        self._const_hint.setdefault(id(tensor), name)

    def const_node(self, tensor: torch.Tensor) -> fx.Node:
        """A get_attr node reading ``tensor`` as a buffer of the root module."""
        entry = self._const_nodes.get(id(tensor))
        if entry is not None:
            return entry[1]
        name = self.unique_name(self._const_hint.get(id(tensor), "const"), "const")
        self.root.register_buffer(name, tensor.detach().contiguous())
        node = self.graph.get_attr(name)
        self._const_nodes[id(tensor)] = (tensor, node)  # keep the tensor alive: ids stay unique
        return node

    def size_node(self, x: fx.Node, dim: int) -> fx.Node:
        key = (x, dim)
        if key not in self._size_nodes:
            self._size_nodes[key] = self.graph.call_method("size", (x, dim))
        return self._size_nodes[key]

    def lift(self, obj: Any) -> Any:
        """Replace constants (tensors) in an argument structure by get_attr nodes."""

        def visit(a: Any) -> Any:
            if isinstance(a, _Sym):
                raise AssertionError("shape values must be materialized before emitting")
            return self.const_node(a) if isinstance(a, torch.Tensor) else a

        return fx.node.map_aggregate(obj, visit)

    def sym_to_tensor(self, sym: _Sym) -> Value:
        if sym.scalar:
            return self.graph.call_function(_dim_to_tensor, (sym.items[0], sym.dtype))
        return self.graph.call_function(_dims_to_tensor, (list(sym.items), sym.dtype))

    # -- static knowledge from shape inference -------------------------------------------

    def collect_value_info(self, model: onnx.ModelProto) -> None:
        g = model.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.elem_types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value
                    if d.HasField("dim_value")
                    else (d.dim_param if d.HasField("dim_param") else None)
                    for d in tt.shape.dim
                ]

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> fx.GraphModule:
        model = self.model
        g = model.graph
        self._check_supported(g)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception as exc:  # shape inference is a help, never a requirement
            logger.warning("ONNX shape inference failed (%s); importing without static shapes", exc)
            inferred = model
        self.collect_value_info(inferred)
        for node in g.node:
            for name in node.input:
                if name:
                    self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in g.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1

        for init in g.initializer:
            try:
                t = _tensor_from_proto(init)
            except Exception as exc:
                raise CaptureError(
                    f"Initializer {init.name!r} cannot be converted to a torch tensor: {exc}. "
                    f"Convert it to a supported dtype before importing."
                ) from exc
            self.env[init.name] = t
            self.set_const_hint(t, init.name)
        input_names: list[str] = []
        for vi in g.input:
            if vi.name in self.env:
                continue  # an initializer listed as an input (old IR): a constant
            input_names.append(vi.name)
            target = self.unique_name(vi.name, "input")
            ph = self.graph.placeholder(target)
            ph.meta["onnx_name"] = vi.name
            ph.meta["onnx_shape"] = self.shapes.get(vi.name)
            elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            ph.meta["onnx_elem_type"] = elem
            ph.meta["onnx_dtype"] = _ONNX_TO_TORCH.get(elem)
            if elem and ph.meta["onnx_dtype"] is None:  # int4, string, ...: no torch tensor
                raise CaptureError(
                    f"ONNX graph input {vi.name!r} has element type "
                    f"{onnx.TensorProto.DataType.Name(elem)}, which has no torch dtype, so "
                    f"graphopt's importer cannot represent it. Give the model an input of a "
                    f"supported type (e.g. int8 or float32, with a Cast inside the model) and "
                    f"re-export it."
                )
            self.env[vi.name] = ph

        for index, node in enumerate(g.node):
            ctx = _Ctx(self, node, index)
            _check_storage_dtypes(ctx)
            try:
                result = _CONVERTERS[node.op_type](ctx)
            except CaptureError:
                raise
            except Exception as exc:
                raise CaptureError(
                    f"Converting ONNX node {ctx.name!r} (op type {node.op_type!r}) failed: "
                    f"{type(exc).__name__}: {exc}. The node's attributes or input shapes are "
                    f"probably outside what graphopt's importer handles; please report it with "
                    f"the model."
                ) from exc
            outputs = result if isinstance(result, list) else [result]
            for name, value in zip(node.output, outputs, strict=False):
                if name:
                    self.env[name] = value
                    if isinstance(value, torch.Tensor):
                        self.set_const_hint(value, name)
                    elif isinstance(value, fx.Node):
                        value.meta.setdefault("onnx_node", ctx.name)

        results: list[fx.Node] = []
        for out in g.output:
            value = self.env[out.name]
            if isinstance(value, _Sym):
                value = self.sym_to_tensor(value)
            if isinstance(value, torch.Tensor):
                value = self.const_node(value)
            results.append(value)
        self.graph.output(results[0] if len(results) == 1 else tuple(results))

        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in [b for b, _ in gm.named_buffers(recurse=False) if b not in used]:
            delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
        gm.meta["onnx_input_names"] = input_names
        gm.meta["onnx_output_names"] = [o.name for o in g.output]
        gm.meta["onnx_opset"] = self.opset
        # the output node carries the names too: graph passes copy nodes' meta, not gm.meta
        output_node = next(n for n in gm.graph.nodes if n.op == "output")
        output_node.meta["onnx_output_names"] = list(gm.meta["onnx_output_names"])
        return gm.eval()  # an ONNX graph is an inference graph (BatchNorm, Dropout)

    def distrust_shapes_after(self, name: str, shape: list[int | str | None]) -> None:
        """Set the shape of ``name`` and forget static dims of every value computed from it.

        Used where ONNX shape inference is known to be wrong; ranks are kept, and dims of
        downstream values are then read at run time (``x.size(i)``) instead.
        """
        self.shapes[name] = shape
        tainted = {name}
        for node in self.model.graph.node:
            if not tainted.intersection(node.input):
                continue
            for out in node.output:
                if out and out not in tainted:
                    tainted.add(out)
                    known = self.shapes.get(out)
                    if known is not None:
                        self.shapes[out] = [None if isinstance(d, int) else d for d in known]

    def _check_supported(self, g: onnx.GraphProto) -> None:
        bad: dict[str, str] = {}
        for index, node in enumerate(g.node):
            domain_ok = node.domain in ("", "ai.onnx")
            label = node.op_type if domain_ok else f"{node.domain}::{node.op_type}"
            if (not domain_ok or node.op_type not in _CONVERTERS) and label not in bad:
                bad[label] = node.name or f"{node.op_type}_{index}"
        if bad:
            listing = ", ".join(f"{op!r} (node {name!r})" for op, name in bad.items())
            raise CaptureError(
                f"The ONNX model uses op types that graphopt's ONNX importer does not support: "
                f"{listing}. The supported op types are listed in "
                f"graphopt.onnx_import.SUPPORTED_OPS ({len(_CONVERTERS)} ops). Re-export the "
                f"model without these ops (e.g. another opset or a simpler module), or add a "
                f"converter for them."
            )


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
# uint16/32/64 inputs: data movement, and the converters that compute them via _wide_uint (those
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


def _check_storage_dtypes(ctx: _Ctx) -> None:
    """Refuse, at import, ops on dtypes torch stores but cannot compute with (float8 except
    for data movement; uint16/32/64 outside _WIDE_UINT_OPS), instead of a NotImplementedError
    when the graph runs."""
    for i in range(len(ctx.node.input)):
        dtype = ctx.dtype(i)
        if (dtype in _FLOAT8 and ctx.op not in _DATA_MOVEMENT) or (
            dtype in _WIDE_UINT and ctx.op not in _WIDE_UINT_OPS
        ):
            raise _refuse_dtype(ctx, dtype)


class _Ctx:
    """One ONNX node being converted: its inputs, attributes and helpers that emit FX nodes."""

    def __init__(self, imp: _Importer, node: onnx.NodeProto, index: int) -> None:
        self.imp = imp
        self.node = node
        self.op = node.op_type
        self.name = node.name or f"{node.op_type}_{index}"
        self.opset = imp.opset
        self.attrs: dict[str, Any] = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            self.attrs[a.name] = value

    # -- errors and attributes -------------------------------------------------------------

    def fail(self, what: str, fix: str = "") -> CaptureError:
        msg = f"ONNX node {self.name!r} ({self.op}): {what}."
        if fix:
            msg += f" {fix}"
        return CaptureError(msg)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    # -- inputs --------------------------------------------------------------------------

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def value(self, i: int) -> Value | None:
        return self.imp.env[self.node.input[i]] if self.has(i) else None

    def const(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a constant tensor, or None when absent or known only at run time."""
        v = self.value(i)
        return v if isinstance(v, torch.Tensor) else None

    def const_ints(self, i: int, what: str) -> list[int] | None:
        """Input ``i`` as a list of ints (None when absent); it must be constant."""
        if not self.has(i):
            return None
        v = self.value(i)
        if not isinstance(v, torch.Tensor):
            raise self.fail(
                f"input {what!r} ({self.node.input[i]!r}) must be a constant, but it "
                f"is computed at run time",
                "Export the model with constant folding so it becomes constant.",
            )
        return [int(d) for d in v.reshape(-1).tolist()]

    def tensor(self, i: int) -> torch.Tensor | fx.Node:
        """Input ``i`` as a constant tensor or a runtime node (shape values materialized)."""
        v = self.value(i)
        if v is None:
            raise self.fail(f"required input {i} is missing")
        return self.materialize(v)

    def materialize(self, v: Value) -> torch.Tensor | fx.Node:
        return self.imp.sym_to_tensor(v) if isinstance(v, _Sym) else v

    def shape(self, i: int) -> list[int | str | None] | None:
        """The statically inferred shape of input ``i`` (None when unknown)."""
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        if isinstance(v, _Sym):
            return [] if v.scalar else [len(v.items)]
        return self.imp.shapes.get(self.node.input[i]) if self.has(i) else None

    def rank(self, i: int) -> int | None:
        s = self.shape(i)
        return None if s is None else len(s)

    def static_dim(self, i: int, axis: int) -> int | None:
        s = self.shape(i)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, int) else None

    def dtype(self, i: int) -> torch.dtype | None:
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return v.dtype
        if isinstance(v, _Sym):
            return v.dtype
        return (
            _ONNX_TO_TORCH.get(self.imp.elem_types.get(self.node.input[i], 0))
            if self.has(i)
            else None
        )

    def output_used(self, j: int) -> bool:
        return (
            j < len(self.node.output)
            and self.node.output[j] != ""
            and self.imp.consumers.get(self.node.output[j], 0) > 0
        )

    def dims_of(self, i: int) -> list[int | fx.Node] | None:
        """Per-dim sizes of input ``i``: static ints where known, ``x.size(d)`` nodes otherwise."""
        v = self.value(i)
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        s = self.shape(i)
        if s is None or not isinstance(v, fx.Node):
            return None
        return [d if isinstance(d, int) else self.imp.size_node(v, k) for k, d in enumerate(s)]

    # -- emitting ------------------------------------------------------------------------

    def _emit(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not _has_node((args, kwargs)):
            with torch.no_grad():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self.imp.root.get_submodule(target)(*args, **kwargs)
        node = self.imp.graph.create_node(kind, target, self.imp.lift(args), self.imp.lift(kwargs))
        node.meta["onnx_node"] = self.name
        node.meta["onnx_op"] = self.op
        return node

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Emit ``fn(*args, **kwargs)``, or evaluate it now when every argument is constant."""
        return self._emit("call_function", fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._emit("call_method", name, args, kwargs)

    def module(self, mod: nn.Module, *args: Any) -> Any:
        """Register ``mod`` as a submodule named after this node and call it."""
        mod.eval()
        if not _has_node(args):
            with torch.no_grad():
                return mod(*args)
        target = self.imp.unique_name(self.name, self.op.lower())
        self.imp.root.add_module(target, mod)
        return self._emit("call_module", target, args, {})


Converter = Callable[[_Ctx], Value | list[Value]]
_CONVERTERS: dict[str, Converter] = {}


def _converter(*op_types: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for op in op_types:
            _CONVERTERS[op] = fn
        return fn

    return register


def import_onnx(model: ModelSource) -> fx.GraphModule:
    """Import an ONNX model (path, bytes or ModelProto) as a ``torch.fx.GraphModule``.

    Raises :class:`CaptureError` when the model cannot be loaded or uses an op, attribute value or
    runtime-dependent construct the importer does not support.
    """
    proto = load_onnx(model)
    return _Importer(proto).run()


# --------------------------------------------------------------------------------------------
# Shared geometry helpers
# --------------------------------------------------------------------------------------------


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX pads [b1..bn, e1..en] (over the last n dims) -> F.pad order (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def _resolve_pads(
    ctx: _Ctx, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Explicit [begins..., ends...] pads for a conv/pool node, resolving ``auto_pad``."""
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = list(ctx.attr("pads", [0] * 2 * n))
        if len(pads) != 2 * n:
            raise ctx.fail(f"pads {pads} do not have 2 * {n} entries")
        return pads
    if auto_pad == "VALID":
        return [0] * 2 * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto_pad!r} is not a valid value")
    begins, ends = [], []
    for i, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
        eff = (k - 1) * d + 1
        if s == 1:
            total = eff - 1
        else:
            size = ctx.static_dim(0, 2 + i)
            if size is None:
                raise ctx.fail(
                    f"auto_pad={auto_pad} with stride {s} needs the static size of spatial "
                    f"dim {i}, which is not known",
                    "Export the model with explicit pads (auto_pad=NOTSET) or static spatial "
                    "sizes.",
                )
            total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _spatial_attrs(ctx: _Ctx, n: int) -> tuple[list[int], list[int]]:
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    return strides, dilations


def _set_param(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        setattr(mod, name, None)
    else:
        setattr(mod, name, nn.Parameter(value.detach().clone().contiguous()))


# --------------------------------------------------------------------------------------------
# Converters: modules
# --------------------------------------------------------------------------------------------


@_converter("Conv")
def _conv(ctx: _Ctx) -> Value:
    w = ctx.value(1)
    kernel = ctx.attr("kernel_shape")
    if kernel is None:
        if not isinstance(w, torch.Tensor):
            shape = ctx.shape(1)
            if shape is None or not all(isinstance(d, int) for d in shape):
                raise ctx.fail("kernel_shape is absent and the weight's shape is unknown")
            kernel = shape[2:]
        else:
            kernel = list(w.shape[2:])
    n = len(kernel)
    if n not in (1, 2, 3):
        raise ctx.fail(f"{n}-D convolution is not supported (only 1-D, 2-D and 3-D)")
    strides, dilations = _spatial_attrs(ctx, n)
    group = int(ctx.attr("group", 1))
    pads = _resolve_pads(ctx, kernel, strides, dilations)
    x = ctx.tensor(0)
    if pads[:n] != pads[n:]:
        x = ctx.call(F.pad, x, _torch_pad(pads))
        padding = [0] * n
    else:
        padding = pads[:n]
    b = ctx.value(2)
    if isinstance(w, torch.Tensor) and (b is None or isinstance(b, torch.Tensor)):
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        mod = nn.utils.skip_init(
            cls,
            w.shape[1] * group,
            w.shape[0],
            tuple(kernel),
            stride=tuple(strides),
            padding=tuple(padding),
            dilation=tuple(dilations),
            groups=group,
            bias=b is not None,
            dtype=w.dtype,
        )
        _set_param(mod, "weight", w)
        if b is not None:
            _set_param(mod, "bias", b)
        return ctx.module(mod, x)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return ctx.call(
        fn,
        x,
        ctx.tensor(1),
        None if b is None else ctx.tensor(2),
        strides,
        padding,
        dilations,
        group,
    )


@_converter("ConvTranspose")
def _conv_transpose(ctx: _Ctx) -> Value:
    w = ctx.const(1)
    if w is None:
        raise ctx.fail("the weight must be a constant initializer")
    kernel = list(ctx.attr("kernel_shape", w.shape[2:]))
    n = len(kernel)
    if n not in (1, 2, 3):
        raise ctx.fail(f"{n}-D transposed convolution is not supported")
    if ctx.attr("output_shape") is not None:
        raise ctx.fail(
            "the output_shape attribute is not supported",
            "Export the model with explicit pads and output_padding instead.",
        )
    if ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ctx.fail(
            f"auto_pad={ctx.attr('auto_pad')} is not supported for ConvTranspose",
            "Export the model with explicit pads.",
        )
    strides, dilations = _spatial_attrs(ctx, n)
    group = int(ctx.attr("group", 1))
    output_padding = list(ctx.attr("output_padding", [0] * n))
    pads = (
        list(ctx.attr("pads", [0] * 2 * n))
        if ctx.attr("auto_pad", "NOTSET") == "NOTSET"
        else [0] * 2 * n
    )
    b = ctx.value(2)
    if b is not None and not isinstance(b, torch.Tensor):
        raise ctx.fail("the bias must be a constant initializer")
    symmetric = pads[:n] == pads[n:]
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[n - 1]
    mod = nn.utils.skip_init(
        cls,
        w.shape[0],
        w.shape[1] * group,
        tuple(kernel),
        stride=tuple(strides),
        padding=tuple(pads[:n]) if symmetric else 0,
        output_padding=tuple(output_padding),
        groups=group,
        bias=b is not None,
        dilation=tuple(dilations),
        dtype=w.dtype,
    )
    _set_param(mod, "weight", w)
    if b is not None:
        _set_param(mod, "bias", b)
    y = ctx.module(mod, ctx.tensor(0))
    if symmetric:
        return y
    # Asymmetric pads crop the full output: slice them off explicitly.
    index: list[Any] = [Ellipsis]
    for i in range(n):
        begin, end = pads[i], pads[i + n]
        index.append(slice(begin, -end if end else None))
    return ctx.call(operator.getitem, y, tuple(index))


class _InferenceBatchNorm:
    """Mixin for ONNX's inference-form BatchNormalization (``training_mode=0``): the module stays
    in eval mode whatever ``.train()`` says, so it always normalizes with the running statistics
    and never updates them -- what the ONNX node computes.  Passes see an ordinary eval-mode
    ``nn.BatchNorm*d`` (``isinstance`` holds and ``forward`` is torch's own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # torch.fx tracers keep torch.nn modules opaque (Tracer.is_leaf_module reads
        # m.__module__): this is torch's BatchNorm with train() pinned, so it must stay one
        # call_module node for passes (fold-conv-bn, ...) when an imported graph is retraced.
        # The class keeps its real module, so pickling and deepcopy are unaffected.
        self.__module__ = nn.BatchNorm2d.__module__

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(False)  # type: ignore[misc]


class OnnxBatchNorm1d(_InferenceBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` pinned to eval mode (ONNX BatchNormalization, training_mode=0)."""


class OnnxBatchNorm2d(_InferenceBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` pinned to eval mode (ONNX BatchNormalization, training_mode=0)."""


class OnnxBatchNorm3d(_InferenceBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` pinned to eval mode (ONNX BatchNormalization, training_mode=0)."""


@_converter("BatchNormalization")
def _batch_norm(ctx: _Ctx) -> Value:
    if ctx.attr("training_mode", 0):
        raise ctx.fail(
            "training_mode=1 is not supported (inference only)", "Export the model in eval mode."
        )
    if any(ctx.output_used(j) for j in range(1, len(ctx.node.output))):
        raise ctx.fail(
            "the running-statistics outputs are used; only the inference form with "
            "one output is supported",
            "Export the model in eval mode.",
        )
    eps = float(ctx.attr("epsilon", 1e-5))
    params = [ctx.const(i) for i in range(1, 5)]
    rank = ctx.rank(0)
    if all(p is not None for p in params) and rank in (2, 3, 4, 5):
        scale, bias, mean, var = params
        cls = {2: OnnxBatchNorm1d, 3: OnnxBatchNorm1d, 4: OnnxBatchNorm2d, 5: OnnxBatchNorm3d}[rank]
        mod = cls(scale.numel(), eps=eps, dtype=scale.dtype)
        _set_param(mod, "weight", scale)
        _set_param(mod, "bias", bias)
        with torch.no_grad():
            mod.running_mean.copy_(mean)
            mod.running_var.copy_(var)
        return ctx.module(mod, ctx.tensor(0))
    return ctx.call(
        F.batch_norm,
        ctx.tensor(0),
        ctx.tensor(3),
        ctx.tensor(4),
        ctx.tensor(1),
        ctx.tensor(2),
        False,
        0.0,
        eps,
    )


def _linear(ctx: _Ctx, x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    mod = nn.utils.skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype
    )
    _set_param(mod, "weight", weight)
    _set_param(mod, "bias", bias)
    return ctx.module(mod, x), mod


@_converter("Gemm")
def _gemm(ctx: _Ctx) -> Value:
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a = ctx.tensor(0)
    if trans_a:
        a = ctx.method("t", a)
    b = ctx.const(1)
    c = ctx.value(2)
    if b is None:
        y = ctx.call(torch.matmul, a, ctx.method("t", ctx.tensor(1)) if trans_b else ctx.tensor(1))
        if alpha != 1.0:
            y = ctx.call(torch.mul, y, alpha)
        if c is not None:
            cc = ctx.materialize(c)
            y = ctx.call(torch.add, y, cc if beta == 1.0 else ctx.call(torch.mul, cc, beta))
        return y
    weight = b if trans_b else b.t()
    if alpha != 1.0:
        weight = weight * alpha
    n_out = weight.shape[0]
    bias, extra = None, None
    if isinstance(c, torch.Tensor) and (
        c.numel() == 1 or (c.numel() == n_out and c.dim() >= 1 and c.shape[-1] == n_out)
    ):
        bias = (
            (c.reshape(-1) * beta).expand(n_out).clone()
            if beta != 1.0
            else c.reshape(-1).expand(n_out).clone()
        )
    elif c is not None:
        cc = ctx.materialize(c)
        extra = cc if beta == 1.0 else ctx.call(torch.mul, cc, beta)
    y, _ = _linear(ctx, a, weight.contiguous(), bias)
    return y if extra is None else ctx.call(torch.add, y, extra)


@_converter("MatMul")
def _matmul(ctx: _Ctx) -> Value:
    a, b = ctx.tensor(0), ctx.value(1)
    if (
        isinstance(b, torch.Tensor)
        and b.dim() == 2
        and isinstance(a, fx.Node)
        and b.is_floating_point()
    ):
        y, mod = _linear(ctx, a, b.t().contiguous(), None)
        out = ctx.node.output[0]
        if ctx.imp.consumers.get(out, 0) == 1 and out not in {
            o.name for o in ctx.imp.model.graph.output
        }:
            ctx.imp.bias_fusable[y] = mod
        return y
    return ctx.call(torch.matmul, a, ctx.materialize(b))


# --------------------------------------------------------------------------------------------
# Converters: element-wise
# --------------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "HardSwish": F.hardswish,
    "Log": torch.log,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Relu": F.relu,
    "Round": torch.round,
    "Sigmoid": torch.sigmoid,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Softplus": F.softplus,
    "Sqrt": torch.sqrt,
    "Tanh": torch.tanh,
    "Mish": F.mish,
}


@_converter(*_UNARY)
def _unary(ctx: _Ctx) -> Value:
    wide = _wide_uint_dtype(ctx)
    if wide is not None:
        if ctx.op == "Abs":
            return ctx.tensor(0)  # |x| = x for unsigned x
        if ctx.op not in ("Neg", "Sign"):
            raise _refuse_dtype(ctx, wide)
        return ctx.call(_wide_uint, ctx.op, wide, ctx.tensor(0))
    return ctx.call(_UNARY[ctx.op], ctx.tensor(0))


def _wide_uint_dtype(ctx: _Ctx) -> torch.dtype | None:
    """The uint16/32/64 dtype of the node's inputs, if any (they need _wide_uint)."""
    for i in range(len(ctx.node.input)):
        dtype = ctx.dtype(i)
        if dtype in _WIDE_UINT:
            return dtype
    return None


def _refuse_dtype(ctx: _Ctx, dtype: torch.dtype) -> CaptureError:
    kind = "float8" if dtype in _FLOAT8 else "unsigned 16/32/64-bit"
    return ctx.fail(
        f"an input has dtype {str(dtype).replace('torch.', '')}, and torch has no {ctx.op} "
        f"kernel for {kind} tensors, which graphopt's importer computes only for some ops",
        "Cast the tensor to a supported dtype (e.g. int64 or float32) in the model before this "
        "node, or report the op with the model.",
    )


_BINARY: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}

_SYM_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": operator.floordiv,
    "Equal": operator.eq,
}


def _sym_binary(ctx: _Ctx) -> Value | None:
    """Element-wise arithmetic on shape values, kept at Python level; None if not applicable."""
    a, b = ctx.value(0), ctx.value(1)
    if ctx.op not in _SYM_BINARY or not (isinstance(a, _Sym) or isinstance(b, _Sym)):
        return None
    ia, ib = _sym_items(a), _sym_items(b)
    if (
        ia is None
        or ib is None
        or not (_is_int_dtype(ctx.dtype(0)) and _is_int_dtype(ctx.dtype(1)))
    ):
        return None
    if len(ia) != len(ib) and 1 not in (len(ia), len(ib)):
        return None
    n = max(len(ia), len(ib))
    ia, ib = (ia * n if len(ia) == 1 else ia), (ib * n if len(ib) == 1 else ib)
    out: list[Any] = []
    for x, y in zip(ia, ib, strict=True):
        if isinstance(x, int) and isinstance(y, int):
            if ctx.op == "Div":
                out.append(int(x / y) if y else 0)
            else:
                out.append(_SYM_BINARY[ctx.op](x, y))
        elif ctx.op == "Equal" and (isinstance(x, int) and x < 0 or isinstance(y, int) and y < 0):
            out.append(False)  # a size is never negative
        elif ctx.op == "Div" and any(isinstance(v, int) and v < 0 for v in (x, y)):
            return None  # floor division would round the wrong way
        else:
            out.append(ctx.call(_SYM_BINARY[ctx.op], x, y))
    scalar = (
        (not isinstance(a, torch.Tensor) or a.dim() == 0)
        and (not isinstance(b, torch.Tensor) or b.dim() == 0)
        and (not isinstance(a, _Sym) or a.scalar)
        and (not isinstance(b, _Sym) or b.scalar)
    )
    dtype = torch.bool if ctx.op == "Equal" else (ctx.dtype(0) or torch.int64)
    return _make_sym(out, scalar, dtype)


@_converter(*_BINARY)
def _binary(ctx: _Ctx) -> Value:
    sym = _sym_binary(ctx)
    if sym is not None:
        return sym
    a, b = ctx.tensor(0), ctx.tensor(1)
    if ctx.op == "Add":
        fused = _fuse_linear_bias(ctx, a, b)
        if fused is not None:
            return fused
    wide = _wide_uint_dtype(ctx)
    if wide is not None:
        if ctx.op in ("And", "Or", "Xor"):
            raise _refuse_dtype(ctx, wide)
        y = ctx.call(_wide_uint, ctx.op, wide, a, b)
        return _pow_dtype(ctx, y) if ctx.op == "Pow" else y
    # A 0-D constant next to a runtime tensor becomes a Python scalar (``x * 0.125``): same
    # result (ONNX requires equal dtypes), and easier for passes to match than a buffer.
    if isinstance(a, fx.Node) and _is_scalar_const(b):
        b = b.item()
    elif isinstance(b, fx.Node) and _is_scalar_const(a) and ctx.op in ("Add", "Mul"):
        a, b = b, a.item()  # torch.add/mul want the tensor first; both are commutative
    if ctx.op == "Div" and (_is_int_dtype(ctx.dtype(0)) or _is_int_dtype(ctx.dtype(1))):
        return ctx.call(torch.div, a, b, rounding_mode="trunc")
    y = ctx.call(_BINARY[ctx.op], a, b)
    return _pow_dtype(ctx, y) if ctx.op == "Pow" else y


def _pow_dtype(ctx: _Ctx, y: Any) -> Any:
    """ONNX Pow's result has the base's type (int base ** float exponent is an int, the float
    result truncated toward zero); torch promotes to the wider of the two."""
    base, exponent = ctx.dtype(0), ctx.dtype(1)
    if base is None or base == exponent:
        return y
    return ctx.method("to", y, base)


def _is_scalar_const(v: Any) -> bool:
    return (
        isinstance(v, torch.Tensor)
        and v.dim() == 0
        and v.dtype != torch.bool
        and not v.is_complex()
    )


def _fuse_linear_bias(ctx: _Ctx, a: Any, b: Any) -> fx.Node | None:
    """MatMul(x, W) + bias, where the MatMul is an nn.Linear without bias: set its bias."""
    for node, bias in ((a, b), (b, a)):
        if (
            isinstance(node, fx.Node)
            and node in ctx.imp.bias_fusable
            and isinstance(bias, torch.Tensor)
        ):
            mod = ctx.imp.bias_fusable[node]
            if (
                bias.dim() == 1
                and bias.shape[0] == mod.out_features
                and bias.dtype == mod.weight.dtype
            ):
                _set_param(mod, "bias", bias)
                del ctx.imp.bias_fusable[node]
                return node
    return None


@_converter("Sum", "Max", "Min", "Mean")
def _variadic(ctx: _Ctx) -> Value:
    fn = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[ctx.op]
    inputs = [ctx.tensor(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    wide = _wide_uint_dtype(ctx)
    if wide is not None and ctx.op == "Mean":
        raise _refuse_dtype(ctx, wide)
    y = inputs[0]
    for other in inputs[1:]:
        if wide is not None:
            y = ctx.call(_wide_uint, ctx.op, wide, y, other)
        else:
            y = ctx.call(fn, y, other)
    if ctx.op == "Mean" and len(inputs) > 1:
        y = ctx.call(torch.div, y, float(len(inputs)))
    return y


@_converter("LeakyRelu")
def _leaky_relu(ctx: _Ctx) -> Value:
    return ctx.call(F.leaky_relu, ctx.tensor(0), float(ctx.attr("alpha", 0.01)))


@_converter("Elu")
def _elu(ctx: _Ctx) -> Value:
    return ctx.call(F.elu, ctx.tensor(0), float(ctx.attr("alpha", 1.0)))


@_converter("PRelu")
def _prelu(ctx: _Ctx) -> Value:
    x, slope = ctx.tensor(0), ctx.tensor(1)
    return ctx.call(torch.where, ctx.call(torch.lt, x, 0), ctx.call(torch.mul, x, slope), x)


@_converter("HardSigmoid")
def _hard_sigmoid(ctx: _Ctx) -> Value:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    x = ctx.tensor(0)
    if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6:
        return ctx.call(F.hardsigmoid, x)
    return ctx.call(torch.clamp, ctx.call(torch.add, ctx.call(torch.mul, x, alpha), beta), 0.0, 1.0)


@_converter("Gelu")
def _gelu(ctx: _Ctx) -> Value:
    approximate = ctx.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.fail(f"approximate={approximate!r} is not a valid value")
    return ctx.call(F.gelu, ctx.tensor(0), approximate=approximate)


def _scalar_of(ctx: _Ctx, i: int, what: str) -> float | int | None:
    v = ctx.value(i)
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise ctx.fail(f"input {what!r} must be a constant scalar")
    return v.item()


@_converter("Clip")
def _clip(ctx: _Ctx) -> Value:
    x = ctx.tensor(0)
    if ctx.opset < 11 or "min" in ctx.attrs or "max" in ctx.attrs:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        lo_v, hi_v = ctx.value(1), ctx.value(2)
        if isinstance(lo_v, fx.Node) or isinstance(hi_v, fx.Node):
            bounds = (
                None if lo_v is None else ctx.tensor(1),
                None if hi_v is None else ctx.tensor(2),
            )
            wide = _wide_uint_dtype(ctx)
            if wide is not None:
                return ctx.call(_wide_uint, "Clip", wide, x, *bounds)
            return ctx.call(torch.clamp, x, *bounds)
        lo, hi = _scalar_of(ctx, 1, "min"), _scalar_of(ctx, 2, "max")
    if lo is None and hi is None:
        return x
    wide = _wide_uint_dtype(ctx)
    if wide is not None:  # bounds as tensors of x's dtype, so that _wide_uint widens them too
        lo, hi = (None if v is None else torch.tensor(v, dtype=wide) for v in (lo, hi))
        return ctx.call(_wide_uint, "Clip", wide, x, lo, hi)
    return ctx.call(torch.clamp, x, lo, hi)


@_converter("Where")
def _where(ctx: _Ctx) -> Value:
    cond, a, b = ctx.value(0), ctx.value(1), ctx.value(2)
    if isinstance(a, _Sym) or isinstance(b, _Sym):
        ic, ia, ib = _sym_items(cond), _sym_items(a), _sym_items(b)
        if (
            ic is not None
            and ia is not None
            and ib is not None
            and not any(isinstance(c, fx.Node) for c in ic)
        ):
            n = max(len(ic), len(ia), len(ib))
            if all(len(v) in (1, n) for v in (ic, ia, ib)):

                def at(v: list[Any], k: int) -> Any:
                    return v[0] if len(v) == 1 else v[k]

                items = [at(ia, k) if at(ic, k) else at(ib, k) for k in range(n)]
                scalar = all(
                    isinstance(v, _Sym) and v.scalar or isinstance(v, torch.Tensor) and v.dim() == 0
                    for v in (cond, a, b)
                )
                return _make_sym(items, scalar)
    return ctx.call(torch.where, ctx.tensor(0), ctx.tensor(1), ctx.tensor(2))


@_converter("Cast", "CastLike")
def _cast(ctx: _Ctx) -> Value:
    to = _ONNX_TO_TORCH.get(int(ctx.attr("to", 0)))
    dtype = to if ctx.op == "Cast" else ctx.dtype(1)
    if dtype is None:
        target = (
            onnx.TensorProto.DataType.Name(int(ctx.attr("to", 0)))
            if ctx.op == "Cast"
            else f"of input {ctx.node.input[1]!r}"
        )
        raise ctx.fail(
            f"the target type {target} is unknown or has no torch dtype",
            "Cast to a type torch has (e.g. int8, float16, float32) instead.",
        )
    v = ctx.value(0)
    if isinstance(v, _Sym) and _is_int_dtype(dtype):
        return _Sym(v.items, v.scalar, dtype)
    x = ctx.materialize(v)
    if dtype in _FLOAT8 and ctx.dtype(0) not in _FLOAT8:
        # torch's cast saturates to E4M3FN and overflows (to inf or NaN) for the other float8
        # types; ONNX's saturate=1 (the default) clamps to the largest finite value.
        saturate = bool(ctx.attr("saturate", 1))
        if dtype == torch.float8_e4m3fn and not saturate:
            raise ctx.fail(
                "Cast to FLOAT8E4M3FN with saturate=0 (out-of-range values become NaN) is not "
                "supported: torch's cast to float8_e4m3fn always saturates",
                "Export the model with saturate=1, or cast to float16/float32 instead.",
            )
        if saturate and dtype != torch.float8_e4m3fn:
            limit = float(torch.finfo(dtype).max)
            x = ctx.call(torch.clamp, x, -limit, limit)
    return ctx.method("to", x, dtype)


@_converter("Identity")
def _identity(ctx: _Ctx) -> Value:
    return ctx.value(0)


@_converter("Dropout")
def _dropout(ctx: _Ctx) -> Value | list[Value]:
    if ctx.value(2) is not None:
        training = ctx.const(2)
        if training is None or bool(training.item()):
            raise ctx.fail("training_mode is not a constant false", "Export in eval mode.")
    x = ctx.value(0)
    if len(ctx.node.output) > 1 and ctx.output_used(1):
        return [x, ctx.call(torch.ones_like, ctx.materialize(x), dtype=torch.bool)]
    return x


# --------------------------------------------------------------------------------------------
# Converters: normalization, softmax, reductions
# --------------------------------------------------------------------------------------------


@_converter("Softmax", "LogSoftmax")
def _softmax(ctx: _Ctx) -> Value:
    fn = F.softmax if ctx.op == "Softmax" else F.log_softmax
    x = ctx.tensor(0)
    if ctx.opset >= 13:
        return ctx.call(fn, x, dim=int(ctx.attr("axis", -1)))
    # Opset < 13: coerce to 2-D [prod(dims[:axis]), prod(dims[axis:])], normalize each row.
    axis = int(ctx.attr("axis", 1))
    rank = ctx.rank(0)
    if rank is not None and axis < 0:
        axis += rank
    if axis == -1 or (rank is not None and axis == rank - 1):
        return ctx.call(fn, x, dim=-1)
    if axis < 0:
        raise ctx.fail(f"a negative axis ({axis}) needs the input rank, which is unknown")
    flat = ctx.method("flatten", x, axis)
    return ctx.method("reshape_as", ctx.call(fn, flat, dim=-1), x)


@_converter("LayerNormalization")
def _layer_norm(ctx: _Ctx) -> Value:
    if any(ctx.output_used(j) for j in (1, 2)):
        raise ctx.fail("the Mean/InvStdDev outputs are used; only the first output is supported")
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    x = ctx.tensor(0)
    scale, bias = ctx.value(1), ctx.value(2)
    rank = ctx.rank(0)
    count = (rank - axis % rank) if rank is not None else (-axis if axis < 0 else None)
    normalized: list[int] | None = None
    if count is not None:
        shape = ctx.shape(0)
        trailing = shape[len(shape) - count :] if shape is not None else None
        if trailing is not None and all(isinstance(d, int) for d in trailing):
            normalized = list(trailing)
        elif isinstance(scale, torch.Tensor) and scale.dim() == count:
            normalized = list(scale.shape)
    if normalized is None:  # F.layer_norm needs the normalized dims as static ints
        logger.debug("%s: normalized dims unknown, using the explicit formula", ctx.name)
        return ctx.call(
            _layer_norm_manual, x, axis, eps, ctx.tensor(1), None if bias is None else ctx.tensor(2)
        )

    def fit(v: Value | None) -> Any:
        if isinstance(v, torch.Tensor) and list(v.shape) != normalized:
            return v.expand(normalized).clone()
        return None if v is None else ctx.materialize(v)

    return ctx.call(F.layer_norm, x, normalized, fit(scale), fit(bias), eps)


_REDUCE: dict[str, Callable[..., torch.Tensor]] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
}


@_converter(*_REDUCE, "ReduceL2")
def _reduce(ctx: _Ctx) -> Value:
    keepdim = bool(ctx.attr("keepdims", 1))
    noop = bool(ctx.attr("noop_with_empty_axes", 0))
    x = ctx.tensor(0)
    dtype = ctx.dtype(0)
    wide = _wide_uint_dtype(ctx)
    if wide is not None and ctx.op not in ("ReduceSum", "ReduceMax", "ReduceMin"):
        raise _refuse_dtype(ctx, wide)
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(_reduce_onnx, x, ctx.tensor(1), ctx.op, keepdim, noop)
    if axes is None and ctx.has(1):
        axes = ctx.const_ints(1, "axes")
    if not axes:
        if noop:
            return x
        rank = ctx.rank(0)
        if rank is None:
            return ctx.call(_reduce_onnx, x, None, ctx.op, keepdim, noop)
        axes = list(range(rank))
    axes = list(axes)
    if wide is not None or ctx.op in ("ReduceMean", "ReduceSum") and _is_int_dtype(dtype):
        return ctx.call(_reduce_onnx, x, axes, ctx.op, keepdim, noop)
    if ctx.op == "ReduceL2":
        return ctx.call(torch.linalg.vector_norm, x, 2, dim=axes, keepdim=keepdim)
    if ctx.op in ("ReduceMax", "ReduceMin"):
        sizes = [ctx.static_dim(0, a) for a in axes]
        if not all(isinstance(n, int) and n > 0 for n in sizes):  # may reduce an empty set
            return ctx.call(_reduce_extreme, x, axes, keepdim, ctx.op == "ReduceMax")
    return ctx.call(_REDUCE[ctx.op], x, dim=axes, keepdim=keepdim)


def _reduce_onnx(
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
    if x.dtype in _WIDE_UINT:
        if op == "ReduceSum":
            return _wide_uint(op, x.dtype, x, dim=axes, keepdim=keepdim)
        return _wide_uint(op, x.dtype, x, axes, keepdim)
    if op in ("ReduceMax", "ReduceMin"):
        return _reduce_extreme(x, axes, keepdim, op == "ReduceMax")
    if op == "ReduceL2":
        return torch.linalg.vector_norm(x, 2, dim=axes, keepdim=keepdim)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return (torch.sum if op == "ReduceSum" else torch.mean)(x, dim=axes, keepdim=keepdim)
    total = torch.sum(x, dim=axes, keepdim=keepdim, dtype=torch.int64)
    if op == "ReduceMean":
        count = math.prod(x.shape[a] for a in axes)
        total = torch.div(total.to(x.dtype).to(torch.int64), count, rounding_mode="trunc")
    return total.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Converters: pooling
# --------------------------------------------------------------------------------------------


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
    ctx: _Ctx, y: Any, pads: list[int], kernel: list[int], strides: list[int], dilations: list[int]
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
    ctx: _Ctx, pads: list[int], kernel: list[int], strides: list[int], dilations: list[int]
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


def _pool_geometry(ctx: _Ctx) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = ctx.attr("kernel_shape")
    if kernel is None:
        raise ctx.fail("the kernel_shape attribute is missing")
    kernel = list(kernel)
    if len(kernel) not in (1, 2, 3):
        raise ctx.fail(f"{len(kernel)}-D pooling is not supported")
    strides, dilations = _spatial_attrs(ctx, len(kernel))
    pads = _resolve_pads(ctx, kernel, strides, dilations)
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


@_converter("MaxPool")
def _max_pool(ctx: _Ctx) -> Value:
    if ctx.output_used(1):
        raise ctx.fail("the Indices output is not supported")
    if int(ctx.attr("storage_order", 0)) != 0:
        raise ctx.fail("storage_order=1 is not supported")
    kernel, strides, dilations, pads, ceil_mode = _pool_geometry(ctx)
    n = len(kernel)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    x = ctx.tensor(0)
    if _torch_can_pad(pads, kernel, dilations):
        return ctx.call(fn, x, kernel, strides, pads[:n], dilations, ceil_mode)
    x = ctx.call(F.pad, x, _torch_pad(pads), value=-math.inf)
    y = ctx.call(fn, x, kernel, strides, 0, dilations, ceil_mode)
    return _pool_trim(ctx, y, pads, kernel, strides, dilations) if ceil_mode else y


@_converter("AveragePool")
def _avg_pool(ctx: _Ctx) -> Value:
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
        y = ctx.call(fn, ctx.call(F.pad, x, _torch_pad(pads)), kernel, strides, 0, ceil_mode, True)
    else:
        y = ctx.call(_avg_pool_exclude_pad, x, _torch_pad(pads), kernel, strides, ceil_mode)
    return _pool_trim(ctx, y, pads, kernel, strides, dilations) if ceil_mode else y


@_converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx: _Ctx) -> Value:
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


# --------------------------------------------------------------------------------------------
# Converters: shapes and data movement
# --------------------------------------------------------------------------------------------


@_converter("Shape")
def _shape(ctx: _Ctx) -> Value:
    start, end = int(ctx.attr("start", 0)), ctx.attr("end")
    v = ctx.value(0)
    if isinstance(v, _Sym):
        dims: list[Any] = [] if v.scalar else [len(v.items)]
        return torch.tensor(dims[start:end], dtype=torch.int64)
    dims = ctx.dims_of(0)
    if dims is None:
        logger.debug(
            "Shape %s: rank of %r unknown, computing the shape at run time",
            ctx.name,
            ctx.node.input[0],
        )
        return ctx.call(_shape_tensor, v, start, end)
    return _make_sym(dims[start:end])


@_converter("Size")
def _size(ctx: _Ctx) -> Value:
    v = ctx.tensor(0)
    if isinstance(v, torch.Tensor):
        return torch.tensor(v.numel())
    return _Sym([ctx.method("numel", v)], scalar=True)  # a Python int at run time


@_converter("Constant")
def _constant(ctx: _Ctx) -> Value:
    a = ctx.attrs
    if "value" in a:
        return _tensor_from_proto(a["value"])
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


@_converter("ConstantOfShape")
def _constant_of_shape(ctx: _Ctx) -> Value:
    proto = ctx.attr("value")
    fill = _tensor_from_proto(proto) if proto is not None else torch.zeros(1)
    value, dtype = fill.reshape(-1)[0].item(), fill.dtype
    shape = ctx.value(0)
    items = _sym_items(shape)
    if items is not None:
        return ctx.call(torch.full, items, value, dtype=dtype)
    return ctx.call(_full_dynamic, ctx.materialize(shape), value, dtype)


@_converter("Range")
def _range(ctx: _Ctx) -> Value:
    args = []
    for i in range(3):
        v = ctx.value(i)
        if isinstance(v, _Sym):
            args.append(v.items[0])
        elif isinstance(v, torch.Tensor):
            args.append(v.item())
        else:
            args.append(v)
    dtype = ctx.dtype(0) or ctx.dtype(1)
    if any(isinstance(a, fx.Node) for a in args):  # bounds computed at run time
        return ctx.call(_range_dynamic, *args, dtype)
    return ctx.call(torch.arange, *args, dtype=dtype)


def _reshape_dims(ctx: _Ctx, items: list[Any], allowzero: bool) -> list[Any] | None:
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


@_converter("Reshape")
def _reshape(ctx: _Ctx) -> Value:
    data, shape = ctx.value(0), ctx.value(1)
    allowzero = bool(ctx.attr("allowzero", 0))
    items = _sym_items(shape)
    if isinstance(data, _Sym) and items is not None and all(isinstance(d, int) for d in items):
        if items in ([-1], [len(data.items)]):
            return _Sym(data.items, False, data.dtype)
        if items == [] and len(data.items) == 1:
            return _Sym(data.items, True, data.dtype)
    x = ctx.materialize(data)
    if items is not None:
        dims = _reshape_dims(ctx, items, allowzero)
        if dims is not None:
            return ctx.method("reshape", x, *dims) if dims else ctx.method("reshape", x, ())
    return ctx.call(_reshape_dynamic, x, ctx.materialize(shape), int(allowzero))


@_converter("Flatten")
def _flatten(ctx: _Ctx) -> Value:
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


@_converter("Transpose")
def _transpose(ctx: _Ctx) -> Value:
    perm = ctx.attr("perm")
    if perm is None:
        rank = ctx.rank(0)
        if rank is None:
            raise ctx.fail("perm is absent and the input rank is unknown")
        perm = list(reversed(range(rank)))
    v = ctx.value(0)
    if isinstance(v, _Sym) and len(perm) <= 1:
        return v
    return ctx.method("permute", ctx.materialize(v), *perm)


@_converter("Squeeze")
def _squeeze(ctx: _Ctx) -> Value:
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(_squeeze_dynamic, ctx.tensor(0), ctx.tensor(1))
    if axes is None and ctx.has(1):
        axes = ctx.const_ints(1, "axes")
    v = ctx.value(0)
    if isinstance(v, _Sym) and not v.scalar and len(v.items) == 1 and axes in (None, [0], [-1]):
        return _Sym(v.items, True, v.dtype)
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


@_converter("Unsqueeze")
def _unsqueeze(ctx: _Ctx) -> Value:
    axes = ctx.attr("axes")
    if axes is None and isinstance(ctx.value(1), fx.Node):  # axes known only at run time
        return ctx.call(_unsqueeze_dynamic, ctx.tensor(0), ctx.tensor(1))
    if axes is None:
        axes = ctx.const_ints(1, "axes")
    if axes is None:
        raise ctx.fail("the axes are missing")
    v = ctx.value(0)
    if isinstance(v, _Sym) and v.scalar and axes in ([0], [-1]):
        return _Sym(v.items, False, v.dtype)
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


@_converter("Concat")
def _concat(ctx: _Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    values = [ctx.value(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    if any(isinstance(v, _Sym) for v in values) and axis in (0, -1):
        parts = [_sym_items(v) for v in values]
        if all(
            p is not None and not (isinstance(v, _Sym) and v.scalar)
            for p, v in zip(parts, values, strict=True)
        ):
            return _make_sym([item for p in parts for item in p])
    return ctx.call(torch.cat, [ctx.materialize(v) for v in values], axis)


@_converter("Split")
def _split(ctx: _Ctx) -> list[Value]:
    axis = int(ctx.attr("axis", 0))
    outputs = len(ctx.node.output)
    split = ctx.attr("split")
    if split is None and isinstance(ctx.value(1), fx.Node):  # sizes known only at run time
        parts = ctx.call(_split_dynamic, ctx.tensor(0), ctx.tensor(1), axis)
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


@_converter("Slice")
def _slice(ctx: _Ctx) -> Value:
    if ctx.opset < 10 and "starts" in ctx.attrs:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = _sym_items(ctx.value(1)), _sym_items(ctx.value(2))
        if any(isinstance(ctx.value(i), fx.Node) for i in (3, 4)):  # axes/steps at run time
            runtime = [ctx.tensor(i) if ctx.has(i) else None for i in (1, 2, 3, 4)]
            return ctx.call(_slice_onnx, ctx.tensor(0), *runtime)
        axes, steps = ctx.const_ints(3, "axes"), ctx.const_ints(4, "steps")
    data = ctx.value(0)
    if starts is None or ends is None:  # bounds computed at run time by real tensor ops
        return ctx.call(
            _slice_onnx, ctx.materialize(data), ctx.tensor(1), ctx.tensor(2), axes, steps
        )
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)

    if (
        isinstance(data, _Sym)
        and axes in ([0], [-1])
        and all(isinstance(v, int) for v in starts + ends)
    ):
        return _make_sym(data.items[slice(starts[0], ends[0], steps[0])], False, data.dtype)

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
                bounds = [_make_sym_or_int(ctx, v) for v in (s, e)]
                x = ctx.call(_slice_onnx, x, [bounds[0]], [bounds[1]], [a], [st])
                continue
            begin, stop = _onnx_slice_range(s, e, st, size)
            picked = list(range(begin, stop, st))
            x = ctx.call(_gather_any, x, a, torch.tensor(picked, dtype=torch.int64))
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


def _make_sym_or_int(ctx: _Ctx, v: int | fx.Node) -> Any:
    """A slice bound for _slice_onnx: an int, or a size node as a 0-D tensor at run time."""
    return v if isinstance(v, int) else ctx.call(_dim_to_tensor, v)


@_converter("Gather")
def _gather_op(ctx: _Ctx) -> Value:
    axis = int(ctx.attr("axis", 0))
    data, idx = ctx.value(0), ctx.value(1)
    if isinstance(data, _Sym) and isinstance(idx, torch.Tensor) and idx.dim() <= 1:
        n = len(data.items)
        picked = [data.items[int(i) % n] for i in idx.reshape(-1).tolist()]
        return _make_sym(picked, idx.dim() == 0, data.dtype)
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
    return ctx.call(_gather, x, ctx.materialize(idx), axis)


def _index_select_fn(ctx: _Ctx) -> Callable[..., torch.Tensor]:
    # torch.index_select stays what passes match; uint16/32/64 need the bitcast variant
    return _gather_any if ctx.dtype(0) in _WIDE_UINT else torch.index_select


@_converter("Expand")
def _expand(ctx: _Ctx) -> Value:
    x = ctx.tensor(0)
    items = _sym_items(ctx.value(1))
    rank = ctx.rank(0)
    if items is None or rank is None:
        return ctx.call(_expand_dynamic, x, ctx.tensor(1))
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


@_converter("Tile")
def _tile(ctx: _Ctx) -> Value:
    repeats = _sym_items(ctx.value(1))
    if repeats is None:  # computed at run time by tensor ops
        return ctx.call(_tile_dynamic, ctx.tensor(0), ctx.tensor(1))
    if not repeats:  # a 0-D input has no dims to repeat
        return ctx.tensor(0)
    return ctx.method("repeat", ctx.tensor(0), *repeats)


@_converter("Pad")
def _pad(ctx: _Ctx) -> Value:
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11 or "pads" in ctx.attrs:
        pads, value = list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
        axes = None
    elif any(isinstance(ctx.value(i), fx.Node | _Sym) for i in (1, 2, 3)):
        # pads, the constant value or the axes known only at run time
        return _pad_at_run_time(ctx, mode)
    else:
        pads = ctx.const_ints(1, "pads")
        value = _scalar_of(ctx, 2, "constant_value") if ctx.has(2) else 0
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
        return ctx.call(F.pad, x, _torch_pad(trailing), value=value or 0)
    if ctx.dtype(0) in _WIDE_UINT and torch_mode != "circular":
        raise _refuse_dtype(ctx, ctx.dtype(0))
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
        return ctx.call(F.pad, x, _torch_pad(trailing), mode=torch_mode)
    for axis in range(first, n):  # otherwise one axis at a time (the modes are separable)
        if pads[axis] or pads[axis + n]:
            x = ctx.call(_pad_axis, x, axis, pads[axis], pads[axis + n], torch_mode)
    return x


_TORCH_PAD_MODE = {
    "constant": "constant",
    "reflect": "reflect",
    "edge": "replicate",
    "wrap": "circular",
}


def _pad_at_run_time(ctx: _Ctx, mode: str) -> Value:
    torch_mode = _TORCH_PAD_MODE.get(mode)
    if torch_mode is None:
        raise ctx.fail(f"pad mode {mode!r} is not supported")
    if ctx.dtype(0) in _WIDE_UINT and torch_mode not in ("constant", "circular"):
        raise _refuse_dtype(ctx, ctx.dtype(0))
    optional = [ctx.tensor(i) if ctx.has(i) else None for i in (2, 3)]
    return ctx.call(_pad_dynamic, ctx.tensor(0), ctx.tensor(1), torch_mode, *optional)


def _depth_to_space_dcr(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX DepthToSpace, mode DCR (depth-column-row: the block index varies slowest)."""
    n, c, h, w = x.shape
    x = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // (block * block), h * block, w * block)


def _space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX SpaceToDepth, mode DCR (the default; output channels ordered (row-in-block,
    column-in-block, channel); mode CRD, opset 28, is torch's pixel_unshuffle: (channel, row,
    column))."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * block * block, h // block, w // block)


@_converter("DepthToSpace")
def _depth_to_space(ctx: _Ctx) -> Value:
    block, mode = int(ctx.attr("blocksize")), ctx.attr("mode", "DCR")
    if mode == "CRD":
        return ctx.call(F.pixel_shuffle, ctx.tensor(0), block)
    if mode != "DCR":
        raise ctx.fail(f"DepthToSpace mode {mode!r} is not DCR or CRD")
    return ctx.call(_depth_to_space_dcr, ctx.tensor(0), block)


@_converter("SpaceToDepth")
def _space_to_depth_op(ctx: _Ctx) -> Value:
    block, mode = int(ctx.attr("blocksize")), ctx.attr("mode", "DCR")
    if mode == "CRD":
        return ctx.call(F.pixel_unshuffle, ctx.tensor(0), block)
    if mode != "DCR":
        raise ctx.fail(f"SpaceToDepth mode {mode!r} is not DCR or CRD")
    return ctx.call(_space_to_depth, ctx.tensor(0), block)


SUPPORTED_OPS: frozenset[str] = frozenset(_CONVERTERS)

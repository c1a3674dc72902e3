"""The ONNX frontend's runtime-shape helpers as ops the TorchScript exporter writes as ONNX ops.

An imported ONNX model computes some shapes at run time: ``Reshape`` / ``Expand`` /
``ConstantOfShape`` / ``Slice`` / ``Range`` whose shape, bounds or axes are tensors. The
importer evaluates them with helpers that read the values with ``tolist()`` or ``item()``, which
tracing freezes to the example's values. :func:`with_shape_ops` swaps each such helper for a
twin (a ``torch.autograd.Function`` with an ONNX ``symbolic``) that computes the same and
exports as the ONNX op itself, with the shape tensor kept as its input.

The backends import no frontend, so the frontend declares its helpers here:
``@exports_as("Reshape")`` above a function registers that very function object, and
:func:`with_shape_ops` looks the graph's ``call_function`` targets up in the registry by
identity, never by name. A pickled or deep-copied graph calls the same module-level functions,
so it is found alike; a user's function that happens to share a helper's name is not.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import onnx
import torch

from graphopt._util import close_matches


def _int64(g: Any, value: Any) -> Any:
    return g.op("Cast", value, to_i=onnx.TensorProto.INT64)


class _ReshapeOp(torch.autograd.Function):
    """ONNX ``Reshape(x, shape)`` with ``shape`` a runtime tensor (traced as the op itself)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: torch.Tensor, allowzero: int) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims).clone()

    @staticmethod
    def symbolic(g: Any, x: Any, shape: Any, allowzero: int) -> Any:
        if allowzero:
            return g.op("Reshape", x, _int64(g, shape), allowzero_i=1)
        return g.op("Reshape", x, _int64(g, shape))


class _ExpandOp(torch.autograd.Function):
    """ONNX ``Expand(x, shape)`` (bidirectional broadcast) with a runtime ``shape``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = tuple(int(d) for d in shape.tolist())
        return x.expand(torch.broadcast_shapes(x.shape, dims)).clone()

    @staticmethod
    def symbolic(g: Any, x: Any, shape: Any) -> Any:
        return g.op("Expand", x, _int64(g, shape))


class _ConstantOfShapeOp(torch.autograd.Function):
    """ONNX ``ConstantOfShape(shape)`` with a runtime ``shape``, filled with ``value``."""

    @staticmethod
    def forward(ctx: Any, shape: torch.Tensor, value: float, dtype: str) -> torch.Tensor:
        return torch.full([int(d) for d in shape.tolist()], value, dtype=getattr(torch, dtype))

    @staticmethod
    def symbolic(g: Any, shape: Any, value: float, dtype: str) -> Any:
        fill = torch.tensor([value], dtype=getattr(torch, dtype))
        return g.op("ConstantOfShape", _int64(g, shape), value_t=fill)


class _SliceOp(torch.autograd.Function):
    """ONNX ``Slice(x, starts, ends, axes, steps)`` with runtime ``starts`` / ``ends``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        axes: torch.Tensor,
        steps: torch.Tensor,
    ) -> torch.Tensor:
        y = x
        for s, e, a, st in zip(
            starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(), strict=True
        ):
            # Python's slice clamps as ONNX Slice does, negative steps included
            axis = int(a) % x.dim()
            picked = range(*slice(int(s), int(e), int(st)).indices(x.shape[axis]))
            y = torch.index_select(y, axis, torch.tensor(list(picked), dtype=torch.int64))
        return y

    @staticmethod
    def symbolic(g: Any, x: Any, starts: Any, ends: Any, axes: Any, steps: Any) -> Any:
        return g.op(
            "Slice", x, _int64(g, starts), _int64(g, ends), _int64(g, axes), _int64(g, steps)
        )


class _RangeOp(torch.autograd.Function):
    """ONNX ``Range(start, limit, delta)`` with bounds known only at run time (0-D tensors)."""

    @staticmethod
    def forward(
        ctx: Any, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    @staticmethod
    def symbolic(g: Any, start: Any, limit: Any, delta: Any) -> Any:
        return g.op("Range", start, limit, delta)


def _index_tensor(v: Any) -> torch.Tensor:
    """Slice arguments as a 1-D int64 tensor: a tensor, or a list of ints and 0-D tensors."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).to(torch.int64)
    return torch.cat([torch.as_tensor(d, dtype=torch.int64).reshape(1) for d in v])


def _has_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, list | tuple) and any(isinstance(d, torch.Tensor) for d in v)
    )


def _reshape_twin(original: Callable[..., Any], x: Any, shape: Any, allowzero: int = 0) -> Any:
    if not isinstance(shape, torch.Tensor):
        return original(x, shape, allowzero)
    return _ReshapeOp.apply(x, shape, int(allowzero))


def _expand_twin(original: Callable[..., Any], x: Any, shape: Any) -> Any:
    if not isinstance(shape, torch.Tensor):
        return original(x, shape)
    return _ExpandOp.apply(x, shape)


def _full_twin(original: Callable[..., Any], shape: Any, value: Any, dtype: torch.dtype) -> Any:
    if not isinstance(shape, torch.Tensor) or not isinstance(value, int | float | bool):
        return original(shape, value, dtype)
    return _ConstantOfShapeOp.apply(shape, value, str(dtype).removeprefix("torch."))


def _slice_twin(
    original: Callable[..., Any],
    x: Any,
    starts: Any,
    ends: Any,
    axes: Any = None,
    steps: Any = None,
) -> Any:
    if not any(_has_tensor(v) for v in (starts, ends, axes, steps)):
        return original(x, starts, ends, axes, steps)
    starts, ends = _index_tensor(starts), _index_tensor(ends)
    count = int(starts.shape[0])
    # ONNX's defaults: every axis from 0 in order, step 1
    axes = torch.arange(count) if axes is None else _index_tensor(axes)
    steps = torch.ones(count, dtype=torch.int64) if steps is None else _index_tensor(steps)
    return _SliceOp.apply(x, starts, ends, axes, steps)


def _range_twin(
    original: Callable[..., Any], start: Any, limit: Any, delta: Any, dtype: torch.dtype
) -> Any:
    if not any(isinstance(v, torch.Tensor) for v in (start, limit, delta)):
        return original(start, limit, delta, dtype)
    # ONNX Runtime's Range has float, double, int16/32/64 kernels: others go through one
    wide = torch.float32 if dtype.is_floating_point and dtype != torch.float64 else dtype
    wide = torch.int64 if not dtype.is_floating_point and dtype not in _RANGE_INTS else wide
    bounds = [torch.as_tensor(v).reshape(()).to(wide) for v in (start, limit, delta)]
    return _RangeOp.apply(*bounds).to(dtype)


_RANGE_INTS = (torch.int16, torch.int32, torch.int64)


class _QuantizeOp(torch.autograd.Function):
    """ONNX ``QuantizeLinear`` (opset 13: float32 x and scale, int8/uint8, per tensor or axis);
    ``forward`` is the helper registered as it."""

    @staticmethod
    def forward(ctx: Any, helper: Any, x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return helper(x, scale, zero_point, axis, 0, zero_point.dtype)

    @staticmethod
    def symbolic(g: Any, helper: Any, x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return g.op("QuantizeLinear", x, scale, zero_point, axis_i=axis)


class _DequantizeOp(torch.autograd.Function):
    """ONNX ``DequantizeLinear`` (opset 13: int8/uint8/int32 x, float32 scale, per tensor or
    axis); ``forward`` is the helper registered as it."""

    @staticmethod
    def forward(ctx: Any, helper: Any, x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return helper(x, scale, zero_point, axis, 0, torch.float32)

    @staticmethod
    def symbolic(g: Any, helper: Any, x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return g.op("DequantizeLinear", x, scale, zero_point, axis_i=axis)


def _qdq_operands(x: Any, scale: Any, zero_point: Any, block_size: int, qtype: Any) -> Any:
    """(scale, zero_point) as opset 13's (De)QuantizeLinear takes them (scale float32 0-D or
    1-D, a zero point of the integer type), or None where that op cannot express the call."""
    if block_size or not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        return None
    if scale.dim() > 1 or qtype not in (torch.int8, torch.uint8, torch.int32):
        return None
    if zero_point is None:
        zero_point = torch.zeros(scale.shape, dtype=qtype)
    if not isinstance(zero_point, torch.Tensor) or zero_point.dtype != qtype:
        return None
    if zero_point.shape != scale.shape or (qtype == torch.int32 and bool(zero_point.any())):
        return None
    return scale, zero_point


def _quantize_twin(
    original: Callable[..., Any],
    x: Any,
    scale: Any,
    zero_point: Any,
    axis: int,
    block_size: int,
    dtype: torch.dtype,
) -> Any:
    ops = None if dtype == torch.int32 else _qdq_operands(x, scale, zero_point, block_size, dtype)
    if ops is None or x.dtype != torch.float32:
        return original(x, scale, zero_point, axis, block_size, dtype)
    return _QuantizeOp.apply(original, x, *ops, axis)


def _dequantize_twin(
    original: Callable[..., Any],
    x: Any,
    scale: Any,
    zero_point: Any,
    axis: int,
    block_size: int,
    dtype: torch.dtype,
) -> Any:
    ops = _qdq_operands(x, scale, zero_point, block_size, x.dtype)
    if ops is None or dtype != torch.float32:
        return original(x, scale, zero_point, axis, block_size, dtype)
    return _DequantizeOp.apply(original, x, *ops, axis)


# the ONNX op -> the twin that exports a helper as it; a helper registered as the op takes the
# arguments its twin passes on: Reshape (x, shape, allowzero=0), Expand (x, shape),
# ConstantOfShape (shape, value, dtype), Slice (x, starts, ends, axes=None, steps=None),
# Range (start, limit, delta, dtype), QuantizeLinear / DequantizeLinear (x, scale, zero_point,
# axis, block_size, dtype)
_TWINS: dict[str, Callable[..., Any]] = {
    "Reshape": _reshape_twin,
    "Expand": _expand_twin,
    "ConstantOfShape": _full_twin,
    "Slice": _slice_twin,
    "Range": _range_twin,
    "QuantizeLinear": _quantize_twin,
    "DequantizeLinear": _dequantize_twin,
}

# a registered helper (the function object itself) -> the ONNX op it exports as
_EXPORTED_AS: dict[Callable[..., Any], str] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def exports_as(op: str) -> Callable[[_F], _F]:
    """Register the decorated runtime-shape helper as exporting as the ONNX op ``op`` (one of
    ``Reshape``, ``Expand``, ``ConstantOfShape``, ``Slice``, ``Range`` when its shape, bounds or
    axes are tensors; ``QuantizeLinear``, ``DequantizeLinear`` where opset 13's op says it).
    The function is returned unchanged: a graph's ``call_function`` target is that very object,
    which is how :func:`with_shape_ops` finds it.

    Example::

        @exports_as("Reshape")
        def reshape_dynamic(x, shape, allowzero=0): ...
    """
    if op not in _TWINS:
        raise ValueError(
            f"no exportable twin for the ONNX op {op!r}."
            + close_matches(op, _TWINS)
            + f" Known: {', '.join(_TWINS)}."
        )

    def register(fn: _F) -> _F:
        if _EXPORTED_AS.setdefault(fn, op) != op:
            raise ValueError(f"{fn.__qualname__} already exports as {_EXPORTED_AS[fn]}, not {op}")
        return fn

    return register


def exported_as(fn: Any) -> str | None:
    """The ONNX op a registered runtime-shape helper exports as, else None."""
    try:
        return _EXPORTED_AS.get(fn)
    except TypeError:  # an unhashable callable is no registered helper
        return None


def _twin_of(target: Any) -> Callable[..., torch.Tensor] | None:
    """The exportable twin of a call_function target that is a registered runtime-shape
    helper, else None."""
    op = exported_as(target)
    if op is None:
        return None
    twin = _TWINS[op]
    return functools.update_wrapper(functools.partial(twin, target), twin)


def with_shape_ops(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, or a GraphModule over a copy of its graph whose runtime-shape helpers are
    replaced by their exportable twins (parameters shared, nothing of ``module`` changes)."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    twins = {
        node.target: twin
        for node in module.graph.nodes
        if node.op == "call_function" and (twin := _twin_of(node.target)) is not None
    }
    if not twins:
        return module
    graph = copy.deepcopy(module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in twins:
            node.target = twins[node.target]
    twin = torch.fx.GraphModule(module, graph)
    twin.train(module.training)
    return twin

"""Element-wise converters: unary and binary arithmetic, comparisons and logic, variadic
Sum/Max/Min/Mean, activations, Clip, Where, Cast, Identity and Dropout.

Dtypes follow the ONNX spec, not torch's promotion: ``Pow`` has the base's type, integer ``Div``
truncates; uint16/32/64 are computed through :func:`~graphopt.frontends.onnx.runtime.wide_uint`.
Arithmetic on shape values (:class:`~graphopt.frontends.onnx.values.Sym`) stays symbolic.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.backends.arrays import FLOAT8
from graphopt.errors import CaptureError
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import refuse_dtype, scalar_of, set_param, wide_uint_dtype
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import wide_uint
from graphopt.frontends.onnx.values import (
    ONNX_TO_TORCH,
    Sym,
    Value,
    is_int_dtype,
    make_sym,
    sym_items,
)

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


@converter(*_UNARY)
def _unary(ctx: Ctx) -> Value:
    wide = wide_uint_dtype(ctx)
    if wide is not None:
        if ctx.op == "Abs":
            return ctx.tensor(0)  # |x| = x for unsigned x
        if ctx.op not in ("Neg", "Sign"):
            raise refuse_dtype(ctx, wide)
        return ctx.call(wide_uint, ctx.op, wide, ctx.tensor(0))
    return ctx.call(_UNARY[ctx.op], ctx.tensor(0))


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


def _sym_binary(ctx: Ctx) -> Value | None:
    """Element-wise arithmetic on shape values, kept at Python level; None if not applicable."""
    a, b = ctx.value(0), ctx.value(1)
    if ctx.op not in _SYM_BINARY or not (isinstance(a, Sym) or isinstance(b, Sym)):
        return None
    ia, ib = sym_items(a), sym_items(b)
    if ia is None or ib is None or not (is_int_dtype(ctx.dtype(0)) and is_int_dtype(ctx.dtype(1))):
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
        and (not isinstance(a, Sym) or a.scalar)
        and (not isinstance(b, Sym) or b.scalar)
    )
    dtype = torch.bool if ctx.op == "Equal" else (ctx.dtype(0) or torch.int64)
    return make_sym(out, scalar, dtype)


@converter(*_BINARY)
def _binary(ctx: Ctx) -> Value:
    sym = _sym_binary(ctx)
    if sym is not None:
        return sym
    a, b = ctx.tensor(0), ctx.tensor(1)
    if ctx.op == "Add":
        fused = _fuse_linear_bias(ctx, a, b)
        if fused is not None:
            return fused
    wide = wide_uint_dtype(ctx)
    if wide is not None:
        if ctx.op in ("And", "Or", "Xor"):
            raise refuse_dtype(ctx, wide)
        y = ctx.call(wide_uint, ctx.op, wide, a, b)
        return _pow_dtype(ctx, y) if ctx.op == "Pow" else y
    # A 0-D constant next to a runtime tensor becomes a Python scalar (``x * 0.125``): same
    # result (ONNX requires equal dtypes), and easier for passes to match than a buffer.
    if isinstance(a, fx.Node) and _is_scalar_const(b):
        b = b.item()
    elif isinstance(b, fx.Node) and _is_scalar_const(a) and ctx.op in ("Add", "Mul"):
        a, b = b, a.item()  # torch.add/mul want the tensor first; both are commutative
    if ctx.op == "Div" and (is_int_dtype(ctx.dtype(0)) or is_int_dtype(ctx.dtype(1))):
        return ctx.call(torch.div, a, b, rounding_mode="trunc")
    y = ctx.call(_BINARY[ctx.op], a, b)
    return _pow_dtype(ctx, y) if ctx.op == "Pow" else y


def _pow_dtype(ctx: Ctx, y: Any) -> Any:
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


def _fuse_linear_bias(ctx: Ctx, a: Any, b: Any) -> fx.Node | None:
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
                set_param(mod, "bias", bias)
                del ctx.imp.bias_fusable[node]
                return node
    return None


@converter("Sum", "Max", "Min", "Mean")
def _variadic(ctx: Ctx) -> Value:
    fn = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[ctx.op]
    inputs = [ctx.tensor(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    wide = wide_uint_dtype(ctx)
    if wide is not None and ctx.op == "Mean":
        raise refuse_dtype(ctx, wide)
    y = inputs[0]
    for other in inputs[1:]:
        if wide is not None:
            y = ctx.call(wide_uint, ctx.op, wide, y, other)
        else:
            y = ctx.call(fn, y, other)
    if ctx.op == "Mean" and len(inputs) > 1:
        y = ctx.call(torch.div, y, float(len(inputs)))
    return y


@converter("LeakyRelu")
def _leaky_relu(ctx: Ctx) -> Value:
    return ctx.call(F.leaky_relu, ctx.tensor(0), float(ctx.attr("alpha", 0.01)))


@converter("Elu")
def _elu(ctx: Ctx) -> Value:
    return ctx.call(F.elu, ctx.tensor(0), float(ctx.attr("alpha", 1.0)))


@converter("PRelu")
def _prelu(ctx: Ctx) -> Value:
    x, slope = ctx.tensor(0), ctx.tensor(1)
    return ctx.call(torch.where, ctx.call(torch.lt, x, 0), ctx.call(torch.mul, x, slope), x)


@converter("HardSigmoid")
def _hard_sigmoid(ctx: Ctx) -> Value:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    x = ctx.tensor(0)
    if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6:
        return ctx.call(F.hardsigmoid, x)
    return ctx.call(torch.clamp, ctx.call(torch.add, ctx.call(torch.mul, x, alpha), beta), 0.0, 1.0)


@converter("Gelu")
def _gelu(ctx: Ctx) -> Value:
    approximate = ctx.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.fail(f"approximate={approximate!r} is not a valid value")
    return ctx.call(F.gelu, ctx.tensor(0), approximate=approximate)


@converter("Clip")
def _clip(ctx: Ctx) -> Value:
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
            wide = wide_uint_dtype(ctx)
            if wide is not None:
                return ctx.call(wide_uint, "Clip", wide, x, *bounds)
            return ctx.call(torch.clamp, x, *bounds)
        lo, hi = scalar_of(ctx, 1, "min"), scalar_of(ctx, 2, "max")
    if lo is None and hi is None:
        return x
    wide = wide_uint_dtype(ctx)
    if wide is not None:  # bounds as tensors of x's dtype, so that wide_uint widens them too
        lo, hi = (None if v is None else torch.tensor(v, dtype=wide) for v in (lo, hi))
        return ctx.call(wide_uint, "Clip", wide, x, lo, hi)
    return ctx.call(torch.clamp, x, lo, hi)


@converter("Where")
def _where(ctx: Ctx) -> Value:
    cond, a, b = ctx.value(0), ctx.value(1), ctx.value(2)
    if isinstance(a, Sym) or isinstance(b, Sym):
        ic, ia, ib = sym_items(cond), sym_items(a), sym_items(b)
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
                    isinstance(v, Sym) and v.scalar or isinstance(v, torch.Tensor) and v.dim() == 0
                    for v in (cond, a, b)
                )
                return make_sym(items, scalar)
    return ctx.call(torch.where, ctx.tensor(0), ctx.tensor(1), ctx.tensor(2))


@converter("Cast", "CastLike")
def _cast(ctx: Ctx) -> Value:
    to = ONNX_TO_TORCH.get(int(ctx.attr("to", 0)))
    dtype = to if ctx.op == "Cast" else ctx.dtype(1)
    if dtype is None:
        target = (
            onnx.TensorProto.DataType.Name(int(ctx.attr("to", 0)))
            if ctx.op == "Cast"
            else f"of input {ctx.node.input[1]!r}"
        )
        # not a refusal that leaves the node opaque: no torch tensor could hold its output
        raise CaptureError(
            str(
                ctx.fail(
                    f"the target type {target} is unknown or has no torch dtype",
                    "Cast to a type torch has (e.g. int8, float16, float32) instead.",
                )
            )
        )
    v = ctx.value(0)
    if isinstance(v, Sym) and is_int_dtype(dtype):
        return Sym(v.items, v.scalar, dtype)
    x = ctx.materialize(v)
    if dtype in FLOAT8 and ctx.dtype(0) not in FLOAT8:
        # torch's cast saturates to E4M3FN and overflows (to inf or NaN) for the other float8
        # types; ONNX's saturate=1 (the default) clamps to the largest finite value.
        saturate = bool(ctx.attr("saturate", 1))
        if dtype == torch.float8_e4m3fn and not saturate:
            # torch's cast saturates; ONNX's saturate=0 gives NaN where the value rounds past
            # 448 (E4M3FN's largest finite value; 464 still rounds to it, ties to even) or is
            # infinite -- E4M3FN has no infinity
            too_large = ctx.call(torch.gt, ctx.call(torch.abs, x), 464)
            x = ctx.call(torch.where, too_large, math.nan, x)
        if saturate and dtype != torch.float8_e4m3fn:
            limit = float(torch.finfo(dtype).max)
            x = ctx.call(torch.clamp, x, -limit, limit)
    return ctx.method("to", x, dtype)


@converter("Identity")
def _identity(ctx: Ctx) -> Value:
    return ctx.value(0)


@converter("Dropout")
def _dropout(ctx: Ctx) -> Value | list[Value]:
    if ctx.value(2) is not None:
        training = ctx.const(2)
        if training is None or bool(training.item()):
            raise ctx.fail("training_mode is not a constant false", "Export in eval mode.")
    x = ctx.value(0)
    if len(ctx.node.output) > 1 and ctx.output_used(1):
        return [x, ctx.call(torch.ones_like, ctx.materialize(x), dtype=torch.bool)]
    return x

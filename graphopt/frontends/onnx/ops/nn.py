"""Converters whose nodes become torch.nn modules (``call_module``), so that graph passes
written for traced PyTorch models apply to imported ONNX models too: Conv, ConvTranspose, Gemm,
and MatMul by a constant (an ``nn.Linear``; an ``Add`` of a 1-D constant that is its only
consumer becomes the Linear's bias, see ``elementwise``)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import resolve_pads, set_param, spatial_attrs
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import torch_pad
from graphopt.frontends.onnx.values import Value


@converter("Conv")
def _conv(ctx: Ctx) -> Value:
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
    strides, dilations = spatial_attrs(ctx, n)
    group = int(ctx.attr("group", 1))
    pads = resolve_pads(ctx, kernel, strides, dilations)
    x = ctx.tensor(0)
    if pads[:n] != pads[n:]:
        x = ctx.call(F.pad, x, torch_pad(pads))
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
        set_param(mod, "weight", w)
        if b is not None:
            set_param(mod, "bias", b)
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


@converter("ConvTranspose")
def _conv_transpose(ctx: Ctx) -> Value:
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
    strides, dilations = spatial_attrs(ctx, n)
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
    set_param(mod, "weight", w)
    if b is not None:
        set_param(mod, "bias", b)
    y = ctx.module(mod, ctx.tensor(0))
    if symmetric:
        return y
    # Asymmetric pads crop the full output: slice them off explicitly.
    index: list[Any] = [Ellipsis]
    for i in range(n):
        begin, end = pads[i], pads[i + n]
        index.append(slice(begin, -end if end else None))
    return ctx.call(operator.getitem, y, tuple(index))


def _linear(ctx: Ctx, x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    mod = nn.utils.skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype
    )
    set_param(mod, "weight", weight)
    set_param(mod, "bias", bias)
    return ctx.module(mod, x), mod


@converter("Gemm")
def _gemm(ctx: Ctx) -> Value:
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


@converter("MatMul")
def _matmul(ctx: Ctx) -> Value:
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

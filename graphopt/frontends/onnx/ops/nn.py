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
    kernel = ctx.attr("kernel_shape")
    if kernel is None:
        shape = list(w.shape) if w is not None else ctx.shape(1)
        if shape is None or not all(isinstance(d, int) for d in shape[2:]):
            raise ctx.fail("kernel_shape is absent and the weight's shape is unknown")
        kernel = shape[2:]
    kernel = list(kernel)
    n = len(kernel)
    if n not in (1, 2, 3):
        raise ctx.fail(f"{n}-D transposed convolution is not supported")
    strides, dilations = spatial_attrs(ctx, n)
    group = int(ctx.attr("group", 1))
    output_padding = list(ctx.attr("output_padding", [0] * n))
    pads = _transpose_pads(ctx, kernel, strides, dilations, output_padding)
    b = ctx.value(2)
    # torch's module takes output_padding below the stride or the dilation, and no negative pads
    torch_can = min(pads) >= 0 and all(
        p < max(s, d) for p, s, d in zip(output_padding, strides, dilations, strict=True)
    )
    if w is not None and (b is None or isinstance(b, torch.Tensor)) and torch_can:
        return _conv_transpose_module(ctx, w, b, pads, strides, dilations, output_padding, group)
    # the general form: the full output, then ONNX's pads cropped (negative pads and the
    # output_padding beyond it grow the output with zeros), then the bias
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = ctx.call(fn, ctx.tensor(0), ctx.tensor(1), None, strides, 0, 0, group, dilations)
    crop = pads[:n] + [e - p for e, p in zip(pads[n:], output_padding, strict=True)]
    if min(crop) < 0:
        y = ctx.call(F.pad, y, torch_pad([max(0, -c) for c in crop]))
    if max(crop) > 0:
        y = _crop(ctx, y, [max(0, c) for c in crop])
    if b is None:
        return y
    bias = ctx.call(torch.reshape, ctx.tensor(2), (-1, *[1] * n))
    return ctx.call(torch.add, y, bias)


def _transpose_pads(
    ctx: Ctx,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    output_padding: list[int],
) -> list[int]:
    """ConvTranspose's [begins..., ends...] pads: explicit, or (output_shape given, or auto_pad
    SAME_*: the output is input * stride) total = full output - wanted output, split as ONNX's
    spec says (SAME_UPPER: the smaller half first)."""
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    out_shape = ctx.attr("output_shape")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto_pad!r} is not a valid value")
    if out_shape is None and auto_pad in ("NOTSET", "VALID"):
        pads = list(ctx.attr("pads", [0] * 2 * n)) if auto_pad == "NOTSET" else [0] * 2 * n
        if len(pads) != 2 * n:
            raise ctx.fail(f"pads {pads} do not have 2 * {n} entries")
        return pads
    what = "output_shape" if out_shape is not None else f"auto_pad={auto_pad}"
    begins, ends = [], []
    for i in range(n):
        size = ctx.static_dim(0, 2 + i)
        if size is None:
            raise ctx.fail(
                f"{what} needs the static size of spatial dim {i}, which is not known",
                "Export the model with explicit pads or static spatial sizes.",
            )
        full = strides[i] * (size - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - (list(out_shape)[-n:][i] if out_shape is not None else size * strides[i])
        # ONNX's spec, its reference implementation and ONNX Runtime split these differently
        if (auto_pad == "NOTSET" and total > 0) or (auto_pad != "NOTSET" and total < 0):
            raise ctx.fail(
                f"{what} gives a total padding of {total} on spatial dim {i}, which ONNX's "
                "spec, its reference implementation and ONNX Runtime place differently",
                "Export the model with explicit pads and output_padding instead.",
            )
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin = 0 if auto_pad == "NOTSET" else begin  # total <= 0: the output grows at the end
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def _crop(ctx: Ctx, y: Any, crop: list[int]) -> Any:
    """``y`` without ``crop`` = [begins..., ends...] elements on its last n dims."""
    n = len(crop) // 2
    index: list[Any] = [Ellipsis]
    for i in range(n):
        begin, end = crop[i], crop[i + n]
        index.append(slice(begin, -end if end else None))
    return ctx.call(operator.getitem, y, tuple(index))


def _conv_transpose_module(
    ctx: Ctx,
    w: torch.Tensor,
    b: torch.Tensor | None,
    pads: list[int],
    strides: list[int],
    dilations: list[int],
    output_padding: list[int],
    group: int,
) -> Value:
    n = len(strides)
    symmetric = pads[:n] == pads[n:]
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[n - 1]
    mod = nn.utils.skip_init(
        cls,
        w.shape[0],
        w.shape[1] * group,
        tuple(w.shape[2:]),
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
    # asymmetric pads crop the full output: slice them off explicitly
    return y if symmetric else _crop(ctx, y, pads)


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

"""What several kinds of converters share: conv/pool geometry, parameters, dtype refusals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from graphopt.backends.arrays import FLOAT8
from graphopt.errors import CaptureError
from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.values import WIDE_UINT


def resolve_pads(
    ctx: Ctx, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
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


def spatial_attrs(ctx: Ctx, n: int) -> tuple[list[int], list[int]]:
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    return strides, dilations


def set_param(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        setattr(mod, name, None)
    else:
        setattr(mod, name, nn.Parameter(value.detach().clone().contiguous()))


def wide_uint_dtype(ctx: Ctx) -> torch.dtype | None:
    """The uint16/32/64 dtype of the node's inputs, if any (they need wide_uint)."""
    for i in range(len(ctx.node.input)):
        dtype = ctx.dtype(i)
        if dtype in WIDE_UINT:
            return dtype
    return None


def refuse_dtype(ctx: Ctx, dtype: torch.dtype) -> CaptureError:
    kind = "float8" if dtype in FLOAT8 else "unsigned 16/32/64-bit"
    return ctx.fail(
        f"an input has dtype {str(dtype).replace('torch.', '')}, and torch has no {ctx.op} "
        f"kernel for {kind} tensors, which graphopt's importer computes only for some ops",
        "Cast the tensor to a supported dtype (e.g. int64 or float32) in the model before this "
        "node, or report the op with the model.",
    )


def scalar_of(ctx: Ctx, i: int, what: str) -> float | int | None:
    v = ctx.value(i)
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise ctx.fail(f"input {what!r} must be a constant scalar")
    return v.item()

"""Normalization converters: BatchNormalization (-> :class:`OnnxBatchNorm2d` and 1d/3d),
InstanceNormalization, GroupNormalization (opset 18: per-group scale; 21: per-channel),
RMSNormalization, LRN,
LayerNormalization (with its Mean and InvStdDev outputs), Softmax and LogSoftmax."""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import set_param
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.runtime import layer_norm_manual, layer_norm_stats
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Value

logger = logging.getLogger(__name__)


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


@converter("BatchNormalization")
def _batch_norm(ctx: Ctx) -> Value:
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
        set_param(mod, "weight", scale)
        set_param(mod, "bias", bias)
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


@converter("Softmax", "LogSoftmax")
def _softmax(ctx: Ctx) -> Value:
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


@converter("LayerNormalization")
def _layer_norm(ctx: Ctx) -> Value | list[Value]:
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    y = _layer_norm_y(ctx, axis, eps)
    if not any(ctx.output_used(j) for j in (1, 2)):
        return y
    # Mean and InvStdDev (the statistics over the normalized axes, kept as size-1 dims) are
    # computed in stash_type (float32 by default)
    stash = ONNX_TO_TORCH.get(int(ctx.attr("stash_type", 1)))
    if stash is None or not stash.is_floating_point:
        raise ctx.fail(f"stash_type={ctx.attr('stash_type')} is not a floating-point type")
    stats = ctx.call(layer_norm_stats, ctx.tensor(0), axis, eps, stash)
    return [y, ctx.call(operator.getitem, stats, 0), ctx.call(operator.getitem, stats, 1)]


def _layer_norm_y(ctx: Ctx, axis: int, eps: float) -> Value:
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
            layer_norm_manual, x, axis, eps, ctx.tensor(1), None if bias is None else ctx.tensor(2)
        )

    def fit(v: Value | None) -> Any:
        if isinstance(v, torch.Tensor) and list(v.shape) != normalized:
            return v.expand(normalized).clone()
        return None if v is None else ctx.materialize(v)

    return ctx.call(F.layer_norm, x, normalized, fit(scale), fit(bias), eps)


# -- InstanceNormalization, GroupNormalization, RMSNormalization, LRN -------------------------


def _stash(ctx: Ctx) -> torch.dtype:
    stash = ONNX_TO_TORCH.get(int(ctx.attr("stash_type", 1)))
    if stash is None or not stash.is_floating_point:
        raise ctx.fail(f"stash_type={ctx.attr('stash_type')} is not a floating-point type")
    return stash


def _floating_input(ctx: Ctx) -> torch.dtype:
    dtype = ctx.dtype(0)
    if dtype is None or not dtype.is_floating_point:
        raise ctx.fail(f"input dtype {dtype} is not a floating-point type torch normalizes")
    return dtype


def _check_spatial_rank(ctx: Ctx) -> None:
    """Refuse an input that is not N x C x D1 ... Dn with n >= 1."""
    rank = ctx.rank(0)
    if rank is None or rank < 3:
        raise ctx.fail(f"input rank {rank} (N x C x D1 ... Dn with n >= 1 needed)")


@converter("InstanceNormalization")
def _instance_norm(ctx: Ctx) -> Value:
    # y = scale[c] * (x - mean) / sqrt(var + eps) + B[c], statistics per (n, c) over the rest
    _floating_input(ctx)
    _check_spatial_rank(ctx)
    eps = float(ctx.attr("epsilon", 1e-5))
    return ctx.call(
        F.instance_norm, ctx.tensor(0), weight=ctx.tensor(1), bias=ctx.tensor(2), eps=eps
    )


@converter("GroupNormalization")
def _group_norm(ctx: Ctx) -> Value:
    # y = scale * (x - mean) / sqrt(var + eps) + bias, statistics per (n, group); opset 18's
    # scale/bias are per group (num_groups), opset 21's per channel (C), computed in stash_type
    dtype = _floating_input(ctx)
    groups = int(ctx.attr("num_groups"))
    eps = float(ctx.attr("epsilon", 1e-5))
    channels = ctx.static_dim(0, 1)
    if channels is None or ctx.rank(0) is None or ctx.rank(0) < 2:
        raise ctx.fail("the channel count (input dim 1) is not known statically")
    if channels % groups:
        raise ctx.fail(f"{channels} channels do not split into num_groups={groups}")
    scale, bias = ctx.tensor(1), ctx.tensor(2)
    stash = _stash(ctx) if ctx.opset >= 21 else dtype
    if ctx.opset < 21:
        per = channels // groups
        scale = ctx.call(torch.repeat_interleave, scale, per)
        bias = ctx.call(torch.repeat_interleave, bias, per)
    return ctx.call(group_norm_onnx, ctx.tensor(0), groups, scale, bias, eps, stash)


def group_norm_onnx(
    x: torch.Tensor,
    groups: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    stash: torch.dtype,
) -> torch.Tensor:
    """F.group_norm computed in ``stash`` (ONNX GroupNormalization-21's stash_type)."""
    if x.dtype == stash or x.dtype == torch.float64:
        return F.group_norm(x, groups, scale.to(x.dtype), bias.to(x.dtype), eps)
    y = F.group_norm(x.to(stash), groups, eps=eps).to(x.dtype)
    return y * scale.to(x.dtype).reshape(-1, *[1] * (x.dim() - 2)) + bias.to(x.dtype).reshape(
        -1, *[1] * (x.dim() - 2)
    )


@converter("RMSNormalization")
def _rms_norm(ctx: Ctx) -> Value:
    # y = x / sqrt(mean(x^2 over the axes from `axis` on) + eps) * scale, in stash_type
    _floating_input(ctx)
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis", -1))
    if rank is None:
        raise ctx.fail("the input rank is not known")
    if not -rank <= axis < rank:
        raise ctx.fail(f"axis={axis} is out of range for rank {rank}")
    eps = float(ctx.attr("epsilon", 1e-5))
    return ctx.call(rms_norm_onnx, ctx.tensor(0), ctx.tensor(1), axis % rank, eps, _stash(ctx))


def rms_norm_onnx(
    x: torch.Tensor, scale: torch.Tensor, axis: int, eps: float, stash: torch.dtype
) -> torch.Tensor:
    """ONNX RMSNormalization (written out: torch's exporter has no opset-17 rms_norm)."""
    xs = x if x.dtype == torch.float64 else x.to(stash)
    ms = xs.pow(2).mean(dim=tuple(range(axis, x.dim())), keepdim=True)
    y = xs * torch.rsqrt(ms + eps)
    return (y * scale.to(xs.dtype)).to(x.dtype)


@converter("LRN")
def _lrn(ctx: Ctx) -> Value:
    # y = x / (bias + alpha / size * sum of x^2 over channels
    #          [c - floor((size - 1) / 2), c + ceil((size - 1) / 2)]) ^ beta
    _floating_input(ctx)
    _check_spatial_rank(ctx)
    size = int(ctx.attr("size"))
    return ctx.call(
        lrn_onnx,
        ctx.tensor(0),
        size,
        float(ctx.attr("alpha", 1e-4)),
        float(ctx.attr("beta", 0.75)),
        float(ctx.attr("bias", 1.0)),
    )


def lrn_onnx(x: torch.Tensor, size: int, alpha: float, beta: float, bias: float) -> torch.Tensor:
    """ONNX LRN: torch's local_response_norm centres an even window the other way round
    ([c - size//2, c + (size-1)//2]), so the window is padded here as ONNX places it."""
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    sq = F.pad(sq, [0, 0, (size - 1) // 2, size // 2])
    mean = F.avg_pool2d(sq, (size, 1), stride=1).reshape(x.shape)
    return x / (mean * alpha + bias).pow(beta)

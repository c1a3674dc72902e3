"""tune-conv-bn: the Tune mode of ConvBN blocks, for *training* with frozen (eval-mode) BatchNorm.

From "Efficient ConvBN Blocks for Transfer Learning and Beyond" (You et al., ICLR 2024). In Eval
mode (BN frozen at its running statistics, the usual fine-tuning setting) a block computes
``BN(conv(x))`` with trainable ``W, b, gamma, beta``. Per output channel ``c``::

    a[c]  = gamma[c] / sqrt(var[c] + eps)         gamma = 1 when BN is not affine
    W'[c] = a[c] * W[c]                            ConvTranspose: W is [C_in, C_out/g, k..],
                                                   scaled per group as in fold-conv-bn
    b'[c] = a[c] * (b[c] - mean[c]) + beta[c]      b = 0 without bias, beta = 0 without affine
    BN(conv(x, W, b)) = conv(x, W', b')

Tune mode computes ``W'`` and ``b'`` from the live parameters in *every* forward pass and runs one
convolution. It is the same function of the same trainable parameters as Eval mode, so outputs
and the gradients of ``W, b, gamma, beta`` are Eval mode's up to float rounding, and training
follows the same trajectory (Deploy mode, which trains ``W'`` itself, does not: its per-channel
learning rate differs by ``a**2``). Eval mode's autograd keeps the conv input *and* the conv
output (BN's backward needs it for ``d gamma``) and runs BN as an elementwise pass over the
feature map, forward and backward; Tune mode keeps the conv input and ``W``, ``a``, and
recomputes ``W'`` in backward (a custom autograd function: plain autograd would keep ``W'``, a
copy of every conv weight, until backward, which at small batches costs more than it saves)::

    dL/dW = dL/dW' * a        dL/da[c] = sum(dL/dW' * W)[c]        (then through a to gamma)

The rewrite, on ``call_module`` nodes (the modules stay where they were)::

    y = bn(conv(x))   ->   y = tune_conv_bn(x, <get_attr conv>, <get_attr bn>)

so the state_dict keys, the parameter objects and their ``requires_grad`` are unchanged: an
optimizer built on the rewritten graph sees exactly the conv and BN parameters, and a checkpoint
saved from it loads into the original model. Tuned blocks normalise with the running statistics
whatever ``bn.training`` says, so ``.train()`` on the graph (for dropout) keeps them frozen. With
``freeze_bn=true`` every other eval-mode BatchNorm with running statistics (no conv before it, or
a refused pair) becomes ``frozen_batch_norm(x, <get_attr bn>)`` as well (counted as ``frozen``),
so the whole graph stays in Eval mode after ``.train()``: what :func:`graphopt.tune_mode` runs.

Unlike fold-conv-bn, a conv whose weights are shared (the module called elsewhere too) is tuned:
no weight is rewritten, the other call still reads ``W``.

Not tuned (counted as ``skipped:<reason>``): BN in training mode (``bn-training``: Tune mode is
Eval mode's computation, it cannot normalise with batch statistics); BN without running
statistics (``no-running-stats``); the conv output also used elsewhere (``output-used-elsewhere``:
that user needs the unfused output, so the conv would run twice); a Conv/ConvTranspose subclass
that overrides ``forward``, e.g. weight standardisation (``custom-conv``); a ConvTranspose called
with ``output_size`` (``output-size``); BN over a different channel count (``bn-axis``).
Not matched at all: functional ``F.conv*`` / ``F.batch_norm``, aten graphs from ``torch.export``,
Linear + BatchNorm1d, BatchNorm subclasses that override ``forward``.

Limits: the backward is not differentiable again (double backward raises); under autocast the
block falls back to plain autograd (the casts autocast chooses, ``W'`` kept until backward); as
PyTorch inductor's version of this rewrite warns, ``W'`` grows where ``var`` is tiny, which
costs precision in fp16 (in float32 it is exact to rounding). The pass is for training: it is in
no default pipeline, and a graph meant for export or inference wants fold-conv-bn instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.function import once_differentiable

from graphopt.algebra.bn_fold import output_channel_sum, scale_output_channels
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.layers import BN_MODULES, CONV_MODULES, CONVT_MODULES

__all__ = ["TuneConvBN", "frozen_batch_norm", "tune_conv_bn"]

_CONV, _CONVT = CONV_MODULES, CONVT_MODULES
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_BN = (*BN_MODULES, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------------------------
# what the rewritten graph calls. FX-wrapped, and their nodes marked so, so that tracing a tuned
# graph again (or a model that calls them through this module) keeps them as single nodes


@torch.fx.wrap
def tune_conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` with ``bn`` frozen, as one convolution whose weight and bias are folded
    from the live parameters on every call (differentiable in ``W, b, gamma, beta``)."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = bn.weight * a
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * a
    if bn.bias is not None:
        bias = bias + bn.bias
    transposed = isinstance(conv, _CONVT)
    if torch.is_autocast_enabled(x.device.type):
        # mixed precision: plain autograd casts per op as the user's autocast says (and keeps
        # the folded weight until backward); _TuneConv would have to re-implement those casts
        w = scale_output_channels(conv.weight, a, transposed, conv.groups)
        if transposed:
            fn = _CONVT_FN[w.dim() - 2]
            return fn(
                x,
                w,
                bias,
                conv.stride,
                conv.padding,
                conv.output_padding,
                conv.groups,
                conv.dilation,
            )
        return conv._conv_forward(x, w, bias)
    x, padding = _resolve_padding(conv, x)
    return _TuneConv.apply(
        x,
        conv.weight,
        a,
        bias,
        conv.stride,
        padding,
        conv.dilation,
        transposed,
        conv.output_padding,
        conv.groups,
    )


class _TuneConv(torch.autograd.Function):
    """``conv(x, W * a, bias)`` that keeps ``x``, ``W`` and ``a`` for backward and recomputes the
    folded weight there. Plain autograd would keep ``W * a``, a copy of every conv weight, alive
    from forward to backward: for ResNet-50 at a small batch that is more than Eval mode's
    saving. Its backward is not differentiable again (``once_differentiable``)."""

    @staticmethod
    def forward(x, weight, a, bias, stride, padding, dilation, transposed, output_padding, groups):
        w = scale_output_channels(weight, a, transposed, groups)
        return torch.ops.aten.convolution(
            x, w, bias, stride, padding, dilation, transposed, output_padding, groups
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, a, _bias, *conv = inputs
        ctx.save_for_backward(x, weight, a)
        ctx.conv = tuple(conv)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, a = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.conv
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_folded, grad_b = torch.ops.aten.convolution_backward(
            grad,
            x,
            scale_output_channels(weight, a, transposed, groups),
            [a.shape[0]],
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            [need_x, need_w or need_a, need_b],
        )
        # W' = W * a per output channel:  dL/dW = dL/dW' * a,  dL/da[c] = sum(dL/dW' * W)[c]
        grad_w = scale_output_channels(grad_folded, a, transposed, groups) if need_w else None
        grad_a = output_channel_sum(grad_folded * weight, transposed, groups) if need_a else None
        return grad_x, grad_w, grad_a, grad_b, None, None, None, None, None, None


def _resolve_padding(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(input, integer padding) for ``aten.convolution``, as ``nn.Conv*d`` resolves a padding
    mode and ``'same'`` / ``'valid'``."""
    n = conv.weight.dim() - 2
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), [0] * n
    if conv.padding == "valid":
        return x, [0] * n
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        left = [t // 2 for t in total]
        # an odd total: one more zero on the right, as aten's _convolution_mode does
        right_extra = [t - 2 * lo for t, lo in zip(total, left, strict=True)]
        if any(right_extra):
            x = F.pad(x, [p for e in reversed(right_extra) for p in (0, e)])
        return x, left
    return x, list(conv.padding)


@torch.fx.wrap
def frozen_batch_norm(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """``bn(x)`` with the running statistics, whatever ``bn.training`` says."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


# ------------------------------------------------------------------------------------------------
# the pass


@register_pass
class TuneConvBN(Pass):
    """Rewrite Conv + eval-mode BatchNorm into Tune mode: one conv, weights folded on the fly."""

    name = "tune-conv-bn"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        freeze_bn: bool = False  # also make every other eval-mode BN ignore .train()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            bn = _as_bn(gm, node)
            if bn is None:
                continue
            bn_reason = _bn_reason(bn)
            producer = node.args[0]
            conv = _as_conv(gm, producer)
            if conv is not None:
                if not (reason := bn_reason or _pair_reason(producer, conv, bn)):
                    _tune(gm, producer, node)
                    stats["tuned"] += 1
                    continue
                stats[f"skipped:{reason}"] += 1
            elif self.options.freeze_bn and bn_reason:
                stats[f"skipped:{bn_reason}"] += 1
            if self.options.freeze_bn and not bn_reason:
                _freeze(gm, node)
                stats["frozen"] += 1
        changed = stats["tuned"] + stats["frozen"]
        if changed:
            gm.recompile()
        return PassResult(gm, modified=changed > 0, stats=+stats)


def _as_bn(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m = gm.get_submodule(node.target)
    # a subclass with its own forward computes something else: leave it alone
    if not isinstance(m, _BN) or type(m).forward not in {c.forward for c in _BN}:
        return None
    return m


def _as_conv(gm: fx.GraphModule, node: object) -> nn.Module | None:
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, _CONV + _CONVT) else None


def _bn_reason(bn: nn.Module) -> str:
    if bn.running_mean is None or bn.running_var is None:
        return "no-running-stats"
    if bn.training:
        return "bn-training"  # batch statistics: not the function Tune mode computes
    return ""


def _pair_reason(conv_node: fx.Node, conv: nn.Module, bn: nn.Module) -> str:
    if type(conv).forward not in {c.forward for c in _CONV + _CONVT}:
        return "custom-conv"  # e.g. weight standardisation: the weight is not conv.weight
    if len(conv_node.users) != 1:
        return "output-used-elsewhere"  # that user needs conv(x) itself: no saving, two convs
    if len(conv_node.args) != 1 or conv_node.kwargs:
        return "output-size"  # ConvTranspose(x, output_size): output_padding chosen per call
    if bn.num_features != conv.out_channels:
        return "bn-axis"
    return ""


def _tune(gm: fx.GraphModule, conv_node: fx.Node, bn_node: fx.Node) -> None:
    graph = gm.graph
    with graph.inserting_before(bn_node):
        conv_ref = graph.get_attr(conv_node.target)
        bn_ref = graph.get_attr(bn_node.target)
        new = graph.call_function(tune_conv_bn, (conv_node.args[0], conv_ref, bn_ref))
    new.meta = {**bn_node.meta, "is_wrapped": True}  # the generated code re-wraps it for FX
    bn_node.replace_all_uses_with(new)
    graph.erase_node(bn_node)
    graph.erase_node(conv_node)


def _freeze(gm: fx.GraphModule, bn_node: fx.Node) -> None:
    graph = gm.graph
    with graph.inserting_before(bn_node):
        bn_ref = graph.get_attr(bn_node.target)
        new = graph.call_function(frozen_batch_norm, (bn_node.args[0], bn_ref))
    new.meta = {**bn_node.meta, "is_wrapped": True}
    bn_node.replace_all_uses_with(new)
    graph.erase_node(bn_node)

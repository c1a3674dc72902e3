"""fold-conv-bn: fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear beside it.

With ``a = gamma / sqrt(var + eps)`` and ``t = beta - mean * a`` (BN(y) = a*y + t per channel):

BN after the layer (y = layer(x), BN on y's channels)::

    Conv, Linear:   W'[o] = a[o] * W[o]                 b'[o] = a[o] * b[o] + t[o]
    ConvTranspose:  W is [C_in, C_out/g, k..]; output channel o = gi*(C_out/g) + j lives in
                    W[gi*C_in/g:(gi+1)*C_in/g, j], so W is viewed as [g, C_in/g, C_out/g, k..]
                    and scaled by a.view(g, 1, C_out/g, 1..)      b' as above

BN before the layer (x' = a*x + t on the layer's input channels)::

    W'[o, c] = W[o, c] * a[cin(o, c)]      b'[o] = b[o] + sum_{c, taps} W[o, c, taps] * t[cin(o, c)]
    (cin(o, c) = group(o) * C/g + c). Exact only where every tap reads a real pixel: padding 0,
    or a non-zero padding mode (reflect/replicate/circular pad BN's output with BN'd values).

Both module (``nn.Conv2d`` -> ``nn.BatchNorm2d``) and functional forms (``F.conv2d``,
``F.batch_norm``, the aten ops ``torch.export`` produces) are folded. Arithmetic is float64,
cast back to the weight's dtype. The pass sweeps the graph until nothing more folds, so chains
(BN -> BN -> conv) fold in one run and a second run finds nothing.

Not folded (counted as ``skipped:<reason>``): BN in training mode (``bn-training``), without
running statistics (``no-running-stats``); the layer's output also used elsewhere
(``output-used-elsewhere``; reads of its shape, rank or dtype only, such as the guard
``_assert(x.ndim == 4)`` of timm's ``BatchNormAct2d``, are not uses: folding keeps them valid,
see :mod:`graphopt.fx.uses`); the layer's weights shared with another layer or the layer called
twice (``shared-weight``); BN before a zero-padded conv (``padding``); BN before a transposed
conv (``bn-before-transposed``, its borders see a different number of taps); BatchNorm1d on a
Linear output that is not (N, C) (``bn-axis``); weights that are not constants (``weight-not-constant``);
weights, bias, running statistics or affine parameters that ``forward`` writes in place
(``written-in-place``: ``self.bn.running_mean.add_(d)``, ``self.conv.weight.data.mul_(s)``, through
a view or a tensor sharing the memory; the fold would freeze the values of one call, see
:func:`graphopt.fx.effects.written_in_place`). The arithmetic is :mod:`graphopt.algebra.bn_fold`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.algebra.bn_fold import bn_affine, fold_after, fold_before
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import shares_storage, written_storages
from graphopt.fx.layers import (
    BN,
    Layer,
    as_bn,
    as_layer,
    call_counts,
    is_shared,
    param_owners,
    rank,
)
from graphopt.fx.names import free_name, set_attr
from graphopt.fx.tensors import as_normal, as_parameter
from graphopt.fx.uses import redirect_metadata_reads, value_users

# ------------------------------------------------------------------------------------------------
# the pass


@register_pass
class FoldConvBN(Pass):
    """Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear before (or after) it."""

    name = "fold-conv-bn"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        include_linear: bool = True  # Linear + BatchNorm1d (and BN1d -> Linear)
        bn_before: bool = True  # BN -> Conv/Linear where the padding allows it exactly

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        # A fold can make another one possible (BN1 -> BN2 -> conv: once BN2 is folded into the
        # conv, BN1 feeds it), so sweep until nothing folds; each sweep removes a BN, so the loop
        # ends. Folds add up over sweeps; the refusals are those of the last (fixed-point) sweep.
        stats: Counter = Counter()
        while True:
            sweep = self._sweep(gm)
            stats.update({k: v for k, v in sweep.items() if k.startswith("folded")})
            if not (sweep["folded"] or sweep["folded-bn-before"]):
                stats.update(sweep)
                break
        folded = stats["folded"] + stats["folded-bn-before"]
        if folded:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=folded > 0, stats=+stats)

    def _sweep(self, gm: fx.GraphModule) -> Counter:
        stats: Counter = Counter()
        calls = call_counts(gm)
        owners = param_owners(gm)
        written = written_storages(gm)
        for node in list(gm.graph.nodes):
            bn = as_bn(gm, node)
            if bn is None:
                continue
            found = self._layer_beside(gm, bn, stats)
            if found is None:
                continue
            layer, after = found
            why_not = _why_not_after if after else _why_not_before
            if reason := why_not(gm, layer, bn, calls, owners, written):
                stats[f"skipped:{reason}"] += 1
                continue
            _fold(gm, layer, bn, after=after)
            stats["folded" if after else "folded-bn-before"] += 1
        return stats

    def _layer_beside(
        self, gm: fx.GraphModule, bn: BN, stats: Counter
    ) -> tuple[Layer, bool] | None:
        """The layer ``bn`` would fold into and whether it comes after that layer: the layer
        producing its input, else (with ``bn_before``) the one layer consuming its output."""
        include_linear = self.options.include_linear
        producer = bn.input_node
        if isinstance(producer, fx.Node):
            layer = as_layer(gm, producer, include_linear)
            if layer is not None:
                return layer, True
        users = value_users(bn.output_node)  # a guard on BN's output shape is no user
        if not self.options.bn_before or not users:
            return None
        consumer = as_layer(gm, users[0], include_linear)
        if len(users) != 1:
            if consumer is not None:
                stats["skipped:output-used-elsewhere"] += 1
            return None
        if consumer is None or consumer.input_node is not bn.output_node:
            return None
        return consumer, False


def _common_reasons(
    gm, layer: Layer, bn: BN, calls: Counter, owners: Counter, written: set[int]
) -> str:
    if not (layer.constant and bn.constant):
        return "weight-not-constant"
    if bn.mean is None or bn.var is None:
        return "no-running-stats"
    if bn.training:
        return "bn-training"
    # forward changes one of them in place: folded, every call would see the first call's value
    if shares_storage(written, layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta):
        return "written-in-place"
    if is_shared(layer, calls, owners):
        return "shared-weight"
    return ""


def _why_not_after(gm, layer: Layer, bn: BN, calls, owners, written) -> str:
    if reason := _common_reasons(gm, layer, bn, calls, owners, written):
        return reason
    # the layer's output must feed only this BN: otherwise the other users need it unfolded
    # (reads of its shape, rank or dtype, such as timm's ``_assert(x.ndim == 4)``, do not count:
    # folding keeps them)
    if len(value_users(layer.node)) != 1:
        return "output-used-elsewhere"
    out_channels = (
        layer.weight.shape[1] * layer.groups if layer.kind == "convT" else layer.weight.shape[0]
    )
    if bn.mean.numel() != out_channels:
        return "bn-axis"
    if layer.kind == "linear" and rank(layer.node) not in (2, None):
        return "bn-axis"  # BatchNorm1d on (N, C, L) normalises dim 1, not Linear's features
    return ""


def _why_not_before(gm, layer: Layer, bn: BN, calls, owners, written) -> str:
    if reason := _common_reasons(gm, layer, bn, calls, owners, written):
        return reason
    if layer.kind == "convT":
        return "bn-before-transposed"
    in_channels = layer.weight.shape[1] * layer.groups
    if bn.mean.numel() != in_channels:
        return "bn-axis"
    if layer.kind == "linear" and rank(bn.input_node) not in (2, None):
        return "bn-axis"
    if layer.kind == "conv" and layer.padding_mode == "zeros" and _has_padding(layer):
        return "padding"
    return ""


def _has_padding(layer: Layer) -> bool:
    pad = layer.padding
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in layer.weight.shape[2:])
    if isinstance(pad, int):
        return pad != 0
    return any(p != 0 for p in pad)


def _fold(gm: fx.GraphModule, layer: Layer, bn: BN, *, after: bool) -> None:
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    fold = fold_after if after else fold_before
    weight, bias = fold(layer.kind, layer.weight, layer.bias, a, t, layer.groups)
    if layer.module is not None:
        layer.module.weight = as_parameter(weight, layer.weight.requires_grad)
        layer.module.bias = as_parameter(bias, layer.weight.requires_grad)
    else:
        set_attr(gm, layer.weight_node.target, weight)
        if isinstance(layer.bias_node, fx.Node):
            set_attr(gm, layer.bias_node.target, bias)
        else:
            _give_bias(gm, layer, bias)
    if after:
        bn.output_node.replace_all_uses_with(layer.node)
    else:
        layer.node.replace_input_with(bn.output_node, bn.input_node)
        redirect_metadata_reads(bn.output_node, bn.input_node)  # BN keeps shape and dtype
    _erase_bn(gm, bn)


def _erase_bn(gm: fx.GraphModule, bn: BN) -> None:
    """Remove the BN node (and its getitem, and parameter reads nothing else uses)."""
    params = [a for a in bn.node.all_input_nodes if a.op == "get_attr"]
    if bn.output_node is not bn.node:
        gm.graph.erase_node(bn.output_node)
    gm.graph.erase_node(bn.node)
    for node in params:
        if not node.users:
            gm.graph.erase_node(node)


def _give_bias(gm: fx.GraphModule, layer: Layer, bias: torch.Tensor) -> None:
    base = (
        layer.weight_node.target.rsplit(".", 1)[0]
        if "." in layer.weight_node.target
        else layer.weight_node.target
    )
    name = free_name(gm, f"{base}_folded_bias".replace(".", "_"), bare=True, start=1)
    gm.register_buffer(name, as_normal(bias))
    with gm.graph.inserting_before(layer.node):
        bias_node = gm.graph.get_attr(name)
    node = layer.node
    if len(node.args) > 2:
        node.update_arg(2, bias_node)
    else:
        if len(node.args) == 2 and "bias" not in node.kwargs:
            node.args = (*node.args, bias_node)
        else:
            node.update_kwarg("bias", bias_node)

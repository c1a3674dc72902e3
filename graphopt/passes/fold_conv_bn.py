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

BN after several layers or after reshapes (the same ``fold_after``, per layer)::

    cat([conv_1(x_1), .., conv_k(x_k)], dim=1) -> BN     (MixNet's MixedConv2d): conv_i takes
        a[o_i:o_i+C_i], t[o_i:o_i+C_i], its slice of BN's channels; BN's output becomes the cat's
    Linear (.., C) -> flatten/view/reshape to (M, C) -> BatchNorm1d     (timm's LinearNorm,
        ``bn(x.flatten(0, 1)).reshape_as(x)``): a row-major reshape whose result is (M, C)
        keeps feature c in column c for every M, so BN's channel is the Linear's feature

Both module (``nn.Conv2d`` -> ``nn.BatchNorm2d``) and functional forms (``F.conv2d``,
``F.batch_norm``, the aten ops ``torch.export`` produces) are folded. Arithmetic is float64,
cast back to the weight's dtype. The pass sweeps the graph until nothing more folds, so chains
(BN -> BN -> conv) fold in one run and a second run finds nothing.

A BN refused after its layer(s) is folded into the layer after it where that is allowed.
Not folded (counted as ``skipped:<reason>``, the first refusal): BN in training mode
(``bn-training``), without running statistics (``no-running-stats``); the layer's output also
used elsewhere (``output-used-elsewhere``; also a reshape or concat on the way to BN used
elsewhere, or one conv twice in the concat; reads of a shape, rank or dtype only, such as the
guard ``_assert(x.ndim == 4)`` of timm's ``BatchNormAct2d`` or the template of
``y.reshape_as(x)``, are not uses: folding keeps them valid, see :mod:`graphopt.fx.uses`); the
layer's weights shared with another layer or the layer called twice (``shared-weight``); BN
before a zero-padded conv (``padding``); BN before a transposed conv (``bn-before-transposed``,
its borders see a different number of taps); BatchNorm1d on a Linear output that is not (N, C)
or not reshaped to (M, C), a concat along another axis than the channels (``bn-axis``); weights
that are not constants (``weight-not-constant``); weights, bias, running statistics or affine
parameters that ``forward`` writes in place (``written-in-place``:
``self.bn.running_mean.add_(d)``, ``self.conv.weight.data.mul_(s)``, through a view or a tensor
sharing the memory; the fold would freeze the values of one call, see
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
    shape,
)
from graphopt.fx.names import free_name, set_attr
from graphopt.fx.tensors import as_normal, as_parameter
from graphopt.fx.uses import redirect_metadata_reads, value_users

aten = torch.ops.aten

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
            # the layers after which BN comes first, else the one before which it comes; the
            # first refusal is the one counted when neither folds
            reasons = []
            for site in self._sites(gm, bn, stats):
                why_not = _why_not_after if site.after else _why_not_before
                if reason := why_not(gm, site, bn, calls, owners, written):
                    reasons.append(reason)
                    continue
                _fold(gm, site, bn)
                stats["folded" if site.after else "folded-bn-before"] += 1
                break
            else:
                if reasons:
                    stats[f"skipped:{reasons[0]}"] += 1
        return stats

    def _sites(self, gm: fx.GraphModule, bn: BN, stats: Counter) -> list[_Site]:
        """Where ``bn`` could fold: after the layer(s) producing its input (directly, through
        reshapes for a Linear, or through a concat of convs), then (with ``bn_before``) before
        the one layer consuming its output."""
        include_linear = self.options.include_linear
        sites = []
        if isinstance(bn.input_node, fx.Node):
            after = _site_after(gm, bn.input_node, include_linear)
            sites += [after] if after is not None else []
        if not self.options.bn_before:
            return sites
        users = value_users(bn.output_node)  # a guard on BN's output shape is no user
        consumer = as_layer(gm, users[0], include_linear) if users else None
        if len(users) > 1:
            if consumer is not None and not sites:
                stats["skipped:output-used-elsewhere"] += 1
            return sites
        if consumer is None or consumer.input_node is not bn.output_node:
            return sites
        return [*sites, _Site([consumer], after=False)]


@dataclass
class _Site:
    """Where a BN folds. After the layers (``after``): their output channels, in order, are
    BN's channels, and ``path`` holds the nodes from their outputs to BN's input (the reshapes
    between a Linear and its BatchNorm1d, or the concat of the convs). Before: into
    ``layers[0]``."""

    layers: list[Layer]
    after: bool
    path: tuple[fx.Node, ...] = ()


def _site_after(gm: fx.GraphModule, node: fx.Node, include_linear: bool) -> _Site | None:
    layer = as_layer(gm, node, include_linear)
    if layer is not None:
        return _Site([layer], after=True)
    if include_linear and (site := _linear_through_reshapes(gm, node)) is not None:
        return site
    return _concat_of_convs(gm, node)


def _linear_through_reshapes(gm: fx.GraphModule, node: fx.Node) -> _Site | None:
    """``Linear -> reshape.. -> node`` (timm's LinearNorm: ``bn(linear(x).flatten(0, 1))``)."""
    path = []
    while _is_reshape(node):
        path.append(node)
        node = node.args[0]
    layer = as_layer(gm, node, True) if path else None
    if layer is None or layer.kind != "linear":
        return None
    return _Site([layer], after=True, path=tuple(reversed(path)))


def _is_reshape(node: fx.Node) -> bool:
    """A row-major reshape of its first argument (flatten / view / reshape), never a view as
    another dtype (``x.view(torch.float16)``)."""
    if node.op == "call_method":
        known = node.target in _RESHAPE_METHODS
    else:
        known = node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    dtypes = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return known and bool(node.args) and isinstance(node.args[0], fx.Node) and not dtypes


_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, aten.view.default, aten.reshape.default}
_RESHAPE_FUNCTIONS |= {aten._unsafe_view.default, aten.flatten.using_ints}
_CONCATS = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}


def _concat_of_convs(gm: fx.GraphModule, node: fx.Node) -> _Site | None:
    """``cat([conv_1(x_1), .., conv_k(x_k)], dim)`` (MixNet's MixedConv2d) as a site; None
    where a part is no conv (DenseNet's pre-activation BN after a concat stays)."""
    if node.op != "call_function" or node.target not in _CONCATS or not node.args:
        return None
    parts = node.args[0]
    if not isinstance(parts, list | tuple) or not parts:
        return None
    layers = [as_layer(gm, p, False) if isinstance(p, fx.Node) else None for p in parts]
    if any(layer is None for layer in layers):
        return None
    return _Site(layers, after=True, path=(node,))


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


def _why_not_after(gm, site: _Site, bn: BN, calls, owners, written) -> str:
    for layer in site.layers:
        if reason := _common_reasons(gm, layer, bn, calls, owners, written):
            return reason
    # every value from the layers to BN must feed only the next one: otherwise the other users
    # need it unfolded (reads of its shape, rank or dtype, such as timm's
    # ``_assert(x.ndim == 4)`` or ``y.reshape_as(x)``'s template, do not count: folding keeps
    # them)
    steps = [*site.path, bn.node]
    if len({id(layer.node) for layer in site.layers}) != len(site.layers):
        return "output-used-elsewhere"  # cat([conv(x), conv(x)]): one conv, two BN slices
    if any(value_users(layer.node) != steps[:1] for layer in site.layers):
        return "output-used-elsewhere"
    if any(value_users(node) != [nxt] for node, nxt in zip(steps, steps[1:], strict=False)):
        return "output-used-elsewhere"
    if bn.mean.numel() != sum(_out_channels(layer) for layer in site.layers):
        return "bn-axis"
    return _axis_reason(site, bn)


def _out_channels(layer: Layer) -> int:
    if layer.kind == "convT":
        return layer.weight.shape[1] * layer.groups
    return layer.weight.shape[0]


def _axis_reason(site: _Site, bn: BN) -> str:
    """ "bn-axis" unless BN's channel axis is the layers' output channel axis."""
    layer = site.layers[0]
    if layer.kind == "linear" and not site.path:
        # BatchNorm1d on (N, C, L) normalises dim 1, not Linear's features
        return "bn-axis" if rank(layer.node) not in (2, None) else ""
    if layer.kind == "linear":
        # a row-major reshape of (.., C) to (M, C) keeps feature c at column c for every M:
        # BN's channel axis (dim 1 of a rank-2 input) is the Linear's feature axis
        c, before, after = layer.weight.shape[0], shape(layer.node), shape(bn.input_node)
        if before is None or after is None or len(after) != 2 or before[-1] != c or after[1] != c:
            return "bn-axis"
        return ""
    if site.path:
        cat = site.path[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        r = rank(cat)
        # batched outputs (channels at dim 1), concatenated along the channels
        if r is None or any(part.weight.dim() != r for part in site.layers):
            return "bn-axis"
        return "" if isinstance(dim, int) and dim % r == 1 else "bn-axis"
    return ""


def _why_not_before(gm, site: _Site, bn: BN, calls, owners, written) -> str:
    layer = site.layers[0]
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


def _fold(gm: fx.GraphModule, site: _Site, bn: BN) -> None:
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    if site.after:
        start = 0
        for layer in site.layers:  # each layer takes its slice of BN's channels
            end = start + _out_channels(layer)
            _set_weights(
                gm,
                layer,
                *fold_after(
                    layer.kind, layer.weight, layer.bias, a[start:end], t[start:end], layer.groups
                ),
            )
            start = end
        # BN keeps shape and dtype: its users (metadata reads too) read its input instead
        bn.output_node.replace_all_uses_with(bn.input_node)
    else:
        layer = site.layers[0]
        _set_weights(
            gm, layer, *fold_before(layer.kind, layer.weight, layer.bias, a, t, layer.groups)
        )
        layer.node.replace_input_with(bn.output_node, bn.input_node)
        redirect_metadata_reads(bn.output_node, bn.input_node)  # BN keeps shape and dtype
    _erase_bn(gm, bn)


def _set_weights(gm: fx.GraphModule, layer: Layer, weight: torch.Tensor, bias: torch.Tensor):
    if layer.module is not None:
        layer.module.weight = as_parameter(weight, layer.weight.requires_grad)
        layer.module.bias = as_parameter(bias, layer.weight.requires_grad)
    else:
        set_attr(gm, layer.weight_node.target, weight)
        if isinstance(layer.bias_node, fx.Node):
            set_attr(gm, layer.bias_node.target, bias)
        else:
            _give_bias(gm, layer, bias)


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

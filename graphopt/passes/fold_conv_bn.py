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
(``output-used-elsewhere``); the layer's weights shared with another layer or the layer called
twice (``shared-weight``); BN before a zero-padded conv (``padding``); BN before a transposed
conv (``bn-before-transposed``, its borders see a different number of taps); BatchNorm1d on a
Linear output that is not (N, C) (``bn-axis``); weights that are not constants (``weight-not-constant``);
weights, bias, running statistics or affine parameters that ``forward`` writes in place
(``written-in-place``: ``self.bn.running_mean.add_(d)``, ``self.conv.weight.data.mul_(s)``, through
a view or a tensor sharing the memory; the fold would freeze the values of one call, see
:func:`graphopt.passes.eliminate_dead_code.written_in_place`).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.passes._tensors import as_normal, as_parameter
from graphopt.passes.eliminate_dead_code import storage_key, written_storages

aten = torch.ops.aten

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_CONV_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
}
_CONVT_FUNCTIONS = {
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
_LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
_BN_FUNCTIONS = {F.batch_norm, torch.batch_norm, aten.batch_norm.default}
_BN_LEGIT = aten._native_batch_norm_legit_no_training.default


# ------------------------------------------------------------------------------------------------
# the algebra (float64, plain tensors: the tests check it against the formulas directly)


def bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, t) with BN(y) = a*y + t, in float64."""
    mean, var = mean.double(), var.double()
    gamma = torch.ones_like(mean) if gamma is None else gamma.detach().double()
    beta = torch.zeros_like(mean) if beta is None else beta.detach().double()
    a = gamma / torch.sqrt(var + eps)
    return a, beta - mean * a


def fold_after(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    t: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``BN(layer(x))`` as one layer. ``kind``: conv | convT | linear."""
    w = weight.detach().double()
    b = torch.zeros_like(a) if bias is None else bias.detach().double()
    tail = [1] * (w.dim() - 2)
    if kind == "convT":
        c_in, c_out_g = w.shape[0], w.shape[1]
        w = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
        w = (w * a.reshape(groups, 1, c_out_g, *tail)).reshape(weight.shape)
    else:
        w = w * a.reshape(-1, 1, *tail)
    return w.to(weight.dtype), (a * b + t).to(weight.dtype)


def fold_before(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    t: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``layer(BN(x))`` as one layer (conv or linear; exact only without padding)."""
    w = weight.detach().double()
    out = w.shape[0]
    b = torch.zeros(out, dtype=torch.float64) if bias is None else bias.detach().double()
    c_g = w.shape[1]  # input channels per group
    tail = [1] * (w.dim() - 2)
    # per (output, local input) channel: the BN scale/shift of the input channel it reads
    a_oc = a.reshape(groups, 1, c_g).expand(groups, out // groups, c_g).reshape(out, c_g)
    t_oc = t.reshape(groups, 1, c_g).expand(groups, out // groups, c_g).reshape(out, c_g)
    w_new = w * a_oc.reshape(out, c_g, *tail)
    taps = w.reshape(out, c_g, -1).sum(-1)
    b_new = b + (taps * t_oc).sum(1)
    return w_new.to(weight.dtype), b_new.to(weight.dtype)


# ------------------------------------------------------------------------------------------------
# a uniform view of module and functional layers


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # conv | convT | linear
    groups: int
    padding: Any  # int/tuple/str ("same"/"valid")
    padding_mode: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Module | None = None
    weight_node: fx.Node | None = None
    bias_node: fx.Node | None = None
    input_node: fx.Node | None = None
    constant: bool = True  # weights are module parameters / get_attr constants


@dataclass
class _BN:
    node: fx.Node
    input_node: fx.Node
    output_node: fx.Node  # the node whose value is BN's result (getitem for legit ops)
    mean: torch.Tensor | None
    var: torch.Tensor | None
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float
    training: bool
    module: nn.Module | None = None
    constant: bool = True


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    raise _NotConstant


class _NotConstant(Exception):
    pass


def _args(node: fx.Node, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _as_layer(gm: fx.GraphModule, node: fx.Node, include_linear: bool) -> _Layer | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _CONV_MODULES + _CONVT_MODULES):
            kind = "convT" if isinstance(m, _CONVT_MODULES) else "conv"
            return _Layer(
                node,
                kind,
                m.groups,
                m.padding,
                m.padding_mode,
                m.weight,
                m.bias,
                module=m,
                input_node=node.args[0],
            )
        if include_linear and isinstance(m, nn.Linear):
            return _Layer(
                node, "linear", 1, 0, "zeros", m.weight, m.bias, module=m, input_node=node.args[0]
            )
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCTIONS:
        kind = "conv"
        v = _args(
            node,
            ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
            {"bias": None, "padding": 0, "groups": 1},
        )
    elif target in _CONVT_FUNCTIONS:
        kind = "convT"
        v = _args(
            node,
            [
                "input",
                "weight",
                "bias",
                "stride",
                "padding",
                "output_padding",
                "groups",
                "dilation",
            ],
            {"bias": None, "padding": 0, "groups": 1},
        )
    elif include_linear and target in _LINEAR_FUNCTIONS:
        kind = "linear"
        v = _args(node, ["input", "weight", "bias"], {"bias": None, "groups": 1, "padding": 0})
    else:
        return None
    try:
        weight, bias = _attr(gm, v["weight"]), _attr(gm, v["bias"])
    except _NotConstant:
        return _Layer(node, kind, 1, 0, "zeros", torch.empty(0), None, constant=False)
    if weight is None:
        return None
    return _Layer(
        node,
        kind,
        int(v["groups"]),
        v["padding"],
        "zeros",
        weight,
        bias,
        weight_node=v["weight"],
        bias_node=v["bias"],
        input_node=v["input"],
    )


def _as_bn(gm: fx.GraphModule, node: fx.Node) -> _BN | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, _BN_MODULES):
            return None
        return _BN(
            node,
            node.args[0],
            node,
            m.running_mean,
            m.running_var,
            m.weight if m.affine else None,
            m.bias if m.affine else None,
            m.eps,
            m.training or not m.track_running_stats,
            module=m,
        )
    if node.op != "call_function":
        return None
    try:
        if node.target in _BN_FUNCTIONS:
            v = _args(
                node,
                [
                    "input",
                    "running_mean",
                    "running_var",
                    "weight",
                    "bias",
                    "training",
                    "momentum",
                    "eps",
                ],
                {"weight": None, "bias": None, "training": False, "eps": 1e-5},
            )
            # torch.batch_norm is the aten op: (input, weight, bias, mean, var, ...)
            if node.target in (aten.batch_norm.default, torch.batch_norm):
                v = _args(
                    node,
                    [
                        "input",
                        "weight",
                        "bias",
                        "running_mean",
                        "running_var",
                        "training",
                        "momentum",
                        "eps",
                    ],
                    {},
                )
            return _BN(
                node,
                v["input"],
                node,
                _attr(gm, v["running_mean"]),
                _attr(gm, v["running_var"]),
                _attr(gm, v["weight"]),
                _attr(gm, v["bias"]),
                float(v["eps"]),
                bool(v["training"]),
            )
        if node.target is _BN_LEGIT:
            users = list(node.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return None
            v = _args(
                node,
                ["input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"],
                {},
            )
            return _BN(
                node,
                v["input"],
                users[0],
                _attr(gm, v["running_mean"]),
                _attr(gm, v["running_var"]),
                _attr(gm, v["weight"]),
                _attr(gm, v["bias"]),
                float(v["eps"]),
                False,
            )
    except _NotConstant:
        return _BN(node, node.args[0], node, None, None, None, None, 0.0, False, constant=False)
    return None


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
        calls = _call_counts(gm)
        owners = _param_owners(gm)
        written = written_storages(gm)
        for node in list(gm.graph.nodes):
            bn = _as_bn(gm, node)
            if bn is None:
                continue
            producer = bn.input_node
            layer = (
                _as_layer(gm, producer, self.options.include_linear)
                if isinstance(producer, fx.Node)
                else None
            )
            if layer is not None:
                reason = _why_not_after(gm, layer, bn, calls, owners, written)
                if reason:
                    stats[f"skipped:{reason}"] += 1
                    continue
                _fold(gm, layer, bn, after=True)
                stats["folded"] += 1
                continue
            if not self.options.bn_before or len(bn.output_node.users) != 1:
                if self.options.bn_before and bn.output_node.users:
                    consumer = _as_layer(
                        gm, next(iter(bn.output_node.users)), self.options.include_linear
                    )
                    if consumer is not None:
                        stats["skipped:output-used-elsewhere"] += 1
                continue
            consumer = _as_layer(gm, next(iter(bn.output_node.users)), self.options.include_linear)
            if consumer is None or consumer.input_node is not bn.output_node:
                continue
            reason = _why_not_before(gm, consumer, bn, calls, owners, written)
            if reason:
                stats[f"skipped:{reason}"] += 1
                continue
            _fold(gm, consumer, bn, after=False)
            stats["folded-bn-before"] += 1
        return stats


def _call_counts(gm: fx.GraphModule) -> Counter:
    """How many graph nodes call each module object / read each attribute."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[id(gm.get_submodule(node.target))] += 1
        elif node.op == "get_attr":
            counts[node.target] += len(node.users)
    return counts


def _param_owners(gm: fx.GraphModule) -> Counter:
    """How many distinct modules own each parameter/buffer (tied weights count twice)."""
    owners: Counter = Counter()
    for module in {id(m): m for m in gm.modules()}.values():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners[id(t)] += 1
    return owners


def _common_reasons(
    gm, layer: _Layer, bn: _BN, calls: Counter, owners: Counter, written: set[int]
) -> str:
    if not (layer.constant and bn.constant):
        return "weight-not-constant"
    if bn.mean is None or bn.var is None:
        return "no-running-stats"
    if bn.training:
        return "bn-training"
    # forward changes one of them in place: folded, every call would see the first call's value
    tensors = (layer.weight, layer.bias, bn.mean, bn.var, bn.gamma, bn.beta)
    if any(t is not None and storage_key(t) in written for t in tensors):
        return "written-in-place"
    if layer.module is not None:
        if calls[id(layer.module)] > 1:
            return "shared-weight"
        if any(owners[id(t)] > 1 for t in (layer.weight, layer.bias) if t is not None):
            return "shared-weight"
    else:
        for n in (layer.weight_node, layer.bias_node):
            if isinstance(n, fx.Node) and calls[n.target] > 1:
                return "shared-weight"
    return ""


def _why_not_after(gm, layer: _Layer, bn: _BN, calls, owners, written) -> str:
    if reason := _common_reasons(gm, layer, bn, calls, owners, written):
        return reason
    # the layer's output must feed only this BN: otherwise the other users need it unfolded
    if len(layer.node.users) != 1:
        return "output-used-elsewhere"
    out_channels = (
        layer.weight.shape[1] * layer.groups if layer.kind == "convT" else layer.weight.shape[0]
    )
    if bn.mean.numel() != out_channels:
        return "bn-axis"
    if layer.kind == "linear" and _rank(layer.node) not in (2, None):
        return "bn-axis"  # BatchNorm1d on (N, C, L) normalises dim 1, not Linear's features
    return ""


def _why_not_before(gm, layer: _Layer, bn: _BN, calls, owners, written) -> str:
    if reason := _common_reasons(gm, layer, bn, calls, owners, written):
        return reason
    if layer.kind == "convT":
        return "bn-before-transposed"
    in_channels = layer.weight.shape[1] * layer.groups
    if bn.mean.numel() != in_channels:
        return "bn-axis"
    if layer.kind == "linear" and _rank(bn.input_node) not in (2, None):
        return "bn-axis"
    if layer.kind == "conv" and layer.padding_mode == "zeros" and _has_padding(layer):
        return "padding"
    return ""


def _has_padding(layer: _Layer) -> bool:
    pad = layer.padding
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in layer.weight.shape[2:])
    if isinstance(pad, int):
        return pad != 0
    return any(p != 0 for p in pad)


def _rank(node: Any) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fold(gm: fx.GraphModule, layer: _Layer, bn: _BN, *, after: bool) -> None:
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    fold = fold_after if after else fold_before
    weight, bias = fold(layer.kind, layer.weight, layer.bias, a, t, layer.groups)
    if layer.module is not None:
        layer.module.weight = as_parameter(weight, layer.weight.requires_grad)
        layer.module.bias = as_parameter(bias, layer.weight.requires_grad)
    else:
        _set_attr(gm, layer.weight_node.target, weight)
        if isinstance(layer.bias_node, fx.Node):
            _set_attr(gm, layer.bias_node.target, bias)
        else:
            _give_bias(gm, layer, bias)
    if after:
        bn.output_node.replace_all_uses_with(layer.node)
    else:
        layer.node.replace_input_with(bn.output_node, bn.input_node)
    _erase_bn(gm, bn)


def _erase_bn(gm: fx.GraphModule, bn: _BN) -> None:
    """Remove the BN node (and its getitem, and parameter reads nothing else uses)."""
    params = [a for a in bn.node.all_input_nodes if a.op == "get_attr"]
    if bn.output_node is not bn.node:
        gm.graph.erase_node(bn.output_node)
    gm.graph.erase_node(bn.node)
    for node in params:
        if not node.users:
            gm.graph.erase_node(node)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, as_parameter(value, old.requires_grad))
    else:
        setattr(owner, name, as_normal(value))


def _give_bias(gm: fx.GraphModule, layer: _Layer, bias: torch.Tensor) -> None:
    base = (
        layer.weight_node.target.rsplit(".", 1)[0]
        if "." in layer.weight_node.target
        else layer.weight_node.target
    )
    name = f"{base}_folded_bias".replace(".", "_")
    i = 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_folded_bias_{i}".replace(".", "_")
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

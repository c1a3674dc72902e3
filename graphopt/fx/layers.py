"""Conv / ConvTranspose / Linear / BatchNorm nodes seen alike, whatever form the graph has.

A layer may be a module call (``nn.Conv2d``), a functional call (``F.conv2d(x, self.w)``) or the
aten op ``torch.export`` produces (``aten.conv2d.default``); :func:`as_layer` and :func:`as_bn`
give one view of all of them, with the weights they read. :func:`call_counts`,
:func:`param_owners` and :func:`is_shared` say whether rewriting a layer's weights would change
another use of them.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.fx.constants import NotConstant, attr_tensor

aten = torch.ops.aten

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

CONV_FUNCTIONS = {
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
CONVT_FUNCTIONS = {
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
BN_FUNCTIONS = {F.batch_norm, torch.batch_norm, aten.batch_norm.default}
BN_LEGIT = aten._native_batch_norm_legit_no_training.default

# argument names, in order, of the functional forms
_CONV_ARGS = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
_CONVT_ARGS = ["input", "weight", "bias", "stride", "padding", "output_padding", "groups"]
_CONVT_ARGS += ["dilation"]
_F_BN_ARGS = ["input", "running_mean", "running_var", "weight", "bias", "training"]
_F_BN_ARGS += ["momentum", "eps"]
# torch.batch_norm is the aten op: (input, weight, bias, mean, var, ...)
_ATEN_BN_ARGS = ["input", "weight", "bias", "running_mean", "running_var", "training"]
_ATEN_BN_ARGS += ["momentum", "eps"]
_LEGIT_BN_ARGS = ["input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"]


@dataclass
class Layer:
    """A Conv / ConvTranspose / Linear call and the weights it reads."""

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
    stride: Any = 1
    dilation: Any = 1


@dataclass
class BN:
    """A BatchNorm call and the statistics and affine parameters it reads."""

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


def call_args(node: fx.Node, names: list[str], defaults: dict[str, Any] | None = None) -> dict:
    """A call's arguments by name: ``defaults``, then the positional ones named by ``names`` in
    order, then the keywords."""
    values = dict(defaults or {})
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def as_layer(gm: fx.GraphModule, node: fx.Node, include_linear: bool) -> Layer | None:
    """``node`` as a Conv / ConvTranspose (/ Linear, if ``include_linear``), or None. A
    functional layer whose weights are computed values comes back with ``constant=False``."""
    if node.op == "call_module":
        return _module_layer(gm, node, include_linear)
    if node.op != "call_function":
        return None
    target, defaults = node.target, {"bias": None, "padding": 0, "groups": 1}
    if target in CONV_FUNCTIONS:
        kind, v = "conv", call_args(node, _CONV_ARGS, defaults)
    elif target in CONVT_FUNCTIONS:
        kind, v = "convT", call_args(node, _CONVT_ARGS, defaults)
    elif include_linear and target in LINEAR_FUNCTIONS:
        kind, v = "linear", call_args(node, ["input", "weight", "bias"], defaults)
    else:
        return None
    try:
        weight, bias = attr_tensor(gm, v["weight"]), attr_tensor(gm, v["bias"])
    except NotConstant:
        return Layer(node, kind, 1, 0, "zeros", torch.empty(0), None, constant=False)
    if weight is None:
        return None
    return Layer(
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
        stride=v.get("stride", 1),
        dilation=v.get("dilation", 1),
    )


def _module_layer(gm: fx.GraphModule, node: fx.Node, include_linear: bool) -> Layer | None:
    m = gm.get_submodule(node.target)
    if isinstance(m, CONV_MODULES + CONVT_MODULES):
        kind = "convT" if isinstance(m, CONVT_MODULES) else "conv"
        return Layer(
            node,
            kind,
            m.groups,
            m.padding,
            m.padding_mode,
            m.weight,
            m.bias,
            module=m,
            input_node=node.args[0],
            stride=m.stride,
            dilation=m.dilation,
        )
    if include_linear and isinstance(m, nn.Linear):
        return Layer(
            node, "linear", 1, 0, "zeros", m.weight, m.bias, module=m, input_node=node.args[0]
        )
    return None


def as_bn(gm: fx.GraphModule, node: fx.Node) -> BN | None:
    """``node`` as a BatchNorm (module, functional, or the aten op with its ``getitem``), or
    None. One whose statistics are computed values comes back with ``constant=False``."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, BN_MODULES):
            return None
        return BN(
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
        if node.target in BN_FUNCTIONS:
            return _functional_bn(gm, node)
        if node.target is BN_LEGIT:
            return _legit_bn(gm, node)
    except NotConstant:
        return BN(node, node.args[0], node, None, None, None, None, 0.0, False, constant=False)
    return None


def _functional_bn(gm: fx.GraphModule, node: fx.Node) -> BN:
    if node.target in (aten.batch_norm.default, torch.batch_norm):
        v = call_args(node, _ATEN_BN_ARGS)
    else:
        defaults = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
        v = call_args(node, _F_BN_ARGS, defaults)
    return BN(
        node,
        v["input"],
        node,
        attr_tensor(gm, v["running_mean"]),
        attr_tensor(gm, v["running_var"]),
        attr_tensor(gm, v["weight"]),
        attr_tensor(gm, v["bias"]),
        float(v["eps"]),
        bool(v["training"]),
    )


def _legit_bn(gm: fx.GraphModule, node: fx.Node) -> BN | None:
    """``_native_batch_norm_legit_no_training`` returns (out, mean, invstd): only out used."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return None
    v = call_args(node, _LEGIT_BN_ARGS)
    return BN(
        node,
        v["input"],
        users[0],
        attr_tensor(gm, v["running_mean"]),
        attr_tensor(gm, v["running_var"]),
        attr_tensor(gm, v["weight"]),
        attr_tensor(gm, v["bias"]),
        float(v["eps"]),
        False,
    )


def call_counts(gm: fx.GraphModule) -> Counter:
    """How many graph nodes call each module object / read each attribute."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[id(gm.get_submodule(node.target))] += 1
        elif node.op == "get_attr":
            counts[node.target] += len(node.users)
    return counts


def param_owners(gm: fx.GraphModule) -> Counter:
    """How many distinct modules own each parameter/buffer (tied weights count twice)."""
    owners: Counter = Counter()
    for module in {id(m): m for m in gm.modules()}.values():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners[id(t)] += 1
    return owners


def is_shared(layer: Layer, calls: Counter, owners: Counter) -> bool:
    """Rewriting ``layer``'s weights would change another use of them: its module is called
    twice, a weight is tied to another module's, or a ``get_attr`` weight is read elsewhere
    (``calls``: :func:`call_counts`, ``owners``: :func:`param_owners`)."""
    if layer.module is not None:
        if calls[id(layer.module)] > 1:
            return True
        return any(owners[id(t)] > 1 for t in (layer.weight, layer.bias) if t is not None)
    return any(
        isinstance(n, fx.Node) and calls[n.target] > 1 for n in (layer.weight_node, layer.bias_node)
    )


def rank(node: Any) -> int | None:
    """The rank of ``node``'s value from its shape metadata (``tensor_meta``), if known."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def shape(node: Any) -> tuple[int, ...] | None:
    """The shape of ``node``'s value from ``tensor_meta`` (or torch.export's ``val``), if known."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None

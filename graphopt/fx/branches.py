"""A convolution (or an average pool, as the depthwise convolution it is) as a float64 linear
term of its input: what the passes that merge convolutions read a conv node as.

A :class:`Branch` is ``y = conv(x, W, b)`` with ``W``, ``b`` in float64, its stride, dilation,
padding and groups; ``kind`` also allows the per-channel affine terms of a sum (``a * x + t``:
an eval BatchNorm of ``x``, or ``x`` itself), which reparameterize builds from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.fx.layers import as_layer, call_args, shape
from graphopt.fx.memo import RunMemo
from graphopt.fx.uses import value_users

aten = torch.ops.aten

_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_POOL_FUNCTIONS |= {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2}
_POOL_FUNCTIONS |= {aten.avg_pool3d.default: 3}
_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_POOL_ARGS = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
_POOL_ARGS += ["divisor_override"]


@dataclass
class Branch:
    """One linear term of ``x``: a conv (or pool), or a per-channel affine of ``x``."""

    node: fx.Node  # the leaf of the sum
    kind: str  # conv | bn | identity
    weight: torch.Tensor | None = None  # float64 [O, I/g, k...]
    bias: torch.Tensor | None = None  # float64 [O]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    scale: torch.Tensor | None = None  # bn / identity: per-channel a (shift t is the bias)
    input: Any = None  # the node the branch reads (x)
    padding_mode: str = "zeros"
    pool: bool = False  # an average pool written as a depthwise conv
    dtype: torch.dtype | None = None  # the model's dtype of the weights (they are float64 here)
    written: bool = False  # forward writes its weights (or BN statistics) in place: not merged


def to_tuple(v: Any, dims: int) -> tuple[int, ...]:
    """A conv argument (an int, or one per spatial dim) as ``dims`` ints."""
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),) * dims


def conv_branch(
    gm: fx.GraphModule, leaf: fx.Node, single_use: bool = True, memo: RunMemo | None = None
) -> Branch | None:
    """``leaf`` as a convolution (or an average pool, as a depthwise one) with constant weights
    (``single_use``: only if nothing else reads its output). ``memo``: the run's, or a fresh one
    (float64 copies and the in-place facts worked out for this call only)."""
    memo = RunMemo(gm) if memo is None else memo
    if single_use and len(value_users(leaf)) != 1:  # guards on its shape do not count
        return None
    layer = as_layer(gm, leaf, include_linear=False)
    if layer is None:
        return pool_branch(gm, leaf)
    if layer.kind != "conv" or not layer.constant:
        return None
    if isinstance(layer.padding, str):
        return None  # "same"/"valid": rare in re-parameterizable blocks; left alone
    dims = layer.weight.dim() - 2
    weight = memo.float64(layer.weight)
    bias = (
        memo.float64(layer.bias)
        if layer.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    return Branch(
        leaf,
        "conv",
        weight,
        bias,
        to_tuple(layer.stride, dims),
        to_tuple(layer.dilation, dims),
        to_tuple(layer.padding, dims),
        layer.groups,
        input=layer.input_node,
        padding_mode=layer.padding_mode,
        dtype=layer.weight.dtype,
        written=memo.written(layer.weight, layer.bias),
    )


def pool_branch(gm: fx.GraphModule, leaf: fx.Node) -> Branch | None:
    """An average pool that counts its zero padding, as the depthwise conv it is (kernel 1/k^d)."""
    if leaf.op == "call_module":
        m = gm.get_submodule(leaf.target)
        dims = _POOL_MODULES.get(type(m))
        if dims is None:
            return None
        x, kernel, stride, padding = leaf.args[0], m.kernel_size, m.stride, m.padding
        ceil, include = m.ceil_mode, m.count_include_pad
        divisor = getattr(m, "divisor_override", None)
    elif leaf.op == "call_function" and leaf.target in _POOL_FUNCTIONS:
        dims = _POOL_FUNCTIONS[leaf.target]
        v = call_args(leaf, _POOL_ARGS)
        x, kernel, stride, padding = v["input"], v["kernel_size"], v.get("stride"), v.get("padding")
        ceil, include = v.get("ceil_mode", False), v.get("count_include_pad", True)
        divisor = v.get("divisor_override")
    else:
        return None
    kernel = to_tuple(kernel, dims)
    stride = to_tuple(stride if stride not in (None, [], ()) else kernel, dims)
    padding = to_tuple(padding or 0, dims)
    x_shape = shape(x)
    if ceil or divisor or (not include and any(padding)) or x_shape is None:
        return None
    if len(x_shape) != dims + 2:
        return None
    channels = int(x_shape[1])
    weight = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=torch.float64)
    zeros = torch.zeros(channels, dtype=torch.float64)
    return Branch(
        leaf, "conv", weight, zeros, stride, (1,) * dims, padding, channels, input=x, pool=True
    )

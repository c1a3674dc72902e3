"""The branches of a sum and the one convolution they merge into.

A branch (:class:`graphopt.fx.branches.Branch`) is a conv or average pool of ``x``
(:func:`graphopt.fx.branches.conv_branch`), an eval BatchNorm of ``x`` or of such a conv
(:func:`bn_branch`), or ``x`` itself. With ``K`` the largest kernel and each kernel zero-padded
to ``K`` *centred* (:func:`merge_branches`)::

    W = sum_i pad_K(W_i) + sum_identity a * I_K        b = sum_i b_i + sum_identity t

where ``I_K`` is the identity kernel (1 at the centre tap of output channel o's own input
channel, per group). :func:`why_not_merge` names what keeps a set of branches from merging.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from graphopt.algebra.bn_fold import bn_affine
from graphopt.fx.branches import Branch, conv_branch
from graphopt.fx.layers import as_bn
from graphopt.fx.memo import RunMemo
from graphopt.fx.names import free_name
from graphopt.fx.uses import value_users
from graphopt.passes.reparameterize.terms import full

_F64 = torch.float64
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def affine_branch(b: Branch, a: torch.Tensor, t: torch.Tensor | float = 0.0) -> Branch:
    """The branch ``a * b(x) + t`` (``a``, ``t`` per output channel or scalars)."""
    if b.kind == "conv":
        view = (-1,) + (1,) * (b.weight.dim() - 1)
        return replace(b, weight=b.weight * a.reshape(view), bias=b.bias * a + t)
    scale = a if b.scale is None else b.scale * a
    bias = t if b.bias is None else b.bias * a + t
    return replace(b, scale=scale, bias=torch.as_tensor(bias, dtype=_F64).reshape(-1))


def bn_branch(gm: fx.GraphModule, memo: RunMemo, leaf: fx.Node) -> Branch | None:
    """An eval BatchNorm of ``x`` (the identity-BN branch), or of a conv/pool of ``x`` (folded)."""
    bn = as_bn(gm, leaf)
    if bn is None or bn.training or bn.mean is None or not bn.constant:
        return None
    if bn.output_node is not leaf or len(value_users(leaf)) != 1:
        return None
    a, t = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
    written = memo.written(bn.mean, bn.var, bn.gamma, bn.beta)
    inner = (
        conv_branch(gm, bn.input_node, memo=memo) if isinstance(bn.input_node, fx.Node) else None
    )
    if inner is not None:  # conv/pool -> BN that fold-conv-bn left (after a pool, shared conv)
        return replace(affine_branch(inner, a, t), node=leaf, written=inner.written or written)
    return Branch(leaf, "bn", bias=t, scale=a, input=bn.input_node, written=written)


def merge_branches(branches: list[Branch], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one kernel and bias equal to the sum of ``branches`` (float64; checked beforehand)."""
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    dims = ref.weight.dim() - 2
    k_max = [max(b.weight.shape[2 + d] for b in convs) for d in range(dims)]
    weight = torch.zeros(ref.weight.shape[:2] + tuple(k_max), dtype=_F64)
    bias = torch.zeros(ref.weight.shape[0], dtype=_F64)
    for b in convs:
        lo = [(k_max[d] - b.weight.shape[2 + d]) // 2 for d in range(dims)]
        index = (slice(None), slice(None)) + tuple(
            slice(lo[d], lo[d] + b.weight.shape[2 + d]) for d in range(dims)
        )
        weight[index] += b.weight
        bias += b.bias
    per_group = weight.shape[1]  # input channels per group
    centre = tuple(k // 2 for k in k_max)
    for b in branches:
        if b.kind == "conv":
            continue
        ones = torch.ones(1, dtype=_F64)
        scale = full(b.scale if b.scale is not None else ones, channels)
        for o in range(channels):
            weight[(o, o % per_group) + centre] += scale[o]
        if b.bias is not None:
            bias += b.bias
    return weight, bias


def why_not_merge(branches: list[Branch]) -> str | None:
    """Why ``branches`` (at least one a conv) cannot be summed into one conv, or None."""
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    dims = ref.weight.dim() - 2
    for b in convs:
        if b.padding_mode != "zeros":
            return "padding-mode"
        if (
            b.weight.dim() != ref.weight.dim()
            or b.stride != ref.stride
            or b.dilation != ref.dilation
            or b.groups != ref.groups
            or b.weight.shape[:2] != ref.weight.shape[:2]
        ):
            return "mismatch"
    offsets = set()
    for b in convs:
        for d in range(dims):
            span = b.dilation[d] * (b.weight.shape[2 + d] - 1)
            if span % 2:
                return "misaligned"  # an even kernel has no centre tap
            offsets.add((d, b.padding[d] - span // 2))
    if len(offsets) != dims:
        return "misaligned"
    identities = [b for b in branches if b.kind != "conv"]
    if identities:
        out_c, in_c = ref.weight.shape[0], ref.weight.shape[1] * ref.groups
        if out_c != in_c or any(s != 1 for s in ref.stride):
            return "identity-shape"
        if any(off != 0 for _, off in offsets):
            return "identity-shape"  # an identity tap only lines up with centred kernels
    return None


def merged_padding(branches: list[Branch], weight: torch.Tensor) -> tuple[int, ...]:
    """The padding of the merged conv (``weight``: its kernel) that keeps every branch's
    alignment."""
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    return tuple(
        max(
            b.padding[d] + ref.dilation[d] * (weight.shape[2 + d] - b.weight.shape[2 + d]) // 2
            for b in convs
        )
        for d in range(weight.dim() - 2)
    )


def pointwise(b: Branch) -> bool:
    """A 1x1 conv with stride 1 and no padding."""
    return (
        all(k == 1 for k in b.weight.shape[2:])
        and all(s == 1 for s in b.stride)
        and all(p == 0 for p in b.padding)
    )


def macs(b: Branch) -> int:
    """Multiply-adds per output pixel of a branch's conv."""
    return int(b.weight.numel())


def layer_dtype(node: fx.Node, branches: Any = ()) -> torch.dtype:
    """The dtype a new layer computing ``node`` gets: ``node``'s own, else its branches'
    weights' (a graph without shape annotations), else float32."""
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((b.dtype for b in branches if b is not None and b.dtype), torch.float32)


def new_conv(
    gm: fx.GraphModule, b: Branch, padding: tuple[int, ...], mode: str, dtype: torch.dtype
) -> str:
    """Register a conv module holding ``b``'s float64 weight and bias, rounded once to ``dtype``;
    return its name."""
    dims = b.weight.dim() - 2
    # built outside inference mode: parameters made under torch.inference_mode() are inference
    # tensors, which autograd cannot save (the graph could not be fine-tuned or run with grad)
    with torch.inference_mode(False), torch.no_grad():
        conv = _CONV_BY_DIMS[dims](
            b.weight.shape[1] * b.groups,
            b.weight.shape[0],
            tuple(b.weight.shape[2:]),
            stride=b.stride,
            padding=padding,
            dilation=b.dilation,
            groups=b.groups,
            bias=True,
            padding_mode=mode,
            dtype=dtype,
        )
        conv.weight.copy_(b.weight)
        conv.bias.copy_(b.bias)
    name = free_name(gm, "reparam")
    gm.add_submodule(name, conv)
    return name

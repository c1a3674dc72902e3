"""Conv branches into a fully connected layer (RepMLP's partition perceptron).

``reshape(fc(reshape(x)))`` back to ``x``'s layout (an ``nn.Linear``, or a 1x1 conv on the
flattened input), optionally followed by a per-channel BatchNorm, summed with conv branches of
the same ``x``: a conv is linear in ``x``, so it is the matrix whose columns are its responses
to the identity basis of ``x``'s ``C*h*w`` features::

    M[:, j] = flatten(conv(e_j))        FC' = a * FC + M        b' = a * b_fc + t + repeat(b_conv)

Refused: strided or non-2d convs (``fc-stride``); more than 4096 input features, the basis
being ``n x n`` (``fc-too-large``); convs whose response is not ``x``'s size (``fc-shape``);
convs that mix the channel groups of a grouped FC (``fc-groups``); the FC's weights or the BN's
statistics written in place by ``forward`` (``written-in-place``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.algebra.bn_fold import bn_affine
from graphopt.algebra.conv_merge import dense_kernel, regroup
from graphopt.fx.branches import Branch
from graphopt.fx.layers import as_bn, shape
from graphopt.fx.memo import RunMemo
from graphopt.fx.names import free_name
from graphopt.fx.uses import value_users
from graphopt.passes.reparameterize.branches import merge_branches, merged_padding

_F64 = torch.float64
_FC_MAX = 4096  # conv -> FC: at most this many input features (the identity basis is n x n)


@dataclass
class FC:
    """``reshape(fc(reshape(x)))`` back to x's layout, optionally followed by a per-channel
    affine (``scale``, ``shift``): RepMLP's partition perceptron."""

    leaf: fx.Node
    out: fx.Node  # the reshape back to [N, O, h, w]
    fc: fx.Node
    module: nn.Module
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    written: bool = False  # forward writes the FC's weights or the BN's statistics in place


def fc_leaf(gm: fx.GraphModule, memo: RunMemo, leaf: fx.Node, x: fx.Node) -> FC | None:
    """The term ``leaf`` of a sum as an FC of ``x`` (see :class:`FC`), or None."""
    node, scale, shift, written = leaf, None, None, False
    bn = as_bn(gm, leaf)
    if bn is not None:
        if bn.training or bn.mean is None or not bn.constant or bn.output_node is not leaf:
            return None
        scale, shift = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
        written = memo.written(bn.mean, bn.var, bn.gamma, bn.beta)
        node = bn.input_node
    if not isinstance(node, fx.Node) or len(value_users(node)) != 1 or not node.args:
        return None
    fc = node.args[0]
    if not isinstance(fc, fx.Node) or fc.op != "call_module" or len(value_users(fc)) != 1:
        return None
    m = gm.get_submodule(fc.target)
    flat = fc.args[0] if fc.args else None
    if not isinstance(flat, fx.Node) or not flat.args or flat.args[0] is not x:
        return None
    xs, fs, outs = shape(x), shape(flat), shape(node)
    if xs is None or fs is None or outs is None or len(xs) != 4 or len(outs) != 4:
        return None
    n, c, h, w = xs
    if isinstance(m, nn.Linear):
        features_in, features_out = m.in_features, m.out_features
        flat_ok = fs == (n, c * h * w)
    elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1):
        features_in, features_out = m.in_channels, m.out_channels
        flat_ok = fs == (n, c * h * w, 1, 1) and m.padding == (0, 0)
    else:
        return None
    if not flat_ok or features_in != c * h * w or outs[0] != n or outs[2:] != (h, w):
        return None
    if features_out != outs[1] * h * w or not _reshape_like(flat) or not _reshape_like(node):
        return None
    return FC(leaf, node, fc, m, scale, shift, written or memo.written(m.weight, m.bias))


def _reshape_like(node: fx.Node) -> bool:
    """A row-major reshape (the shapes, checked by the caller, say which)."""
    if node.op == "call_method":
        return node.target in ("reshape", "view", "flatten")
    return node.op == "call_function" and node.target in (torch.reshape, torch.flatten)


@dataclass
class FCPlan:
    """The FC that computes the FC term plus the conv branches: dense weight and bias."""

    weight: torch.Tensor  # float64, [O*h*w, C*h*w] regrouped to the FC's groups
    bias: torch.Tensor  # float64
    groups: int


def plan(fc: FC, branches: list[Branch], x: fx.Node) -> FCPlan | str:
    """The merged FC, or the reason the conv branches of ``x`` cannot fold into ``fc``."""
    if fc.written:
        return "written-in-place"  # merged, the FC would keep the values of one call
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    n, c, h, w = shape(x)
    if any(s != 1 for s in ref.stride) or ref.weight.dim() != 4:
        return "fc-stride"
    if c * h * w > _FC_MAX:
        return "fc-too-large"
    out_c = ref.weight.shape[0]
    weight, bias = merge_branches(branches, out_c)
    padding = merged_padding(branches, weight)
    basis = torch.eye(c * h * w, dtype=_F64).reshape(c * h * w, c, h, w)
    response = F.conv2d(basis, weight, None, 1, padding, ref.dilation, ref.groups)
    if response.shape[2:] != (h, w):
        return "fc-shape"
    matrix = response.reshape(c * h * w, out_c * h * w).T  # [O*h*w, C*h*w]
    m = fc.module
    groups = m.groups if isinstance(m, nn.Conv2d) else 1
    fc_w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
    fc_dense = dense_kernel(fc_w, groups)
    fc_b = m.bias.detach().double() if m.bias is not None else torch.zeros(len(fc_w), dtype=_F64)
    if fc.scale is not None:
        a, t = fc.scale.repeat_interleave(h * w), fc.shift.repeat_interleave(h * w)
        fc_dense, fc_b = fc_dense * a[:, None], fc_b * a + t
    total = regroup(fc_dense + matrix, groups)
    if total is None:
        return "fc-groups"  # the convs mix channel groups that the grouped FC keeps apart
    return FCPlan(total, fc_b + bias.repeat_interleave(h * w), groups)


def rewrite(gm: fx.GraphModule, fc: FC, merged: FCPlan) -> None:
    """Replace ``fc``'s layer by a new one holding ``merged`` (in the FC's dtype)."""
    m = fc.module
    with torch.inference_mode(False), torch.no_grad():  # normal parameters, as in new_conv
        new = (
            nn.Linear(m.in_features, m.out_features, dtype=m.weight.dtype)
            if isinstance(m, nn.Linear)
            else nn.Conv2d(
                m.in_channels, m.out_channels, 1, groups=merged.groups, dtype=m.weight.dtype
            )
        )
        new.weight.copy_(merged.weight.reshape(new.weight.shape))
        new.bias.copy_(merged.bias)
    name = free_name(gm, "reparam_fc")
    gm.add_submodule(name, new)
    with gm.graph.inserting_before(fc.fc):
        node = gm.graph.call_module(name, fc.fc.args)
    node.meta = dict(fc.fc.meta)
    fc.fc.replace_all_uses_with(node)
    gm.graph.erase_node(fc.fc)

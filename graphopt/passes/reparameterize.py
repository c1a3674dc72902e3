"""reparameterize: collapse linear structures into one convolution.

Structural re-parameterization as a graph rewrite: it recognises the *structure*, whatever the
modules are called. Two rules, applied until neither fires (run after ``fold-conv-bn``, which
leaves every conv+BN a conv with a bias):

**Sequential** (SESR collapsible blocks, DBB's 1x1 -> kxk): ``conv2(conv1(x))`` with nothing in
between and ``conv1``'s output used only there, when one of them is a 1x1 (stride 1, no padding,
one group)::

    kxk then 1x1:  W[o,i,taps] = sum_m W2[o,m] W1[m,i,taps]        b = W2 b1 + b2
    1x1 then kxk:  W[o,i,taps] = sum_m W2[o,m,taps] W1[m,i]        b = b2 + sum_{m,taps} W2 b1

The second is exact only where conv2 reads no zero padding of conv1's output (padding 0, a
non-zero padding mode, or ``b1 == 0``): a zero-padded border of ``conv1(x)`` is 0, not ``b1``
(``skipped:bias-at-padding``; DBB pads with BN's bias to dodge this). A merge that would cost
more multiply-adds per output than the two convs (a 1x1 bottleneck that reduces channels) is
left alone (``skipped:more-macs``).

**Affine around a Linear** (SLAB's re-parameterized BN in transformers): a per-feature affine
of the Linear's input or output -- ``x * c``, ``x + c``, ``x - c``, ``x / c`` with ``c`` a
constant scalar or a vector over the last dimension, or an eval BatchNorm1d applied between two
transposes of the last two dimensions (BN over the feature axis of ``(N, T, C)`` tokens) -- is
folded into the Linear: after it, ``W' = a W``, ``b' = a b + t``; before it, ``W' = W a``,
``b' = b + W t``.

**Parallel** (RepVGG, ACNet, MobileOne):

``y = sum_i B_i(x)`` where every ``B_i`` is, on the same ``x``,

- a convolution (module or functional; any kernel size, groups, dilation, zero padding) whose
  output feeds only this sum,
- an eval-mode BatchNorm of ``x`` (the identity-BN branch: a per-channel affine ``a*x + t``),
- ``x`` itself (a plain identity branch),

becomes one convolution. With ``K`` the largest kernel and each kernel zero-padded to ``K``
*centred* (so each branch keeps its alignment)::

    W = sum_i pad_K(W_i) + sum_identity a * I_K        b = sum_i b_i + sum_identity t

where ``I_K`` is the identity kernel (1 at the centre tap of output channel o's own input
channel, per group). Exact in exact arithmetic; computed in float64 and cast back.

Refused (``skipped:<reason>`` in the stats), never miscompiled: branches with different strides,
dilations, groups or channel counts (``mismatch``); kernels whose centres do not line up: the
offset ``padding - dilation*(k-1)/2`` must be the same integer for every branch and dimension
(``misaligned``); non-zero padding modes (``padding-mode``); an identity branch beside a strided
conv or with C_in != C_out (``identity-shape``); a conv whose output is also used elsewhere or
whose weights are not constants (its branch is simply left out of the merge).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from graphopt.pass_manager import Numerics, Pass, PassContext, PassResult
from graphopt.passes.fold_conv_bn import (
    _as_bn,
    _as_layer,
    _call_counts,
    _param_owners,
    bn_affine,
)
from graphopt.pipeline import register_pass

_ADDS = {operator.add, torch.add, operator.iadd}
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class _Branch:
    node: fx.Node  # the leaf of the sum
    kind: str  # conv | bn | identity
    weight: torch.Tensor | None = None  # float64 [O, I/g, k...]
    bias: torch.Tensor | None = None  # float64 [O]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    scale: torch.Tensor | None = None  # identity branches: per-channel a (and shift t in bias)
    input: Any = None  # the node the branch reads (x)
    padding_mode: str = "zeros"


def _tuple(v: Any, dims: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),) * dims


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2


def _leaves(node: fx.Node, root: fx.Node) -> list[fx.Node]:
    """The operands of the add tree rooted at ``node`` (inner adds used only by the tree)."""
    out: list[fx.Node] = []
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            return []  # a scalar in the sum: not a branch structure
        if _is_add(arg) and len(arg.users) == 1 and arg is not root:
            inner = _leaves(arg, root)
            if not inner:
                return []
            out += inner
        else:
            out.append(arg)
    return out


def _conv_branch(gm: fx.GraphModule, leaf: fx.Node, single_use: bool = True) -> _Branch | None:
    layer = _as_layer(gm, leaf, include_linear=False)
    if layer is None or layer.kind != "conv" or not layer.constant:
        return None
    if single_use and len(leaf.users) != 1:
        return None
    if layer.module is not None:
        m = layer.module
        stride, dilation, padding = m.stride, m.dilation, m.padding
    else:
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        v = dict(zip(names, leaf.args, strict=False)) | dict(leaf.kwargs)
        stride, dilation, padding = v.get("stride", 1), v.get("dilation", 1), v.get("padding", 0)
    if isinstance(padding, str):
        return None  # "same"/"valid": rare in re-parameterizable blocks; left alone
    dims = layer.weight.dim() - 2
    weight = layer.weight.detach().double()
    bias = (
        layer.bias.detach().double()
        if layer.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    branch = _Branch(
        leaf,
        "conv",
        weight,
        bias,
        _tuple(stride, dims),
        _tuple(dilation, dims),
        _tuple(padding, dims),
        layer.groups,
    )
    branch.padding_mode = layer.padding_mode
    branch.input = layer.input_node
    return branch


def _bn_branch(gm: fx.GraphModule, leaf: fx.Node) -> _Branch | None:
    bn = _as_bn(gm, leaf)
    if bn is None or bn.training or bn.mean is None or not bn.constant:
        return None
    if bn.output_node is not leaf or len(leaf.users) != 1:
        return None
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    branch = _Branch(leaf, "bn", bias=t.double(), scale=a.double())
    branch.input = bn.input_node
    return branch


def merge_branches(branches: list[_Branch], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one kernel and bias equal to the sum of ``branches`` (float64; checked beforehand)."""
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    dims = ref.weight.dim() - 2
    k_max = [max(b.weight.shape[2 + d] for b in convs) for d in range(dims)]
    weight = torch.zeros(ref.weight.shape[:2] + tuple(k_max), dtype=torch.float64)
    bias = torch.zeros(ref.weight.shape[0], dtype=torch.float64)
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
        scale = b.scale if b.scale is not None else torch.ones(channels, dtype=torch.float64)
        for o in range(channels):
            weight[(o, o % per_group) + centre] += scale[o]
        if b.bias is not None:
            bias += b.bias
    return weight, bias


def _why_not(branches: list[_Branch]) -> str:
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
    return ""


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel [O, I/g, k..] as the equivalent dense one [O, I, k..]."""
    if groups == 1:
        return weight
    out, per_group = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros((out, per_group * groups) + tuple(weight.shape[2:]))
    o_g = out // groups
    for g in range(groups):
        dense[g * o_g : (g + 1) * o_g, g * per_group : (g + 1) * per_group] = weight[
            g * o_g : (g + 1) * o_g
        ]
    return dense


def _pointwise(b: _Branch) -> bool:
    return (
        all(k == 1 for k in b.weight.shape[2:])
        and all(s == 1 for s in b.stride)
        and all(p == 0 for p in b.padding)
    )


def _macs(b: _Branch) -> int:
    """Multiply-adds per output pixel of a branch's conv."""
    return int(b.weight.numel())


def _sequential(gm: fx.GraphModule, stats: Counter) -> None:
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        second = _conv_branch(gm, node, single_use=False)
        if second is None or not isinstance(second.input, fx.Node):
            continue
        first = _conv_branch(gm, second.input)
        if first is None or first.weight.dim() != second.weight.dim():
            continue
        reason = ""
        if _pointwise(second) and second.groups == 1:
            w1 = _dense(first.weight, first.groups)
            w2 = second.weight.flatten(1)  # [O, M]
            weight = torch.einsum("om,mi...->oi...", w2, w1)
            bias = w2 @ first.bias + second.bias
            outer, pad_mode = first, first.padding_mode
        elif _pointwise(first) and first.groups == 1:
            pad_mode = second.padding_mode
            if any(second.padding) and pad_mode == "zeros" and bool(first.bias.abs().max() > 0):
                reason = "bias-at-padding"
            w1 = first.weight.flatten(1)  # [M, I]
            w2 = _dense(second.weight, second.groups)
            weight = torch.einsum("om...,mi->oi...", w2, w1)
            bias = second.bias + (w2.flatten(2).sum(-1) @ first.bias)
            outer = second
        else:
            continue
        if not reason and weight.numel() > (_macs(first) + _macs(second)):
            reason = "more-macs"
        if reason:
            stats[f"skipped:{reason}"] += 1
            continue
        merged = _Branch(node, "conv", weight, bias, outer.stride, outer.dilation, outer.padding, 1)
        new = _new_conv(gm, merged, outer.padding, pad_mode, _dtype(gm, [first, second]))
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_module(new, (first.input,))
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        gm.graph.erase_node(first.node)
        stats["collapsed-sequential"] += 1


_MULS = {operator.mul, torch.mul}
_SUBS = {operator.sub, torch.sub}
_DIVS = {operator.truediv, torch.div}
_TRANSPOSES = {torch.transpose}


def _constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj.detach().double() if isinstance(obj, torch.Tensor) else None
    return None


def _per_feature(c: torch.Tensor, features: int) -> torch.Tensor | None:
    """``c`` as a vector over the last dimension (length ``features``), if it is one."""
    if c.numel() == 1:
        return c.reshape(1).expand(features).clone()
    if c.numel() == features and c.shape[-1] == features:
        return c.reshape(features)
    return None


def _affine(gm: fx.GraphModule, node: fx.Node, features: int) -> tuple[fx.Node, Any, Any] | None:
    """``node`` as ``a * x + t`` per feature of the last dim: (x, a, t), or None."""
    if node.op == "call_function" and len(node.args) == 2 and not node.kwargs:
        x, c = node.args
        if not isinstance(x, fx.Node) and node.target in _MULS | _ADDS:
            x, c = c, x  # c * x, c + x
        const = _constant(gm, c)
        vec = _per_feature(const, features) if const is not None else None
        if not isinstance(x, fx.Node) or vec is None:
            return None
        ones, zeros = (
            torch.ones(features, dtype=torch.float64),
            torch.zeros(features, dtype=torch.float64),
        )
        if node.target in _MULS:
            return x, vec, zeros
        if node.target in _ADDS:
            return x, ones, vec
        if node.target in _SUBS and node.args[0] is x:
            return x, ones, -vec
        if node.target in _DIVS and node.args[0] is x and bool((vec != 0).all()):
            return x, 1 / vec, zeros
        return None
    # transpose -> BatchNorm1d -> transpose: BN over the feature axis of (N, T, C)
    inner = _is_swap(node)
    if inner is None:
        return None
    bn = _as_bn(gm, inner)
    if bn is None or bn.training or bn.mean is None or bn.mean.numel() != features:
        return None
    source = _is_swap(bn.input_node) if isinstance(bn.input_node, fx.Node) else None
    if source is None or len(bn.input_node.users) != 1 or len(inner.users) != 1:
        return None
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    return source, a.double(), t.double()


def _is_swap(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if it swaps the last two dims of a rank-3 tensor, else None."""
    rank = len(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
    if rank != 3 or not isinstance(node.args[0] if node.args else None, fx.Node):
        return None
    if (
        node.op == "call_method"
        and node.target == "transpose"
        or (node.op == "call_function" and node.target in _TRANSPOSES)
    ):
        dims = {d % 3 for d in node.args[1:3]}
        return node.args[0] if dims == {1, 2} else None
    if node.op == "call_method" and node.target == "permute":
        order = node.args[1:] if len(node.args) > 2 else node.args[1]
        return node.args[0] if [d % 3 for d in order] == [0, 2, 1] else None
    return None


def _chain_end(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The last node of a single-use affine chain after ``node``: its only user, or for
    transpose -> BatchNorm1d -> transpose the second transpose."""
    users = list(node.users)
    if len(users) != 1:
        return None
    first = users[0]
    if _is_swap(first) is node and len(first.users) == 1:
        bn = next(iter(first.users))
        if _as_bn(gm, bn) is not None and len(bn.users) == 1:
            return next(iter(bn.users))
    return first


def _affine_linear(gm: fx.GraphModule, stats: Counter) -> None:
    calls, owners = _call_counts(gm), _param_owners(gm)
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        layer = _as_layer(gm, node, include_linear=True)
        if layer is None or layer.kind != "linear" or layer.module is None:
            continue  # F.linear is left alone: its weights may be read elsewhere
        if calls[id(layer.module)] != 1 or owners[id(layer.module.weight)] != 1:
            continue  # a shared Linear: changing it would change its other uses
        m = layer.module
        out_f, in_f = m.weight.shape
        weight = m.weight.detach().double()
        bias = (
            m.bias.detach().double()
            if m.bias is not None
            else torch.zeros(out_f, dtype=torch.float64)
        )
        # after: the Linear's only use is a per-feature affine of it
        end = _chain_end(gm, node)
        if end is not None and (aff := _affine(gm, end, out_f)) is not None and aff[0] is node:
            _, a, t = aff
            _set_linear(m, weight * a[:, None], a * bias + t)
            end.replace_all_uses_with(node)
            node.meta = dict(end.meta)
            stats["folded-affine"] += 1
            continue
        # before: the Linear's input is a per-feature affine used only by it
        x = layer.input_node
        if isinstance(x, fx.Node) and len(x.users) == 1 and (aff := _affine(gm, x, in_f)):
            source, a, t = aff
            _set_linear(m, weight * a[None, :], bias + weight @ t)
            node.replace_input_with(x, source)
            stats["folded-affine"] += 1


def _set_linear(m: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype = m.weight.dtype
    with torch.no_grad():
        m.weight.copy_(weight.to(dtype))
        if m.bias is None:
            m.bias = nn.Parameter(bias.to(dtype))
        else:
            m.bias.copy_(bias.to(dtype))


_MERGES = ("collapsed", "collapsed-sequential", "folded-affine")  # stats that change the graph


@register_pass
class Reparameterize(Pass):
    """Collapse parallel linear branches summed on one input (RepVGG, ACNet, MobileOne) into one
    convolution: kernels padded to the largest, centred, and summed; identity and identity-BN
    branches become the identity kernel."""

    name = "reparameterize"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        while True:  # each rule can enable the other (SESR: kxk->1x1 merged, then + x)
            sweep: Counter = Counter()
            _sequential(gm, sweep)
            _affine_linear(gm, sweep)
            for node in list(gm.graph.nodes):
                if node.graph is None or not _is_add(node) or not node.users:
                    continue
                users = list(node.users)
                if len(users) == 1 and _is_add(users[0]):
                    continue  # an inner add: its root handles the whole sum
                self._collapse(gm, node, sweep)
            if not any(sweep[k] for k in _MERGES):
                stats.update(sweep)  # the refusals of the last, fixed-point sweep
                break
            stats.update({k: v for k, v in sweep.items() if not k.startswith("skipped")})
            gm.graph.eliminate_dead_code()  # the replaced sums: never collapse them again
        modified = any(stats[k] for k in _MERGES)
        if modified:
            gm.delete_all_unused_submodules()
            gm.recompile()
        stats["convs"] = sum(
            1
            for n in gm.graph.nodes
            if (layer := _as_layer(gm, n, include_linear=False)) is not None
            and layer.kind == "conv"
        )
        return PassResult(gm, modified=modified, stats=+stats)

    def _collapse(self, gm: fx.GraphModule, root: fx.Node, stats: Counter) -> None:
        leaves = _leaves(root, root)
        if len(leaves) < 2:
            return
        by_input: dict[fx.Node, list[_Branch]] = {}
        rest: list[fx.Node] = []
        for leaf in leaves:
            branch = _conv_branch(gm, leaf) or _bn_branch(gm, leaf)
            if branch is None:
                rest.append(leaf)
                continue
            by_input.setdefault(branch.input, []).append(branch)
        for x, branches in by_input.items():
            if x in leaves:  # x itself is summed too: an identity branch
                branches.append(_Branch(x, "identity"))
        merged: list[fx.Node] = []
        used: set[fx.Node] = set()
        for x, branches in by_input.items():
            convs = [b for b in branches if b.kind == "conv"]
            if not convs or len(branches) < 2:
                continue
            reason = _why_not(branches)
            if reason:
                stats[f"skipped:{reason}"] += 1
                continue
            merged.append(self._replace(gm, root, x, branches))
            used.update(b.node for b in branches)
            stats["collapsed"] += 1
            stats["branches-merged"] += len(branches)
        if not merged:
            return
        operands = merged + [leaf for leaf in leaves if leaf not in used]
        with gm.graph.inserting_before(root):
            total = operands[0]
            for operand in operands[1:]:
                total = gm.graph.call_function(operator.add, (total, operand))
                total.meta = dict(root.meta)
        root.replace_all_uses_with(total)

    def _replace(
        self, gm: fx.GraphModule, root: fx.Node, x: fx.Node, branches: list[_Branch]
    ) -> fx.Node:
        ref = next(b for b in branches if b.kind == "conv")
        dims = ref.weight.dim() - 2
        channels = ref.weight.shape[0]
        weight, bias = merge_branches(branches, channels)
        convs = [b for b in branches if b.kind == "conv"]
        padding = tuple(
            max(
                b.padding[d] + ref.dilation[d] * (weight.shape[2 + d] - b.weight.shape[2 + d]) // 2
                for b in convs
            )
            for d in range(dims)
        )
        merged = _Branch(root, "conv", weight, bias, ref.stride, ref.dilation, padding, ref.groups)
        name = _new_conv(gm, merged, padding, "zeros", _dtype(gm, convs))
        with gm.graph.inserting_before(root):
            node = gm.graph.call_module(name, (x,))
        node.meta = dict(root.meta)
        return node


def _dtype(gm: fx.GraphModule, branches: list[_Branch]) -> torch.dtype:
    for b in branches:
        if b.node.op == "call_module":
            for p in gm.get_submodule(b.node.target).parameters():
                return p.dtype
    return torch.float32


def _new_conv(
    gm: fx.GraphModule, b: _Branch, padding: tuple[int, ...], mode: str, dtype: torch.dtype
) -> str:
    """Register a conv module holding ``b``'s float64 weight and bias; return its name."""
    dims = b.weight.dim() - 2
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
    )
    with torch.no_grad():
        conv.weight.copy_(b.weight)
        conv.bias.copy_(b.bias)
    conv.to(dtype)
    name = _free_name(gm, "reparam")
    gm.add_submodule(name, conv)
    return name


def _free_name(gm: fx.GraphModule, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"

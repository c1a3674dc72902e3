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
conv or with C_in != C_out (``identity-shape``); a merge that would move a read of ``x`` past
an in-place write to ``x`` or a view of it (``a = conv3(x); x.mul_(2); b = conv1(x)``:
``written-in-place``); a conv whose output is also used elsewhere or whose weights are not
constants (its branch is simply left out of the merge). In-place statements whose result is
unused (``v.mul_(s)``) are never dropped by the clean-up between sweeps.

Every rule leaves alone what ``forward`` writes in place (``written-in-place``, counted where a
merge was refused): a conv or Linear whose weight or bias, a BatchNorm whose statistics or affine
parameters, a per-channel constant (``* self.s``) whose value an in-place op changes
(``self.conv.weight.data.mul_(0.9)``, ``self.bn.running_mean.add_(d)``, through a view or a
tensor sharing the memory). Merged, every later call would use the values of the call before
the pass. In a sum, such a branch stays a term of its own and the others still merge. The
in-place rule (what writes, what aliases, which attributes) is eliminate-dead-code's
(:func:`~graphopt.passes.eliminate_dead_code.written_storages`,
:func:`~graphopt.passes.eliminate_dead_code.may_alias_input`).

Merged layers get the model's dtype, rounded once from the float64 result (a float64 model is
merged at float64 precision), and normal parameters also under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.algebra.conv_merge import dense_kernel, regroup
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.passes._tensors import as_normal, as_parameter
from graphopt.passes.eliminate_dead_code import (
    may_alias_input,
    mutates_input,
    remove_dead_nodes,
    storage_key,
    written_storages,
)
from graphopt.passes.fold_conv_bn import (
    _as_bn,
    _as_layer,
    _call_counts,
    _param_owners,
    _rank,
    bn_affine,
)

aten = torch.ops.aten
# in-place forms (``out += y``; aten's add_) mutate their first operand: _binary requires that
# operand to have no other use, so reading it as an out-of-place op is sound
_INPLACE = {operator.iadd, operator.isub, operator.imul, aten.add_.Tensor, aten.sub_.Tensor}
_INPLACE |= {aten.mul_.Tensor}
_ADDS = {operator.add, torch.add, operator.iadd, aten.add.Tensor, aten.add_.Tensor}
_SUBS = {operator.sub, torch.sub, operator.isub, aten.sub.Tensor, aten.sub_.Tensor}
_MULS = {operator.mul, torch.mul, operator.imul, aten.mul.Tensor, aten.mul_.Tensor}
_DIVS = {operator.truediv, torch.div, aten.div.Tensor}
_TRANSPOSES = {torch.transpose}
_BINARY = {"mul": _MULS, "add": _ADDS, "sub": _SUBS, "div": _DIVS}
_CATS = {torch.cat, torch.concat, aten.cat.default}
_PADS = {F.pad, aten.pad.default, aten.constant_pad_nd.default}
_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_POOL_FUNCTIONS |= {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2}
_POOL_FUNCTIONS |= {aten.avg_pool3d.default: 3}
_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_F64 = torch.float64
_FC_MAX = 4096  # conv -> FC: at most this many input features (the identity basis is n x n)


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
    scale: torch.Tensor | None = None  # bn / identity: per-channel a (shift t is the bias)
    input: Any = None  # the node the branch reads (x)
    padding_mode: str = "zeros"
    pool: bool = False  # an average pool written as a depthwise conv
    dtype: torch.dtype | None = None  # the model's dtype of the weights (they are float64 here)
    written: bool = False  # forward writes its weights (or BN statistics) in place: not merged


# ------------------------------------------------------------------------------------------------
# node predicates


def _binary(node: fx.Node, functions: set, method: str) -> bool:
    if node.op == "call_function" and node.target in functions:
        if node.target in _INPLACE and (
            not isinstance(node.args[0], fx.Node) or len(node.args[0].users) != 1
        ):
            return False
        return len(node.args) == 2 and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target == method and len(node.args) == 2


def _is_add(node: fx.Node) -> bool:
    return _binary(node, _ADDS, "add")


def _is_sub(node: fx.Node) -> bool:
    return _binary(node, _SUBS, "sub")


def _is_sum(node: fx.Node) -> bool:
    """An add or subtract of two graph values (not of a scalar)."""
    return (_is_add(node) or _is_sub(node)) and all(isinstance(a, fx.Node) for a in node.args)


def _is_pad(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _PADS


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


# The float64 copies of the weights, for one run of the pass (every sweep looks at every conv
# again; a weight only changes by being replaced, never in place). The dict holds each tensor it
# converted, so no id in it can be reused while it lives; outside a run nothing is cached.
_RUN_CACHE: ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar(
    "reparameterize_float64", default=None
)


@dataclass
class _Writes:
    """What the graph says about in-place writes, worked out once per run: mutates_input binds
    the call's signature, slow to ask again for every node at every candidate merge. A node's
    target never changes in a run and no rule adds a write (one a merge drops only leaves
    ``storages`` larger than it need be: more refusals, never a wrong merge)."""

    mutates: dict[fx.Node, bool] = field(default_factory=dict)  # the node writes an input
    aliases: dict[fx.Node, bool] = field(default_factory=dict)  # may share its operand's memory
    storages: set[int] | None = None  # the memory of the attributes forward writes


_RUN_WRITES: ContextVar[_Writes | None] = ContextVar("reparameterize_writes", default=None)


@contextmanager
def float64_weights() -> Iterator[None]:
    """Within: :func:`_f64` converts each weight once (one run of a pass that reads weights many
    times; the weights must not be modified in place within it), and which nodes write in place
    is worked out once per node."""
    token, writes = _RUN_CACHE.set({}), _RUN_WRITES.set(_Writes())
    try:
        yield
    finally:
        _RUN_CACHE.reset(token)
        _RUN_WRITES.reset(writes)


def _per_node(table: str, rule: Any, gm: fx.GraphModule, node: fx.Node) -> bool:
    """``rule(gm, node)``, worked out once per node in a run (kept in the run's ``table``)."""
    memo = _RUN_WRITES.get()
    if memo is None:
        return rule(gm, node)
    seen = getattr(memo, table)
    if node not in seen:
        seen[node] = rule(gm, node)
    return seen[node]


def _mutates(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _per_node("mutates", mutates_input, gm, node)


def _written(gm: fx.GraphModule, *tensors: torch.Tensor | None) -> bool:
    """``forward`` writes one of ``tensors`` (or memory it shares) in place
    (``self.conv.weight.data.mul_(s)``, ``self.bn.running_mean.add_(d)``): merged, every later
    call would use the values they had when the pass ran (eliminate-dead-code's rule)."""
    memo = _RUN_WRITES.get()
    if memo is None:
        keys = written_storages(gm)
    else:
        if memo.storages is None:
            memo.storages = written_storages(gm)
        keys = memo.storages
    return any(t is not None and storage_key(t) in keys for t in tensors)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 (callers never modify the result in place)."""
    cache = _RUN_CACHE.get()
    if cache is None:
        return t.detach().double()
    hit = cache.get(id(t))
    if hit is None or hit[0] is not t:
        hit = cache[id(t)] = (t, t.detach().double())
    return hit[1]


def _aliases(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s value may share memory with its first operand, a graph value (a view, or an
    in-place op, which returns the tensor it wrote): eliminate-dead-code's rule, once per node
    in a run."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return _per_node("aliases", may_alias_input, gm, node)


def _written_before(gm: fx.GraphModule, x: Any, end: fx.Node) -> bool:
    """Whether an in-place op writes to ``x`` (or a tensor sharing its memory) after ``x`` is
    first read and before ``end``: a merge that moves the reads of ``x`` to ``end`` would then
    read the written value where the original read the old one (``a = conv3(x); x.mul_(2);
    b = conv1(x); a + b``). A write before every read changes nothing."""
    if not isinstance(x, fx.Node):
        return False
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    alias, stack = {x}, [x]
    while stack:  # x's alias class: its bases and the views and in-place results of it
        node = stack.pop()
        near = [u for u in node.users if _aliases(gm, u)]
        if _aliases(gm, node):
            near.append(node.args[0])
        for n in near:
            if n not in alias:
                alias.add(n)
                stack.append(n)
    writes = [
        n
        for n in x.graph.nodes
        if _mutates(gm, n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in alias
    ]
    reads = [order[u] for u in x.users if u not in writes and u not in alias]  # views read nothing
    start = min(reads, default=order[x])
    return any(start < order[n] < order[end] for n in writes)


def _tuple(v: Any, dims: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),) * dims


def _constant(gm: fx.GraphModule, arg: Any, writable: bool = False) -> torch.Tensor | None:
    """``arg`` as a float64 constant: a number, or an attribute that ``forward`` does not write
    in place (``writable``: also one it writes, only to name a refusal)."""
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=_F64)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or (not writable and _written(gm, obj)):
            return None  # written in place: a different value at every call
        return obj.detach().double()
    return None


def _vector(c: torch.Tensor, rank: int | None, axis: int) -> torch.Tensor | None:
    """``c`` as a vector along ``axis`` of a rank-``rank`` tensor it broadcasts against: shape
    [n], or [1] for a scalar; None if it varies along any other axis."""
    if c.numel() == 1:
        return c.reshape(1)
    rank = c.dim() if rank is None and axis < 0 else rank
    if rank is None or c.dim() > rank:
        return None
    shape = (1,) * (rank - c.dim()) + tuple(c.shape)
    axis %= rank
    if any(s != 1 for i, s in enumerate(shape) if i != axis):
        return None
    return c.reshape(-1)


def _full(v: torch.Tensor, n: int) -> torch.Tensor | None:
    """A [1] or [n] vector as [n]; None for any other length."""
    if v.numel() == 1:
        return v.reshape(1).expand(n).clone()
    return v.reshape(n) if v.numel() == n else None


def _constant_operand(
    gm: fx.GraphModule, node: fx.Node, axis: int, writable: bool = False
) -> tuple[fx.Node, str, torch.Tensor, bool] | None:
    """``node`` as a binary op (``mul``, ``add``, ``sub``, ``div``; not in place) of a graph
    value ``x`` and a constant that is a vector along ``axis`` ([n], or [1] for a scalar):
    ``(x, op, vector, x is the first operand)``, or None (``writable``: see :func:`_constant`)."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs or node.target in _INPLACE:
        return None
    op = next((name for name, targets in _BINARY.items() if node.target in targets), None)
    if op is None:
        return None
    x, c = node.args
    if _constant(gm, x, writable) is not None:
        x, c = c, x  # c * x, c + x, c - x
    const = _constant(gm, c, writable)
    if not isinstance(x, fx.Node) or _constant(gm, x, writable) is not None or const is None:
        return None
    vec = _vector(const, _rank(node), axis)
    return (x, op, vec, node.args[0] is x) if vec is not None else None


def _scaled(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``node`` as ``c * inner`` (or ``inner / c``) with ``c`` a constant per channel (axis 1)."""
    found = _constant_operand(gm, node, 1)
    if found is None:
        return None
    x, op, vec, x_first = found
    if op == "mul":
        return x, vec
    if op == "div" and x_first and bool((vec != 0).all()):
        return x, 1 / vec
    return None


def _times(c: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    return factor if c is None else c * factor


def _expand(gm: fx.GraphModule, node: fx.Node, root: fx.Node) -> list:
    """The terms of a signed, per-channel-scaled sum that ``node`` contributes: (leaf, coef)."""
    if node is root or len(node.users) != 1:
        return [(node, None)]
    if _is_sum(node):
        return _terms(gm, node, root)
    scaled = _scaled(gm, node)
    if scaled is not None:
        inner, vec = scaled
        return [(leaf, _times(c, vec)) for leaf, c in _expand(gm, inner, root)]
    return [(node, None)]


def _terms(gm: fx.GraphModule, node: fx.Node, root: fx.Node) -> list:
    a, b = node.args
    second = _expand(gm, b, root)
    if _is_sub(node):
        minus = torch.tensor([-1.0], dtype=_F64)
        second = [(leaf, _times(c, minus)) for leaf, c in second]
    return _expand(gm, a, root) + second


def _inner(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A sum whose value only feeds a bigger sum (possibly through a per-channel scale): the
    bigger sum's root handles it."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    if _is_sum(user):
        return True
    scaled = _scaled(gm, user)
    return (
        scaled is not None
        and scaled[0] is node
        and len(user.users) == 1
        and _is_sum(next(iter(user.users)))
    )


# ------------------------------------------------------------------------------------------------
# branches


def _conv_branch(gm: fx.GraphModule, leaf: fx.Node, single_use: bool = True) -> _Branch | None:
    """``leaf`` as a convolution (or an average pool, as a depthwise one) with constant weights."""
    if single_use and len(leaf.users) != 1:
        return None
    layer = _as_layer(gm, leaf, include_linear=False)
    if layer is None:
        return _pool_branch(gm, leaf)
    if layer.kind != "conv" or not layer.constant:
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
    weight = _f64(layer.weight)
    bias = _f64(layer.bias) if layer.bias is not None else torch.zeros(weight.shape[0], dtype=_F64)
    return _Branch(
        leaf,
        "conv",
        weight,
        bias,
        _tuple(stride, dims),
        _tuple(dilation, dims),
        _tuple(padding, dims),
        layer.groups,
        input=layer.input_node,
        padding_mode=layer.padding_mode,
        dtype=layer.weight.dtype,
        written=_written(gm, layer.weight, layer.bias),
    )


def _pool_branch(gm: fx.GraphModule, leaf: fx.Node) -> _Branch | None:
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
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
        v = dict(zip([*names, "divisor_override"], leaf.args, strict=False)) | dict(leaf.kwargs)
        x, kernel, stride, padding = v["input"], v["kernel_size"], v.get("stride"), v.get("padding")
        ceil, include = v.get("ceil_mode", False), v.get("count_include_pad", True)
        divisor = v.get("divisor_override")
    else:
        return None
    kernel = _tuple(kernel, dims)
    stride = _tuple(stride if stride not in (None, [], ()) else kernel, dims)
    padding = _tuple(padding or 0, dims)
    shape = _shape(x)
    if ceil or divisor or (not include and any(padding)) or shape is None or len(shape) != dims + 2:
        return None
    channels = int(shape[1])
    weight = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=_F64)
    zeros = torch.zeros(channels, dtype=_F64)
    return _Branch(
        leaf, "conv", weight, zeros, stride, (1,) * dims, padding, channels, input=x, pool=True
    )


def _affine_branch(b: _Branch, a: torch.Tensor, t: torch.Tensor | float = 0.0) -> _Branch:
    """The branch ``a * b(x) + t`` (``a``, ``t`` per output channel or scalars)."""
    if b.kind == "conv":
        view = (-1,) + (1,) * (b.weight.dim() - 1)
        return replace(b, weight=b.weight * a.reshape(view), bias=b.bias * a + t)
    scale = a if b.scale is None else b.scale * a
    bias = t if b.bias is None else b.bias * a + t
    return replace(b, scale=scale, bias=torch.as_tensor(bias, dtype=_F64).reshape(-1))


def _bn_branch(gm: fx.GraphModule, leaf: fx.Node) -> _Branch | None:
    """An eval BatchNorm of ``x`` (the identity-BN branch), or of a conv/pool of ``x`` (folded)."""
    bn = _as_bn(gm, leaf)
    if bn is None or bn.training or bn.mean is None or not bn.constant:
        return None
    if bn.output_node is not leaf or len(leaf.users) != 1:
        return None
    a, t = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
    written = _written(gm, bn.mean, bn.var, bn.gamma, bn.beta)
    inner = _conv_branch(gm, bn.input_node) if isinstance(bn.input_node, fx.Node) else None
    if inner is not None:  # conv/pool -> BN that fold-conv-bn left (after a pool, shared conv)
        return replace(_affine_branch(inner, a, t), node=leaf, written=inner.written or written)
    return _Branch(leaf, "bn", bias=t, scale=a, input=bn.input_node, written=written)


def merge_branches(branches: list[_Branch], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        scale = _full(b.scale if b.scale is not None else ones, channels)
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


def _merged_padding(branches: list[_Branch], weight: torch.Tensor) -> tuple[int, ...]:
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    return tuple(
        max(
            b.padding[d] + ref.dilation[d] * (weight.shape[2 + d] - b.weight.shape[2 + d]) // 2
            for b in convs
        )
        for d in range(weight.dim() - 2)
    )


def _pointwise(b: _Branch) -> bool:
    return (
        all(k == 1 for k in b.weight.shape[2:])
        and all(s == 1 for s in b.stride)
        and all(p == 0 for p in b.padding)
    )


def _macs(b: _Branch) -> int:
    """Multiply-adds per output pixel of a branch's conv."""
    return int(b.weight.numel())


# ------------------------------------------------------------------------------------------------
# sequential: conv -> [explicit pad] -> conv/pool


@dataclass
class _Pad:
    """An explicit constant pad in front of a conv: ``pad(source)`` (+ ``shift``), border value
    ``border`` per channel (shape [1] or [C]); ``nodes`` are what to erase once merged."""

    source: fx.Node
    amounts: tuple[int, ...]  # symmetric padding per spatial dim
    border: torch.Tensor
    shift: torch.Tensor
    nodes: list[fx.Node] = field(default_factory=list)


def _explicit_pad(gm: fx.GraphModule, node: Any, dims: int) -> _Pad | None:
    """``node`` as a constant pad of a tensor, in the forms DiverseBranchBlock's BN-and-pad
    takes: ``F.pad(z, p, value=c)``; ``F.pad(z, p) + v``; ``F.pad(z, p)`` then in-place writes
    of ``v`` over the border rows and columns (the reference ``BNAndPadLayer``; FX cannot trace
    item assignment, so capture uses torch.export, which writes them as slice -> copy_)."""
    if not isinstance(node, fx.Node):
        return None
    shift, nodes = torch.zeros(1, dtype=_F64), []
    found = _constant_operand(gm, node, 1) if len(node.users) == 1 else None
    if found is not None and found[1] == "add":
        pad, _, vec, _ = found
        if not _is_pad(pad) or len(pad.users) != 1:
            return None
        shift, nodes, node = vec, [node], pad
    if not _is_pad(node):
        return None
    names = ["input", "pad", "value"] if node.target is aten.constant_pad_nd.default else None
    names = names or ["input", "pad", "mode", "value"]
    v = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    pads = list(v["pad"])
    if v.get("mode", "constant") != "constant" or len(pads) % 2 or len(pads) > 2 * dims:
        return None
    pads += [0] * (2 * dims - len(pads))
    if any(pads[2 * i] != pads[2 * i + 1] for i in range(dims)):
        return None  # asymmetric: no conv padding expresses it
    amounts = tuple(int(pads[2 * i]) for i in reversed(range(dims)))
    border = shift + float(v.get("value") or 0.0)
    chains = {u: _write_chain(u) for u in node.users}
    writes = [chain for chain in chains.values() if chain is not None]
    readers = [u for u, chain in chains.items() if chain is None]
    if len(readers) != 1:
        return None
    if writes:
        if nodes:
            return None
        value = _border_writes(gm, node, writes, readers[0], amounts)
        if value is None:
            return None
        border = value
    dead = [n for chain in writes for n in reversed(chain)]
    return _Pad(node.args[0], amounts, border, shift, [*nodes, *dead, node])


def _write_chain(node: fx.Node) -> list[fx.Node] | None:
    """``node`` (a user of a padded tensor) as an in-place write into a region of it, aten's
    slice -> ... -> slice -> ``copy_``: the nodes, in order; None if it is anything else."""
    chain = [node]
    while chain[-1].target is aten.slice.Tensor and len(chain[-1].users) == 1:
        chain.append(next(iter(chain[-1].users)))
    last = chain[-1]
    if len(chain) < 2 or last.op != "call_function" or last.target is not aten.copy_.default:
        return None
    return None if last.users else chain


def _write_region(chain: list[fx.Node], rank: int) -> tuple[tuple, Any] | None:
    """The index (one slice per dim) and the value of a write chain."""
    index = [slice(None)] * rank
    for s in chain[:-1]:
        args = [*s.args, None, None, None, 1][1:5]
        dim, start, end, step = (int(args[0]) % rank, args[1], args[2], args[3] or 1)
        if index[dim] != slice(None) or step != 1:
            return None
        index[dim] = slice(start, end)
    return tuple(index), chain[-1].args[1]


def _border_writes(
    gm: fx.GraphModule,
    pad: fx.Node,
    writes: list[list[fx.Node]],
    reader: fx.Node,
    amounts: tuple[int, ...],
) -> torch.Tensor | None:
    """The per-channel value that the write chains put on exactly the padded border, before
    ``reader`` reads it; None if they do anything else."""
    shape = _shape(pad)
    if shape is None:
        return None
    order = {n: i for i, n in enumerate(pad.graph.nodes)}
    written = torch.zeros(shape[2:], dtype=torch.bool)
    value = None
    full = slice(None)
    for chain in writes:
        region = _write_region(chain, len(shape))
        if region is None or order[chain[-1]] > order[reader]:
            return None
        index, val = region
        if index[:2] != (full, full):
            return None
        # x.expand(region) only broadcasts x; with a dynamic batch the region's size is
        # symbolic and constant folding leaves the expand: read the value it broadcasts
        while isinstance(val, fx.Node) and (
            val.target is torch.ops.aten.expand.default
            or (val.op == "call_method" and val.target == "expand")
        ):
            val = val.args[0]
        const = _constant(gm, val)
        vec = _channel_values(const, len(shape)) if const is not None else None
        if vec is None or (value is not None and not torch.equal(vec, value)):
            return None
        value = vec
        written[index[2:]] = True
    interior = torch.ones_like(written)
    interior[tuple(slice(a, n - a) for a, n in zip(amounts, shape[2:], strict=True))] = False
    return value if torch.equal(written, interior) else None


def _channel_values(c: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A per-channel constant, also when already broadcast to a region's shape (aten graphs
    write ``v.expand(region)``, which constant folding turns into a full tensor)."""
    vec = _vector(c, rank, 1)
    if vec is not None or c.dim() != rank:
        return vec
    vec = c[(0, slice(None)) + (0,) * (rank - 2)]
    shape = (1, -1) + (1,) * (rank - 2)
    return vec if torch.equal(vec.reshape(shape).expand_as(c), c) else None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(a.abs().max()), float(b.abs().max()))
    return bool((a - b).abs().max() <= 1e-6 * scale)


def _absorbed(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: torch.Tensor) -> bool:
    """Whether ``node`` is (through per-channel ops) a term of a sum that also holds a conv of
    ``x`` with a kernel at least as large as ``weight``'s: the parallel rule will then fold the
    merged kernel into that conv, so its extra multiply-adds are never paid."""
    cur, root = node, None
    for _ in range(8):
        if len(cur.users) != 1:
            break
        cur = next(iter(cur.users))
        if _is_sum(cur):
            root = cur
        elif root is not None:
            break
    if root is None:
        return False
    for leaf, _ in _terms(gm, root, root):
        if leaf is node:
            continue
        b = _conv_branch(gm, leaf) or _bn_branch(gm, leaf)
        if (
            b is not None
            and b.kind == "conv"
            and not b.pool
            and not b.written  # stays apart: the merged kernel's multiply-adds would be paid
            and b.input is x
            and all(k >= m for k, m in zip(b.weight.shape[2:], weight.shape[2:], strict=True))
        ):
            return True
    return False


def _sequential(gm: fx.GraphModule, stats: Counter) -> None:
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        second = _conv_branch(gm, node, single_use=False)
        if second is None or not isinstance(second.input, fx.Node):
            continue
        dims = second.weight.dim() - 2
        pad = None if _pointwise(second) else _explicit_pad(gm, second.input, dims)
        if pad is not None:
            if second.padding_mode != "zeros" or (any(second.padding) and pad.border.any()):
                continue  # a zero ring outside a non-zero border: no single padding says that
            padding = tuple(a + b for a, b in zip(pad.amounts, second.padding, strict=True))
            second = replace(second, padding=padding, input=pad.source)
        first = _conv_branch(gm, second.input)
        if first is None or first.weight.dim() != second.weight.dim():
            continue
        reason = ""
        w1, w2 = (
            dense_kernel(first.weight, first.groups),
            dense_kernel(second.weight, second.groups),
        )
        if _pointwise(second) and not second.pool:
            weight = torch.einsum("om,mi...->oi...", w2.flatten(1), w1)
            bias = w2.flatten(1) @ first.bias + second.bias
            outer, pad_mode = first, first.padding_mode
        elif _pointwise(first):
            pad_mode = second.padding_mode
            b1 = first.bias + (pad.shift if pad is not None else 0.0)
            border = pad.border if pad is not None else torch.zeros(1, dtype=_F64)
            if any(second.padding) and pad_mode == "zeros" and not _close(b1, border):
                reason = "bias-at-padding"  # the border of conv1(x) is not conv1's bias
            weight = torch.einsum("om...,mi->oi...", w2, w1.flatten(1))
            bias = second.bias + (w2.flatten(2).sum(-1) @ b1)
            outer = second
        else:
            continue
        groups = math.gcd(first.groups, second.groups)
        grouped = regroup(weight, groups)
        if grouped is None:
            groups, grouped = 1, weight
        weight = grouped
        if not reason and (first.written or second.written):
            reason = "written-in-place"  # forward changes a weight: merged, it would not
        if not reason and _written_before(gm, first.input, node):
            reason = "written-in-place"  # the merged conv would read x after the write
        more = weight.numel() > _macs(first) + _macs(second)
        if not reason and more and not _absorbed(gm, node, first.input, weight):
            reason = "more-macs"
        if reason:
            stats[f"skipped:{reason}"] += 1
            continue
        merged = _Branch(
            node, "conv", weight, bias, outer.stride, outer.dilation, outer.padding, groups
        )
        new = _new_conv(gm, merged, outer.padding, pad_mode, _dtype(gm, node, (first, second)))
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_module(new, (first.input,))
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        for dead in [*(pad.nodes if pad is not None else []), first.node]:
            if not dead.users:
                gm.graph.erase_node(dead)
        stats["collapsed-sequential"] += 1


# ------------------------------------------------------------------------------------------------
# per-channel affines next to a Linear or a conv


def _affine(
    gm: fx.GraphModule, node: fx.Node, features: int, axis: int = -1, writable: bool = False
) -> tuple[fx.Node, Any, Any] | None:
    """``node`` as ``a * x + t`` per feature along ``axis``: (x, a, t), or None; ``a`` and ``t``
    from constants and BN statistics that ``forward`` does not write in place (``writable``:
    also those it writes, only to name a refusal)."""
    found = _constant_operand(gm, node, axis, writable)
    if found is not None:
        x, op, vec, x_first = found
        vec = _full(vec, features)
        if vec is None:
            return None
        ones, zeros = torch.ones(features, dtype=_F64), torch.zeros(features, dtype=_F64)
        if op == "mul":
            return x, vec, zeros
        if op == "add":
            return x, ones, vec
        if op == "sub":
            return (x, ones, -vec) if x_first else (x, -ones, vec)
        if op == "div" and x_first and bool((vec != 0).all()):
            return x, 1 / vec, zeros
        return None
    if axis != -1:
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
    if not writable and _written(gm, bn.mean, bn.var, bn.gamma, bn.beta):
        return None  # the statistics change at every call
    a, t = bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps)
    return source, a.double(), t.double()


def _is_swap(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if it swaps the last two dims of a rank-3 tensor, else None."""
    if _rank(node) != 3 or not isinstance(node.args[0] if node.args else None, fx.Node):
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
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(out_f, dtype=_F64)
        written = _written(gm, m.weight, m.bias)
        # after: the Linear's only use is a per-feature affine of it
        end = _chain_end(gm, node)
        after = _affine(gm, end, out_f, writable=True) if end is not None else None
        if after is not None and after[0] is node:
            if not written and (aff := _affine(gm, end, out_f)) is not None:
                _, a, t = aff
                _set_linear(m, weight * a[:, None], a * bias + t)
                end.replace_all_uses_with(node)
                node.meta = dict(end.meta)
                stats["folded-affine"] += 1
                continue
            # forward writes the weights or the affine's constants in place: they change
            stats["skipped:written-in-place"] += 1
            if written:
                continue
        # before: the Linear's input is a per-feature affine used only by it
        x = layer.input_node
        if isinstance(x, fx.Node) and len(x.users) == 1 and _affine(gm, x, in_f, writable=True):
            aff = None if written else _affine(gm, x, in_f)
            if aff is None:  # the weights or the affine's constants written in place
                stats["skipped:written-in-place"] += 1
                continue
            source, a, t = aff
            if _written_before(gm, source, node):
                stats["skipped:written-in-place"] += 1
                continue
            _set_linear(m, weight * a[None, :], bias + weight @ t)
            node.replace_input_with(x, source)
            stats["folded-affine"] += 1


def _affine_conv(gm: fx.GraphModule, stats: Counter) -> None:
    """A conv whose only use is a per-channel affine (``* c``, ``+ c``, ``- c``, ``/ c``, an eval
    BatchNorm) becomes one conv (a new module: a shared conv module is never changed)."""
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        b = _conv_branch(gm, node)
        if b is None or b.pool:
            continue  # pools stay pools unless they merge with a conv
        user = next(iter(node.users))
        bn = _as_bn(gm, user)
        if bn is not None:
            if bn.training or bn.mean is None or not bn.constant or bn.input_node is not node:
                continue
            a, t = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
            end, dead = bn.output_node, [bn.output_node, bn.node]
            written = b.written or _written(gm, bn.mean, bn.var, bn.gamma, bn.beta)
        else:
            aff = _affine(gm, user, b.weight.shape[0], axis=1, writable=True)
            if aff is None or aff[0] is not node:
                continue
            _, a, t = aff
            end, dead = user, [user]
            written = b.written or _affine(gm, user, b.weight.shape[0], axis=1) is None
        if written:  # forward writes the weights, statistics or constants in place
            stats["skipped:written-in-place"] += 1
            continue
        if _written_before(gm, b.input, end):
            stats["skipped:written-in-place"] += 1
            continue
        merged = _affine_branch(b, a, t)
        name = _new_conv(gm, merged, b.padding, b.padding_mode, _dtype(gm, node, (b,)))
        with gm.graph.inserting_before(end):
            conv = gm.graph.call_module(name, (b.input,))
        conv.meta = dict(end.meta)
        end.replace_all_uses_with(conv)
        for n in [*dict.fromkeys(dead), node]:
            if n.graph is not None and not n.users:
                gm.graph.erase_node(n)
        stats["folded-affine"] += 1


def _set_linear(m: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """New parameters (never an in-place write: the old ones may be inference tensors, and the
    run's float64 cache relies on weights not changing in place)."""
    m.weight = as_parameter(weight.to(m.weight.dtype), m.weight.requires_grad)
    m.bias = as_parameter(bias.to(m.weight.dtype), m.weight.requires_grad)


# ------------------------------------------------------------------------------------------------
# concatenation of convs of one input (DBB transform IV)


def _concat(gm: fx.GraphModule, stats: Counter) -> None:
    """``cat([conv_a(x), conv_b(x), ...], dim=1)``: consecutive convs of one input with the same
    kernel size, stride, padding and dilation become one conv with the kernels stacked."""
    for node in list(gm.graph.nodes):
        if node.graph is None or node.op != "call_function" or node.target not in _CATS:
            continue
        v = dict(zip(["tensors", "dim"], node.args, strict=False)) | dict(node.kwargs)
        items, rank = list(v["tensors"]), _rank(node)
        if rank is None or int(v.get("dim", 0)) % rank != 1:
            continue
        branches = [
            _conv_branch(gm, t) if isinstance(t, fx.Node) and items.count(t) == 1 else None
            for t in items
        ]
        # forward writes a conv's weights in place: it stays a conv of its own
        if any(b is not None and b.written for b in branches) and sum(map(bool, branches)) > 1:
            stats["skipped:written-in-place"] += 1
        branches = [None if b is None or b.written else b for b in branches]
        out: list[Any] = []
        i = 0
        while i < len(items):
            j = i + 1
            ref = branches[i]
            if ref is not None and _written_before(gm, ref.input, node):
                ref = None  # x is written between the convs and the cat: they stay apart
            while ref is not None and j < len(items) and _stackable(ref, branches[j]):
                j += 1
            if j - i < 2:
                out.append(items[i])
                i += 1
                continue
            run = branches[i:j]
            weight = torch.cat([b.weight for b in run])
            bias = torch.cat([b.bias for b in run])
            merged = replace(ref, weight=weight, bias=bias)
            name = _new_conv(gm, merged, ref.padding, "zeros", _dtype(gm, ref.node, run))
            with gm.graph.inserting_before(node):
                conv = gm.graph.call_module(name, (ref.input,))
            conv.meta = dict(ref.node.meta)
            out.append(conv)
            stats["merged-concat"] += 1
            i = j
        if len(out) == len(items):
            continue
        if len(out) == 1:
            node.replace_all_uses_with(out[0])
        else:
            with gm.graph.inserting_before(node):
                cat = gm.graph.call_function(torch.cat, (out, 1))
            cat.meta = dict(node.meta)
            node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)


def _stackable(ref: _Branch, b: _Branch | None) -> bool:
    return (
        b is not None
        and not ref.pool
        and not b.pool
        and b.input is ref.input
        and ref.groups == 1
        and b.groups == 1
        and b.padding_mode == ref.padding_mode == "zeros"
        and b.weight.shape[1:] == ref.weight.shape[1:]
        and (b.stride, b.padding, b.dilation) == (ref.stride, ref.padding, ref.dilation)
    )


# ------------------------------------------------------------------------------------------------
# conv branches into a fully connected layer (RepMLP)


@dataclass
class _FC:
    """``reshape(fc(reshape(x)))`` back to x's layout, optionally followed by a per-channel
    affine (``scale``, ``shift``): RepMLP's partition perceptron."""

    leaf: fx.Node
    out: fx.Node  # the reshape back to [N, O, h, w]
    fc: fx.Node
    module: nn.Module
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    written: bool = False  # forward writes the FC's weights or the BN's statistics in place


def _fc_leaf(gm: fx.GraphModule, leaf: fx.Node, x: fx.Node) -> _FC | None:
    node, scale, shift, written = leaf, None, None, False
    bn = _as_bn(gm, leaf)
    if bn is not None:
        if bn.training or bn.mean is None or not bn.constant or bn.output_node is not leaf:
            return None
        scale, shift = (v.double() for v in bn_affine(bn.mean, bn.var, bn.gamma, bn.beta, bn.eps))
        written = _written(gm, bn.mean, bn.var, bn.gamma, bn.beta)
        node = bn.input_node
    if not isinstance(node, fx.Node) or len(node.users) != 1 or not node.args:
        return None
    fc = node.args[0]
    if not isinstance(fc, fx.Node) or fc.op != "call_module" or len(fc.users) != 1:
        return None
    m = gm.get_submodule(fc.target)
    flat = fc.args[0] if fc.args else None
    if not isinstance(flat, fx.Node) or not flat.args or flat.args[0] is not x:
        return None
    xs, fs, outs = _shape(x), _shape(flat), _shape(node)
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
    return _FC(leaf, node, fc, m, scale, shift, written or _written(gm, m.weight, m.bias))


def _reshape_like(node: fx.Node) -> bool:
    """A row-major reshape (the shapes, checked by the caller, say which)."""
    if node.op == "call_method":
        return node.target in ("reshape", "view", "flatten")
    return node.op == "call_function" and node.target in (torch.reshape, torch.flatten)


def _into_fc(gm: fx.GraphModule, fc: _FC, branches: list[_Branch], x: fx.Node) -> str:
    """Fold the conv branches of ``x`` into the FC; return a refusal reason or ''."""
    if fc.written:
        return "written-in-place"  # merged, the FC would keep the values of one call
    convs = [b for b in branches if b.kind == "conv"]
    ref = convs[0]
    n, c, h, w = _shape(x)
    if any(s != 1 for s in ref.stride) or ref.weight.dim() != 4:
        return "fc-stride"
    if c * h * w > _FC_MAX:
        return "fc-too-large"
    out_c = ref.weight.shape[0]
    weight, bias = merge_branches(branches, out_c)
    padding = _merged_padding(branches, weight)
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
    total = fc_dense + matrix
    total = regroup(total, groups)
    if total is None:
        return "fc-groups"  # the convs mix channel groups that the grouped FC keeps apart
    dtype = m.weight.dtype
    with torch.inference_mode(False), torch.no_grad():  # normal parameters, as in _new_conv
        new = (
            nn.Linear(m.in_features, m.out_features, dtype=dtype)
            if isinstance(m, nn.Linear)
            else nn.Conv2d(m.in_channels, m.out_channels, 1, groups=groups, dtype=dtype)
        )
        new.weight.copy_(total.reshape(new.weight.shape))
        new.bias.copy_(fc_b + bias.repeat_interleave(h * w))
    name = _free_name(gm, "reparam_fc")
    gm.add_submodule(name, new)
    with gm.graph.inserting_before(fc.fc):
        node = gm.graph.call_module(name, fc.fc.args)
    node.meta = dict(fc.fc.meta)
    fc.fc.replace_all_uses_with(node)
    gm.graph.erase_node(fc.fc)
    return ""


# ------------------------------------------------------------------------------------------------
# the pass


_MERGES = ("collapsed", "collapsed-sequential", "folded-affine", "merged-concat", "merged-into-fc")


@register_pass
class Reparameterize(Pass):
    """Collapse linear structures (parallel branches, conv chains, affines, concatenations,
    conv branches beside an FC) into one layer: RepVGG, ACNet, DBB, MobileOne, FastViT, SESR,
    RepMLP, SLAB."""

    name = "reparameterize"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        with float64_weights():
            stats = self._sweeps(gm)
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

    def _sweeps(self, gm: fx.GraphModule) -> Counter:
        stats: Counter = Counter()
        while True:  # each rule can enable the others (SESR: kxk->1x1 merged, then + x)
            sweep: Counter = Counter()
            _affine_conv(gm, sweep)
            _sequential(gm, sweep)
            _affine_linear(gm, sweep)
            _concat(gm, sweep)
            for node in list(gm.graph.nodes):
                if node.graph is None or not _is_sum(node) or not node.users:
                    continue
                if not _inner(gm, node):
                    self._collapse(gm, node, sweep)
            if not any(sweep[k] for k in _MERGES):
                stats.update(sweep)  # the refusals of the last, fixed-point sweep
                return stats
            stats.update({k: v for k, v in sweep.items() if not k.startswith("skipped")})
            remove_dead_nodes(gm)  # the replaced sums (never collapse them again), not in-place ops

    def _collapse(self, gm: fx.GraphModule, root: fx.Node, stats: Counter) -> None:
        terms = _terms(gm, root, root)
        if len(terms) < 2:
            return
        found = [(_conv_branch(gm, leaf) or _bn_branch(gm, leaf)) for leaf, _ in terms]
        by_input: dict[fx.Node, list[int]] = {}
        for i, b in enumerate(found):
            if b is not None:
                by_input.setdefault(b.input, []).append(i)
        for i, (leaf, _) in enumerate(terms):
            if found[i] is None and leaf in by_input:  # x itself is summed: an identity branch
                found[i] = _Branch(leaf, "identity", input=leaf)
                by_input[leaf].append(i)
        operands: list[tuple[fx.Node, Any]] = []
        used: set[int] = set()
        for x, idxs in by_input.items():
            # forward writes a branch's weights in place: it stays a term of its own
            if any(found[i].written for i in idxs):
                if len(idxs) > 1:
                    stats["skipped:written-in-place"] += 1
                idxs = [i for i in idxs if not found[i].written]
            branches = [
                _affine_branch(found[i], c) if (c := terms[i][1]) is not None else found[i]
                for i in idxs
            ]
            if not any(b.kind == "conv" for b in branches):
                continue
            reason = _why_not(branches)
            if not reason and _written_before(gm, x, root):
                reason = "written-in-place"  # x changes between the branches' reads and the sum
            fc = next(
                (
                    (j, f)
                    for j, (leaf, c) in enumerate(terms)
                    if j not in idxs and c is None and (f := _fc_leaf(gm, leaf, x))
                ),
                None,
            )
            if fc is not None and not reason:
                refused = _into_fc(gm, fc[1], branches, x)
                if not refused:
                    operands.append((fc[1].out, None))
                    used.update([*idxs, fc[0]])
                    stats["merged-into-fc"] += 1
                    stats["branches-merged"] += len(branches)
                    continue
                stats[f"skipped:{refused}"] += 1
            if len(branches) < 2:
                continue
            if reason:
                stats[f"skipped:{reason}"] += 1
                continue
            operands.append((self._replace(gm, root, x, branches), None))
            used.update(idxs)
            stats["collapsed"] += 1
            stats["branches-merged"] += len(branches)
        if not operands:
            return
        operands += [term for i, term in enumerate(terms) if i not in used]
        with gm.graph.inserting_before(root):
            total = _scaled_node(gm, root, *operands[0])
            for leaf, coef in operands[1:]:
                if coef is not None and coef.numel() == 1 and float(coef) == -1.0:
                    total = gm.graph.call_function(operator.sub, (total, leaf))
                else:
                    total = gm.graph.call_function(
                        operator.add, (total, _scaled_node(gm, root, leaf, coef))
                    )
                total.meta = dict(root.meta)
        root.replace_all_uses_with(total)
        _erase_tree(gm, root)

    def _replace(
        self, gm: fx.GraphModule, root: fx.Node, x: fx.Node, branches: list[_Branch]
    ) -> fx.Node:
        ref = next(b for b in branches if b.kind == "conv")
        weight, bias = merge_branches(branches, ref.weight.shape[0])
        padding = _merged_padding(branches, weight)
        merged = _Branch(root, "conv", weight, bias, ref.stride, ref.dilation, padding, ref.groups)
        name = _new_conv(gm, merged, padding, "zeros", _dtype(gm, root, branches))
        with gm.graph.inserting_before(root):
            node = gm.graph.call_module(name, (x,))
        node.meta = dict(root.meta)
        return node


def _erase_tree(gm: fx.GraphModule, root: fx.Node) -> None:
    """Erase a replaced sum and the sums and scales under it that nothing else reads (dead-code
    elimination keeps in-place adds, which count as side effects)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.graph is None or node.users:
            continue
        if node is not root and not (_is_sum(node) or _scaled(gm, node)):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        gm.graph.erase_node(node)
        stack += args


def _scaled_node(gm: fx.GraphModule, root: fx.Node, leaf: fx.Node, coef: Any) -> fx.Node:
    """``leaf`` times its per-channel coefficient, as graph nodes (a constant for the scale)."""
    if coef is None:
        return leaf
    rank = _rank(root) or 1
    shape = (-1,) + (1,) * (rank - 2) if coef.numel() > 1 else (1,)
    name = _free_name(gm, "reparam_scale")
    gm.register_buffer(name, as_normal(coef.reshape(shape).to(_dtype(gm, root))))
    const = gm.graph.get_attr(name)
    node = gm.graph.call_function(operator.mul, (leaf, const))
    node.meta = dict(root.meta)
    return node


def _dtype(gm: fx.GraphModule, node: fx.Node, branches: Any = ()) -> torch.dtype:
    """The dtype a new layer computing ``node`` gets: ``node``'s own, else its branches'
    weights' (a graph without shape annotations), else float32."""
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((b.dtype for b in branches if b is not None and b.dtype), torch.float32)


def _new_conv(
    gm: fx.GraphModule, b: _Branch, padding: tuple[int, ...], mode: str, dtype: torch.dtype
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
    name = _free_name(gm, "reparam")
    gm.add_submodule(name, conv)
    return name


def _free_name(gm: fx.GraphModule, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"

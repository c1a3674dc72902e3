"""remove-identity: drop operations that return their input unchanged.

The rules, each ``pattern -> replacement``:

    Identity(x)                     -> x
    Dropout*(x)       (eval mode)   -> x        F.dropout(x, training=False) -> x
    x.contiguous()                  -> x
    x.to(dtype) / x.float() ...     -> x        when x already has that dtype (from shape metadata)
    reshape/view/flatten(x, ...)    -> x        when the shape is provably unchanged for any batch
    permute(x, 0..n-1), transpose(x, i, i) -> x
    x * 1, 1 * x, x / 1, x + 0, 0 + x, x - 0 -> x   when the result has x's shape and dtype

Not removed (counted as ``skipped:<reason>``): dropout in training mode (``dropout-training``);
a reshape whose target equals the traced shape only for the traced batch size
(``reshape-static-batch``); ``x*1``, ``x+0``, ``x.contiguous()`` whose result a user then
changes in place (``inplace-user``: without the copy, the write would change ``x``); a
``.contiguous()`` whose result a ``view`` reads, directly or through other views
(``contiguous-before-view``: Swin's ``x.permute(...).contiguous().view(...)``; ``x``'s strides
may not allow the view), unless the strides recorded at capture prove ``x`` contiguous (not a
graph input, row-major strides, no size-1 dimension: the strides cannot prove it for every
batch size when a dimension has size 1: a batch of 1 hides a permutation).
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.fx.effects import may_alias_input, mutates_input

_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.dropout,
}
_RESHAPES = {"reshape", "view", torch.reshape}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16}
_NEUTRAL = {
    operator.mul: 1,
    torch.mul: 1,
    operator.truediv: 1,
    torch.div: 1,
    operator.add: 0,
    torch.add: 0,
    operator.sub: 0,
    torch.sub: 0,
}
_COMMUTATIVE = {operator.mul, torch.mul, operator.add, torch.add}
_NEW_TENSOR = {"mul-one", "add-zero", "contiguous"}
# ops that need their input's strides to allow the new shape without a copy
_VIEWS = {"view", "view_as", torch.Tensor.view, torch.Tensor.view_as, torch.ops.aten.view.default}


def _meta(node: Any) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    ma, mb = _meta(a), _meta(b)
    return (
        ma is not None
        and mb is not None
        and hasattr(ma, "shape")
        and hasattr(mb, "shape")
        and tuple(ma.shape) == tuple(mb.shape)
        and ma.dtype == mb.dtype
    )


@register_pass
class RemoveIdentity(Pass):
    """Remove Identity, eval-mode Dropout, no-op casts/reshapes/permutes and x*1, x+0."""

    name = "remove-identity"
    numerics = Numerics.exact()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            kind, source = self._match(gm, node)
            if kind is None:
                continue
            if kind.startswith("skipped:"):
                stats[kind] += 1
                continue
            # x*1, x+0 and .contiguous() return a new tensor: where a user then writes to it in
            # place, removing them would make that write change x
            if kind in _NEW_TENSOR and any(mutates_input(gm, u) for u in node.users):
                stats["skipped:inplace-user"] += 1
                continue
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            stats[kind] += 1
        removed = sum(v for k, v in stats.items() if not k.startswith("skipped:"))
        if removed:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=removed > 0, stats=stats)

    def _match(self, gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, Any]:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Identity):
                return "identity", node.args[0]
            if isinstance(m, _DROPOUT_MODULES):
                # dropout is the identity only at inference
                return (
                    ("skipped:dropout-training", None) if m.training else ("dropout", node.args[0])
                )
            return None, None
        if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            training = node.kwargs.get(
                "training", node.args[2] if len(node.args) > 2 else node.target is not torch.dropout
            )
            if node.target is torch.dropout:
                training = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
            if training is False:
                return "dropout", node.args[0]
            return "skipped:dropout-training", None
        if node.op == "call_method" and node.target == "contiguous":
            # x.permute(...).contiguous().view(...): view needs the copy's strides
            if _feeds_view(gm, node) and not _provably_contiguous(node.args[0]):
                return "skipped:contiguous-before-view", None
            return "contiguous", node.args[0]
        if node.op == "call_method" and node.target in ("to", "type") + tuple(_CASTS):
            return self._cast(node)
        if node.target in _RESHAPES or node.target in ("flatten", torch.flatten):
            return self._reshape(node)
        if node.target in ("permute", torch.permute, "transpose", torch.transpose):
            return self._permute(node)
        if node.op == "call_function" and node.target in _NEUTRAL:
            return self._neutral(node)
        return None, None

    @staticmethod
    def _cast(node: fx.Node) -> tuple[str | None, Any]:
        src = node.args[0]
        if not isinstance(src, fx.Node) or _meta(src) is None or node.kwargs:
            return None, None
        if node.target in _CASTS:
            wanted = _CASTS[node.target]
        elif len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
            wanted = node.args[1]
        else:
            return None, None  # .to(device), .to(other_tensor): not provably a no-op
        return ("cast", src) if _meta(src).dtype == wanted else (None, None)

    @staticmethod
    def _reshape(node: fx.Node) -> tuple[str | None, Any]:
        src = node.args[0]
        if not isinstance(src, fx.Node) or not _same_type(src, node):
            return None, None
        shape = _meta(src).shape
        if node.target in ("flatten", torch.flatten):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            rank = len(shape)
            start, end = start % max(rank, 1), end % max(rank, 1)
            # flattening a single dimension (or none) changes nothing, for any batch size
            return ("flatten", src) if end - start <= 0 or rank == 0 else (None, None)
        spec = list(node.args[1:])
        if len(spec) == 1 and isinstance(spec[0], list | tuple | torch.Size):
            spec = list(spec[0])
        if len(spec) != len(shape):
            return None, None
        # dim 0 is the batch: it must be -1 or read from the same tensor; the rest must match
        first = spec[0]
        batch_safe = first == -1 or (isinstance(first, fx.Node) and _is_size_of(first, src, 0))
        # (the shapes are equal, so with the batch fixed a single -1 can only be the traced dim)
        rest_equal = all(
            isinstance(s, int) and s in (d, -1) for s, d in zip(spec[1:], shape[1:], strict=True)
        )
        if rest_equal and sum(1 for s in spec if s == -1) <= 1:
            return ("reshape", src) if batch_safe else ("skipped:reshape-static-batch", None)
        return None, None

    @staticmethod
    def _permute(node: fx.Node) -> tuple[str | None, Any]:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return None, None
        if node.target in ("transpose", torch.transpose):
            if len(node.args) == 3 and node.args[1] == node.args[2]:
                return "transpose", src
            return None, None
        dims = list(node.args[1:])
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = list(dims[0])
        return ("permute", src) if dims == list(range(len(dims))) and dims else (None, None)

    @staticmethod
    def _neutral(node: fx.Node) -> tuple[str | None, Any]:
        if len(node.args) != 2 or node.kwargs:
            return None, None
        a, b = node.args
        neutral = _NEUTRAL[node.target]
        label = "mul-one" if neutral == 1 else "add-zero"
        for x, c in ((a, b), (b, a)) if node.target in _COMMUTATIVE else ((a, b),):
            if (
                isinstance(x, fx.Node)
                and not isinstance(c, fx.Node)
                and c == neutral
                and not isinstance(c, bool)
                and _same_type(x, node)
            ):
                return label, x
        return None, None


def _provably_contiguous(src: Any) -> bool:
    """``src`` is contiguous for every batch size, by the strides recorded at capture: exactly
    the row-major strides of its shape, no dimension of size 1 (whose stride hides a
    permutation: a transposed batch of 1 looks contiguous), and not a graph input (the caller
    may pass any strides)."""
    meta = _meta(src)
    if meta is None or src.op == "placeholder" or getattr(meta, "stride", None) is None:
        return False
    shape = tuple(meta.shape)
    if not shape or any(d <= 1 for d in shape):
        return False
    expected, step = [], 1
    for d in reversed(shape):
        expected.append(step)
        step *= d
    return tuple(meta.stride) == tuple(reversed(expected))


def _feeds_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``view`` reads ``node``'s value, directly or through ops that may return a view of it
    (``x.contiguous().transpose(1, 2).view(...)``): without the copy, ``view`` could see strides
    it cannot reshape (Swin's and MaxViT's window partition)."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op in ("call_method", "call_function") and user.target in _VIEWS:
            return True
        if may_alias_input(gm, user):
            stack.extend(user.users)
    return False


def _is_size_of(node: fx.Node, tensor: fx.Node, dim: int) -> bool:
    """``node`` is ``tensor.size(dim)`` or ``tensor.shape[dim]``."""
    if node.op == "call_method" and node.target == "size" and node.args[0] is tensor:
        return (node.args[1] if len(node.args) > 1 else None) == dim
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == dim:
        inner = node.args[0]
        return isinstance(inner, fx.Node) and (
            (
                inner.op == "call_function"
                and inner.target is getattr
                and inner.args[0] is tensor
                and inner.args[1] == "shape"
            )
            or (
                inner.op == "call_method"
                and inner.target == "size"
                and inner.args[0] is tensor
                and len(inner.args) == 1
            )
        )
    return False

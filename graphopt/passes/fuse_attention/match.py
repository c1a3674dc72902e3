"""Finding attention and residual-add + LayerNorm in an FX graph (torch-level or aten ops).

Attention, matmul form (vit_s, timm's ``fused_attn=False``, Hugging Face's eager attention)::

    o = softmax(q @ transpose(k, -2, -1) [* c | / c] [+ mask], dim=-1) [-> eval dropout] @ v
    o = softmax((q * c) @ transpose(k, -2, -1) [+ mask], dim=-1) @ v

and ``F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, False, scale)`` (timm's
``fused_attn``, Hugging Face's sdpa, ``aten.scaled_dot_product_attention``). q, k, v are
float32 ``[B, N, S|T, H]``; the mask broadcasts as ``[B|1, N|1, S, T]``.

Residual add + LayerNorm::

    s = a + b;  y = layer_norm(s, (D,), weight, bias, eps)     (s may have other users)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.fx.layers import call_args, shape
from graphopt.fx.names import fetch_attr
from graphopt.fx.ops import DIVS, MULS, is_add
from graphopt.fx.uses import value_users

aten = torch.ops.aten

SOFTMAX = {torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default}
MATMUL = {torch.matmul, operator.matmul, aten.matmul.default}
TRANSPOSE = {torch.transpose, aten.transpose.int}
SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
LAYER_NORM = {F.layer_norm, aten.layer_norm.default}
DROPOUT = {F.dropout, aten.dropout.default}


@dataclass
class Attention:
    """One attention to fuse: its inputs, how the scores were scaled, and the nodes it
    replaces (``output`` last)."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    form: str  # FusedAttention's forms: sdpa, mul, div, q, none
    scale: float | None
    nodes: list[fx.Node]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def is_call(node: fx.Node, functions: set, method: str | None = None) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return method is not None and node.op == "call_method" and node.target == method


def match_sdpa(node: fx.Node) -> Attention | str | None:
    """``node`` as an SDPA call: an :class:`Attention`, a refusal reason, or None."""
    if not is_call(node, SDPA):
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
    a = call_args(node, names, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False})
    if a.get("dropout_p"):  # dropout in the attention: not a deterministic op to fuse
        return "dropout"
    if a.get("is_causal"):  # MultiHeadAttention's unidirectional masks differently for S != T
        return "causal"
    if a.get("enable_gqa"):  # fewer key/value heads than query heads
        return "grouped-query"
    if isinstance(a.get("scale"), fx.Node):
        return "scale-not-constant"
    return Attention(
        a["query"], a["key"], a["value"], a["attn_mask"], "sdpa", a.get("scale"), [node]
    )


def match_softmax(gm: fx.GraphModule, node: fx.Node) -> Attention | str | None:
    """``softmax(scores) @ v`` ending at softmax ``node``: an :class:`Attention`, a refusal
    reason, or None where ``node`` is no softmax feeding a matmul."""
    if not is_call(node, SOFTMAX, "softmax") or not _last_axis_softmax(node):
        return None
    nodes = [node]
    user = _single_user(node)
    while user is not None and (_is_eval_dropout(gm, user) or _is_same_dtype_cast(user)):
        nodes.append(user)
        user = _single_user(user)
    if user is None or not is_call(user, MATMUL, "matmul") or user.args[0] is not nodes[-1]:
        return None
    v = user.args[1]
    nodes.append(user)
    scores = node.args[0]
    mask, form, scale = None, "none", None
    if isinstance(scores, fx.Node) and is_add(scores):  # scores + mask
        scores, mask = _scores_and_mask(scores, nodes)
    if isinstance(scores, fx.Node) and _is_scalar_op(scores, MULS, "mul"):
        nodes.insert(0, scores)
        scores, scale, form = _tensor_operand(scores), _scalar_operand(scores), "mul"
    elif isinstance(scores, fx.Node) and _is_scalar_op(scores, DIVS, "div"):
        nodes.insert(0, scores)
        scores, scale, form = scores.args[0], scores.args[1], "div"
    if not isinstance(scores, fx.Node) or not is_call(scores, MATMUL, "matmul"):
        return "no-scores-matmul"
    nodes.insert(0, scores)
    q, kt = scores.args[0], scores.args[1]
    if form == "none" and isinstance(q, fx.Node) and _is_scalar_op(q, MULS, "mul"):
        form, scale = "q", _scalar_operand(q)
        if len(value_users(q)) == 1:
            nodes.insert(0, q)
        q = _tensor_operand(q)
    k = _untransposed(kt)
    if k is None:
        return "key-not-transposed"
    if len(value_users(kt)) == 1:
        nodes.insert(0, kt)
    if any(len(n.users) != 1 for n in nodes[:-1]):  # the scores are read elsewhere
        return "intermediate-used"
    return Attention(q, k, v, mask, form, scale, nodes)


def _last_axis_softmax(node: fx.Node) -> bool:
    a = call_args(node, ["input", "dim"], {"dim": None})
    if node.target is aten._softmax.default and len(node.args) > 2 and node.args[2]:
        return False  # half_to_float
    dims = shape(node)
    dim = a.get("dim")
    # softmax(x, dtype=float32) of a float32 x (Hugging Face's eager attention) is softmax(x)
    same_dtype = a.get("dtype") in (None, dtype_of(node))
    return same_dtype and dims is not None and dim in (-1, len(dims) - 1)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def _is_eval_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return isinstance(mod, nn.Dropout | nn.Identity) and not (mod.training and mod.p)
    if is_call(node, DROPOUT):
        a = call_args(node, ["input", "p", "training"], {"p": 0.5, "training": True})
        return not a["training"] or not a["p"]
    return False


def _is_same_dtype_cast(node: fx.Node) -> bool:
    """``x.to(x.dtype)`` (and ``.type_as`` / ``.float()`` of a float32 ``x``): no op at all."""
    if not (node.op == "call_method" and node.target in ("to", "float", "type_as")):
        return False
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or node.kwargs.keys() - {"dtype"}:
        return False
    return dtype_of(node) == dtype_of(source) is not None


def _scores_and_mask(add: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node | None]:
    """The scores and the additive mask of ``scores + mask`` (the scores: the operand that is a
    matmul or a scaled matmul)."""
    left, right = add.args
    for scores, mask in ((left, right), (right, left)):
        if isinstance(scores, fx.Node) and isinstance(mask, fx.Node) and _is_scores(scores):
            nodes.insert(0, add)
            return scores, mask
    return add, None


def _is_scores(node: fx.Node) -> bool:
    if _is_scalar_op(node, MULS, "mul") or _is_scalar_op(node, DIVS, "div"):
        node = _tensor_operand(node) if _is_scalar_op(node, MULS, "mul") else node.args[0]
    return isinstance(node, fx.Node) and is_call(node, MATMUL, "matmul")


def _is_scalar_op(node: fx.Node, functions: set, method: str) -> bool:
    if not (is_call(node, functions, method) and len(node.args) == 2 and not node.kwargs):
        return False
    a, b = node.args
    number = (int, float)
    if functions is DIVS:
        return isinstance(a, fx.Node) and isinstance(b, number)
    return (isinstance(a, fx.Node) and isinstance(b, number)) or (
        isinstance(b, fx.Node) and isinstance(a, number)
    )


def _tensor_operand(node: fx.Node) -> fx.Node:
    return node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]


def _scalar_operand(node: fx.Node) -> float:
    return float(node.args[1] if isinstance(node.args[0], fx.Node) else node.args[0])


def _untransposed(kt: object) -> fx.Node | None:
    """``k`` where ``kt`` is ``k`` with its last two axes swapped (rank-4 k), else None."""
    if not isinstance(kt, fx.Node) or not kt.args or not isinstance(kt.args[0], fx.Node):
        return None
    dims = shape(kt.args[0])
    if dims is None or len(dims) != 4:
        return None
    if is_call(kt, TRANSPOSE, "transpose") and len(kt.args) == 3:
        return kt.args[0] if {d % 4 for d in kt.args[1:]} == {2, 3} else None
    if is_call(kt, {torch.permute, aten.permute.default}, "permute"):
        perm = (
            kt.args[1]
            if len(kt.args) == 2 and isinstance(kt.args[1], list | tuple)
            else kt.args[1:]
        )
        return kt.args[0] if [p % 4 for p in perm] == [0, 1, 3, 2] else None
    return None


def why_not_attention(att: Attention) -> str:
    """Why MultiHeadAttention cannot compute ``att`` ('' when it can)."""
    q, k, v = (shape(n) for n in (att.q, att.k, att.v))
    if q is None or k is None or v is None:
        return "no-shape"
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        return "rank"
    if any(dtype_of(n) != torch.float32 for n in (att.q, att.k, att.v)):
        return "dtype"
    (b, n, s, h), (bk, nk, t, hk), (bv, nv, tv, hv) = q, k, v
    if (bk, nk, bv, nv) != (b, n, b, n) or hk != h or tv != t:
        return "broadcast"  # MultiHeadAttention takes whole [B, N, T, H] keys and values
    if hv != h:
        return "head-sizes"
    if att.mask is not None:
        m = shape(att.mask) if isinstance(att.mask, fx.Node) else None
        if m is None or len(m) != 4 or m[0] not in (b, 1) or m[1] not in (n, 1) or m[2:] != (s, t):
            return "mask-shape"
        if dtype_of(att.mask) not in (torch.float32, torch.bool):
            return "mask-dtype"
    return ""


def dtype_of(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    return getattr(meta, "dtype", None)


# ------------------------------------------------------------------------------------------------
# residual add + LayerNorm


@dataclass
class AddNorm:
    add: fx.Node
    norm: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def match_add_norm(gm: fx.GraphModule, node: fx.Node) -> AddNorm | str | None:
    """LayerNorm ``node`` over the last axis of a residual sum: an :class:`AddNorm`, a refusal
    reason, or None where ``node`` is no LayerNorm of a sum."""
    found = _layer_norm(gm, node)
    if found is None:
        return None
    x, normalized, weight, bias, eps = found
    if (
        not isinstance(x, fx.Node)
        or not is_add(x)
        or not all(isinstance(a, fx.Node) for a in x.args)
    ):
        return None
    dims = shape(x)
    if weight is None or bias is None:
        return "no-affine"
    if dims is None or len(dims) not in (2, 3) or tuple(normalized) != dims[-1:]:
        return "norm-axes"
    a, b = x.args
    if shape(a) != dims or shape(b) != dims or _symbolic(a) != _symbolic(b):
        return "broadcast"
    if not (_reads_input(a) and _reads_input(b)):  # may broadcast over a dynamic batch
        return "constant-operand"
    if dtype_of(x) != torch.float32:
        return "dtype"
    return AddNorm(x, node, weight, bias, float(eps))


def _layer_norm(gm: fx.GraphModule, node: fx.Node):  # noqa: ANN202
    """(input, normalized_shape, weight, bias, eps) of a LayerNorm call, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.LayerNorm) or len(node.args) != 1:
            return None
        return node.args[0], mod.normalized_shape, mod.weight, mod.bias, mod.eps
    if not is_call(node, LAYER_NORM):
        return None
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    a = call_args(node, names, {"weight": None, "bias": None, "eps": 1e-5})
    tensors = []
    for key in ("weight", "bias"):
        arg = a[key]
        if isinstance(arg, fx.Node) and arg.op != "get_attr":
            return None  # computed affine parameters: not a constant to hand over
        tensors.append(fetch_attr(gm, arg.target) if isinstance(arg, fx.Node) else None)
    return a["input"], a["normalized_shape"], *tensors, a["eps"]


def _symbolic(node: fx.Node) -> tuple[str, ...] | None:
    """The shape ``torch.export`` recorded (``meta["val"]``), symbolic sizes as their names:
    ``(s0, s1, 384)`` against ``(1, s1, 384)`` tells a batch-broadcast operand apart at a batch
    of one."""
    val = node.meta.get("val")
    return tuple(str(d) for d in val.shape) if hasattr(val, "shape") else None


def _reads_input(node: fx.Node) -> bool:
    """Whether ``node``'s value is computed from a graph input (not from stored tensors only,
    such as a position embedding, which a batch of one cannot tell from a batched value)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False

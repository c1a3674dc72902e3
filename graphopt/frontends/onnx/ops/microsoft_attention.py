"""com.microsoft Attention and MultiHeadAttention (ONNX Runtime's fused attention ops).

Per head h (head size d, N heads, scale = the ``scale`` attribute or 1/sqrt(d)):

    out[:, :, h] = softmax(scale q_h k_h^T + mask + attention_bias) v_h

* Attention(x, W, b?, mask_index?, past?, attention_bias?): q, k, v = split(x @ W + b) by
  ``qkv_hidden_sizes`` (thirds by default); W constant becomes an ``nn.Linear``.
* MultiHeadAttention(query, key, value, bias?, key_padding_mask?, attention_bias?): q, k, v =
  query + b_q, key + b_k, value + b_v (b = [b_q, b_k, b_v]).

The mask is ONNX Runtime's: ``mask_filter_value`` (-10000 by default) added to the score of every
key a query may not see -- added, not substituted, so a fully masked row is the unmasked softmax.
A key is hidden by a mask of shape (B) (right padding: keys at and after mask[b]), (B, T) or
(B, S, T) (raw: hidden where mask <= 0), and by ``unidirectional`` (keys after the query; its
fill is added to the mask's).

Refused (the node stays opaque): a key/value cache (past, present, past_key/value,
past_sequence_length, cache_indirection), do_rotary, past_present_share_buffer, a 1-D mask of
another length than the batch (left padding, (2B) or (3B + 2)) or a 4-D mask, MultiHeadAttention's
packed QKV/KV forms (query 5-D, key absent or not 3-D), its ``qk`` output and ``unidirectional``.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.common import set_param
from graphopt.frontends.onnx.ops.contrib import ms_converter
from graphopt.frontends.onnx.values import Value

# -- what the imported graph calls ---------------------------------------------------------------


def mask_bias(
    mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, causal: bool, fill: float
) -> torch.Tensor:
    """The additive mask, (B or 1, 1, S or 1, T): ``fill`` for each of ``mask`` ((B) lengths,
    (B, T) or (B, S, T) raw) and ``causal`` (keys after the query) that hides key t from query s."""
    batch, seq, total = q.shape[0], q.shape[1], k.shape[1]
    allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.dim() == 1 and mask.shape[0] != batch:
            raise ValueError(f"a 1-D mask of length {mask.shape[0]} for batch {batch}")
        if mask.dim() == 1:  # right padding: keys at and after the length are hidden
            positions = torch.arange(total, device=q.device)
            allowed = (positions.unsqueeze(0) < mask.long().unsqueeze(1))[:, None, None, :]
        elif mask.dim() == 2:
            allowed = (mask > 0)[:, None, None, :]
        elif mask.dim() == 3:
            allowed = (mask > 0)[:, None, :, :]
        else:
            raise ValueError(f"a {mask.dim()}-D attention mask")
    bias = (~allowed).to(q.dtype) * fill
    if causal:  # added to the mask's fill, as ONNX Runtime does
        later = torch.ones(seq, total, dtype=torch.bool, device=q.device).triu(1)
        bias = bias + later.to(q.dtype) * fill
    return bias


def add_qkv_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q + b_q, k + b_k, v + b_v), bias = [b_q, b_k, b_v] cut at q's hidden size."""
    hidden = q.shape[-1]
    return q + bias[:hidden], k + bias[hidden : 2 * hidden], v + bias[2 * hidden :]


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    scale: float | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """softmax(scale q k^T + bias) v per head; q (B, S, N d), k (B, T, N d), v (B, T, N dv)
    -> (B, S, N dv); scale None: 1/sqrt(d)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"query, key and value of {q.dim()}, {k.dim()}, {v.dim()} dims, not 3")
    if scale is None:
        scale = (q.shape[-1] // num_heads) ** -0.5

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)

    scores = torch.matmul(heads(q), heads(k).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1), heads(v)).transpose(1, 2).flatten(2)


# -- converters ----------------------------------------------------------------------------------


def _refuse_inputs(ctx: Ctx, inputs: dict[int, str]) -> None:
    for i, what in inputs.items():
        if ctx.has(i):
            raise ctx.fail(
                f"input {what!r} ({i}) is given; graphopt converts attention without a "
                f"key/value cache only"
            )


def _refuse_outputs(ctx: Ctx, outputs: dict[int, str]) -> None:
    for j, what in outputs.items():
        if ctx.output_used(j):
            raise ctx.fail(f"output {what!r} ({j}) is used; only the attention output is converted")


def _check_mask(ctx: Ctx, i: int, batch_input: int) -> None:
    rank = ctx.rank(i)
    if rank is not None and rank not in (1, 2, 3):
        raise ctx.fail(f"a {rank}-D mask (input {i}) is not supported, only 1-D, 2-D and 3-D")
    length, batch = ctx.static_dim(i, 0), ctx.static_dim(batch_input, 0)
    if rank == 1 and length is not None and batch is not None and length != batch:
        raise ctx.fail(
            f"a 1-D mask (input {i}) of length {length} for batch {batch}: only right padding "
            f"(length = batch) is supported, not left padding (2 * batch) or 3 * batch + 2"
        )


def _attend(
    ctx: Ctx, q: Value, k: Value, v: Value, head_size: int | None, mask: int, bias: int
) -> Value:
    """The attention of q, k, v; ``head_size`` None: known at run time only."""
    num_heads = int(ctx.attr("num_heads"))
    scale = float(ctx.attr("scale", 0.0)) or (head_size and 1.0 / math.sqrt(head_size)) or None
    causal = bool(ctx.attr("unidirectional", 0))
    add = None
    if ctx.has(mask) or causal:
        fill = float(ctx.attr("mask_filter_value", -10000.0))
        m = ctx.tensor(mask) if ctx.has(mask) else None
        add = ctx.call(mask_bias, m, q, k, causal, fill)
    if ctx.has(bias):
        add = ctx.tensor(bias) if add is None else ctx.call(torch.add, add, ctx.tensor(bias))
    return ctx.call(multi_head_attention, q, k, v, num_heads, scale, add)


def _qkv_sizes(ctx: Ctx, num_heads: int) -> list[int]:
    sizes = [int(s) for s in ctx.attr("qkv_hidden_sizes", [])]
    if not sizes:
        total = ctx.static_dim(1, 1)
        if total is None or total % 3:
            raise ctx.fail(
                f"without qkv_hidden_sizes the weights' second dim must be a known multiple "
                f"of 3, but it is {total}"
            )
        sizes = [total // 3] * 3
    if len(sizes) != 3 or sizes[0] != sizes[1] or any(s % num_heads for s in sizes):
        raise ctx.fail(f"qkv_hidden_sizes={sizes} for num_heads={num_heads} is not valid")
    return sizes


def _projection(ctx: Ctx) -> Value:
    """x @ W + b, an nn.Linear when W (and b) are constants."""
    x, weights, bias = ctx.tensor(0), ctx.const(1), ctx.value(2)
    if weights is not None and weights.dim() == 2 and (bias is None or ctx.const(2) is not None):
        linear = nn.Linear(weights.shape[0], weights.shape[1], bias=bias is not None)
        set_param(linear, "weight", weights.t())
        set_param(linear, "bias", ctx.const(2))
        return ctx.module(linear.to(weights.dtype), x)
    y = ctx.call(torch.matmul, x, ctx.tensor(1))
    return y if bias is None else ctx.call(torch.add, y, ctx.tensor(2))


@ms_converter("Attention")
def _attention(ctx: Ctx) -> Value:
    for attr in ("do_rotary", "past_present_share_buffer"):
        if ctx.attr(attr, 0):
            raise ctx.fail(f"{attr}={ctx.attr(attr)} is not supported")
    _refuse_inputs(ctx, {4: "past", 6: "past_sequence_length"})
    _refuse_outputs(ctx, {1: "present"})
    sizes = _qkv_sizes(ctx, int(ctx.attr("num_heads")))
    if ctx.has(3):
        _check_mask(ctx, 3, 0)
    qkv = ctx.call(torch.split, _projection(ctx), sizes, -1)
    q, k, v = (ctx.call(operator.getitem, qkv, j) for j in range(3))
    return _attend(ctx, q, k, v, sizes[0] // int(ctx.attr("num_heads")), mask=3, bias=5)


@ms_converter("MultiHeadAttention")
def _multi_head_attention(ctx: Ctx) -> Value:
    _refuse_inputs(
        ctx, {6: "past_key", 7: "past_value", 8: "past_sequence_length", 9: "cache_indirection"}
    )
    _refuse_outputs(ctx, {1: "present_key", 2: "present_value", 3: "qk"})
    if ctx.attr("unidirectional", 0):
        raise ctx.fail("unidirectional=1 is not supported")
    ranks = [ctx.rank(i) for i in range(3)]  # unknown after another contrib op: checked at run
    if not (ctx.has(1) and ctx.has(2)) or any(r not in (3, None) for r in ranks):
        raise ctx.fail(
            f"only separate 3-D query, key and value are supported, not packed QKV/KV or a "
            f"key cache (ranks {ranks})"
        )
    hidden, num_heads = ctx.static_dim(0, 2), int(ctx.attr("num_heads"))
    if hidden is not None and hidden % num_heads:
        raise ctx.fail(f"the query's hidden size {hidden} is not a multiple of num_heads")
    q, k, v = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    if ctx.has(3):
        qkv = ctx.call(add_qkv_bias, q, k, v, ctx.tensor(3))
        q, k, v = (ctx.call(operator.getitem, qkv, j) for j in range(3))
    if ctx.has(4):
        _check_mask(ctx, 4, 0)
    return _attend(ctx, q, k, v, hidden // num_heads if hidden else None, mask=4, bias=5)

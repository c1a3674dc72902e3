"""Attention (opset 23; opset 24's nonpad_kv_seqlen; opset 25's sliding window), written out.

With Q (B, Hq, Lq, D), K (B, Hkv, Lkv, D), V (B, Hkv, Lkv, Dv) -- 3-D inputs (B, L, H*D) are
split into ``q_num_heads`` / ``kv_num_heads`` heads first and merged back at the end:

    K' = concat(past_key, K), V' = concat(past_value, V)      (present_key, present_value)
    s  = sqrt(scale or 1/sqrt(D))                             (in Q's type, on both sides)
    QK = (Q s) (K' s)^T, then softcap * tanh(QK / softcap)    (softcap > 0)
    bias = attn_mask (bool: 0 / -inf; padded with -inf up to Lkv)
           + causal: 0 where key j <= i + offset, else -inf   (offset: len(past), or per batch
                     nonpad_kv_seqlen - Lq, or 0)
           + window: 0 where -left <= (i + offset) - j <= right   (opset 25)
           + padding: 0 for keys j < nonpad_kv_seqlen[b]
    P  = softmax(QK + bias) in softmax_precision; rows whose bias is all -inf give 0
    Y  = P V'   with K', V' heads repeated (h0, h0, h1, h1, ...) for grouped-query attention

``qk_matmul_output`` is, by ``qk_matmul_output_mode``, QK (0), softcapped QK (1), QK + bias (2)
or P (3), as the spec and ONNX Runtime say (ONNX's reference gives mode 0 after the softcap).
bfloat16 is computed in float32, rounded to bfloat16 after each step ONNX's reference rounds
(ONNX Runtime has no bfloat16 kernels for most of the ops the graph exports as). The graph is explicit matmul/softmax/matmul (no
``scaled_dot_product_attention``, which torch's TorchScript exporter rejects), so it exports at
opset 17 op by op.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops.registry import converter
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Value


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _repeat_heads(x: torch.Tensor, reps: int) -> torch.Tensor:
    """Each head ``reps`` times in a row (h0, h0, h1, h1, ...)."""
    if reps == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, reps, s, d).reshape(b, h * reps, s, d)


def _bias_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), -math.inf, dtype=dtype))


def _positions(lq: int, lkv: int, offset: torch.Tensor | int) -> torch.Tensor:
    """(i + offset) - j for query i, key j: (Lq, Lkv), or (B, 1, Lq, Lkv) per batch."""
    i = torch.arange(lq).reshape(lq, 1)
    j = torch.arange(lkv).reshape(1, lkv)
    if isinstance(offset, torch.Tensor):
        return (i + offset.reshape(-1, 1, 1, 1)) - j
    return (i + offset) - j


def _attention_bias(
    q: torch.Tensor,
    lkv: int,
    mask: torch.Tensor | None,
    offset: torch.Tensor | int,
    nonpad: torch.Tensor | None,
    flags: tuple[bool, int, int],
) -> torch.Tensor:
    """The additive bias of the attention scores (see the module docstring)."""
    is_causal, left, right = flags
    lq, dtype = q.shape[2], q.dtype
    bias = torch.zeros((lq, lkv), dtype=dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = _bias_mask(mask, dtype)
        pad = lkv - mask.shape[-1]
        if pad > 0:  # a mask shorter than the keys (past + new): the rest is masked out
            mask = F.pad(mask, [0, pad], value=-math.inf)
        bias = bias + mask.to(dtype)
    diff = _positions(lq, lkv, offset)
    if is_causal:
        bias = bias + _bias_mask(diff >= 0, dtype)
    if left >= 0 or right >= 0:
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        bias = bias + _bias_mask(allowed, dtype)
    if nonpad is not None:
        keep = torch.arange(lkv).reshape(1, lkv) < nonpad.reshape(-1, 1)
        bias = bias + _bias_mask(keep, dtype).reshape(-1, 1, 1, lkv)
    return bias


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; an all -inf row gives zeros (ONNX's reference)."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(top == -math.inf, torch.zeros_like(top), top)
    e = torch.exp(x - top)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def attention_onnx(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    nonpad: torch.Tensor | None,
    options: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Attention: (Y, present_key, present_value, qk_matmul_output). ``options``: (scale,
    is_causal, q_num_heads, kv_num_heads, softcap, qk_matmul_output_mode, softmax dtype, left
    window, right window), scale and the head counts None where absent."""
    scale, is_causal, q_heads, kv_heads, softcap, mode, softmax_dtype, left, right = options
    dtype = q.dtype
    if dtype == torch.bfloat16:  # computed in float32, rounded to bfloat16 where ONNX's is
        q, k, v, mask, past_key, past_value = (
            t if t is None or t.dtype == torch.bool else t.float()
            for t in (q, k, v, mask, past_key, past_value)
        )

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(q.dtype) if dtype != q.dtype else t

    three_d = q.dim() == 3
    if three_d:
        q, k, v = _split_heads(q, q_heads), _split_heads(k, kv_heads), _split_heads(v, kv_heads)
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    s = rounded(torch.tensor(math.sqrt(scale), dtype=q.dtype))
    lq, lkv = q.shape[2], k.shape[2]
    offset: torch.Tensor | int = past_key.shape[2] if past_key is not None else 0
    if nonpad is not None and past_key is None:
        offset = nonpad.reshape(-1) - lq
    bias = _attention_bias(q, lkv, mask, offset, nonpad, (is_causal, left, right))
    reps = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, reps), _repeat_heads(v, reps)
    qk = rounded(torch.matmul(rounded(q * s), rounded(k * s).transpose(2, 3)))
    capped = rounded(torch.tanh(qk / softcap) * softcap) if softcap > 0 else qk
    with_bias = rounded(capped + bias)
    probs = _softmax_rows(with_bias.to(softmax_dtype or q.dtype))
    masked_rows = bias.amax(dim=-1, keepdim=True) == -math.inf
    probs = torch.where(masked_rows, torch.zeros_like(probs), probs)
    # ONNX's modes: 0 the matmul, 1 after softcap, 2 after the bias, 3 after softmax
    qk_out = (qk, capped, with_bias, probs)[mode].to(dtype)
    y = torch.matmul(rounded(probs.to(q.dtype)), v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y.to(dtype), present_key.to(dtype), present_value.to(dtype), qk_out


def _head_counts(ctx: Ctx) -> tuple[int | None, int | None]:
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    rank = ctx.rank(0)
    if rank not in (3, 4) or ctx.rank(1) != rank or ctx.rank(2) != rank:
        raise ctx.fail(f"Q/K/V of ranks {rank}, {ctx.rank(1)}, {ctx.rank(2)} (3-D or 4-D)")
    if rank == 3:
        if q_heads is None or kv_heads is None:
            raise ctx.fail("3-D Q/K/V need q_num_heads and kv_num_heads")
        hq, hk = int(q_heads), int(kv_heads)
    else:
        hq, hk = ctx.static_dim(0, 1), ctx.static_dim(1, 1)
    if hq is None or hk is None:
        raise ctx.fail("the head counts (dim 1 of Q and K) are not known statically")
    if hq % hk:
        raise ctx.fail(f"q_num_heads={hq} is not a multiple of kv_num_heads={hk}")
    return (int(q_heads), int(kv_heads)) if rank == 3 else (None, None)


@converter("Attention")
def _attention(ctx: Ctx) -> list[Value]:
    dtype = ctx.dtype(0)
    if dtype is None or not dtype.is_floating_point:
        raise ctx.fail(f"Q has dtype {dtype}, not a float type")
    if ctx.has(4) != ctx.has(5):
        raise ctx.fail("past_key and past_value must be given together")
    if ctx.has(6) and ctx.has(4):
        raise ctx.fail("nonpad_kv_seqlen together with past_key/past_value")
    q_heads, kv_heads = _head_counts(ctx)
    softmax_dtype = None
    if ctx.attr("softmax_precision") is not None:
        softmax_dtype = ONNX_TO_TORCH.get(int(ctx.attr("softmax_precision")))
        if softmax_dtype is None or not softmax_dtype.is_floating_point:
            raise ctx.fail(f"softmax_precision={ctx.attr('softmax_precision')} (a float type)")
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise ctx.fail(f"qk_matmul_output_mode={mode} (0 to 3)")
    scale = ctx.attr("scale")
    options = (
        None if scale is None else float(scale),
        bool(ctx.attr("is_causal", 0)),
        q_heads,
        kv_heads,
        float(ctx.attr("softcap", 0.0)),
        mode,
        softmax_dtype,
        int(ctx.attr("left_window_size", -1)),
        int(ctx.attr("right_window_size", -1)),
    )
    inputs = [ctx.tensor(i) if ctx.has(i) else None for i in range(7)]
    out = ctx.call(attention_onnx, *inputs, options)
    return [ctx.call(operator.getitem, out, j) for j in range(4)]

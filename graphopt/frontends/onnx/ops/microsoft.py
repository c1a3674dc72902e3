"""The com.microsoft ops that ONNX Runtime's own tools (transformer optimizer, quantization) emit.

``onnxruntime.transformers.optimizer.optimize_model`` fuses a BERT-like graph into these; each
converter writes the op as the torch ops it stands for (ONNX Runtime's contrib-op schemas), so
that passes see through it. ``x`` is input 0; optional inputs are left out when absent.

    Gelu(x)                   = x/2 (1 + erf(x / sqrt 2))
    BiasGelu(x, b)            = Gelu(x + b)
    FastGelu(x, b?)           = y/2 (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))),  y = x + b
    QuickGelu(x; alpha=1.702) = x sigmoid(alpha x)
    BiasAdd(x, b, skip)       = x + b + skip
    SkipLayerNormalization(x, skip, gamma, beta?, bias?; epsilon)
        s = x + skip + bias;  (LayerNorm(s) over the last axis, mean, 1/sqrt(var + eps), s)
    SkipSimplifiedLayerNormalization(x, skip, gamma, bias?): the same with RMSNorm
        s * rsqrt(mean(s^2) + eps) * gamma  (its mean output is not defined: refused when used)
    SimplifiedLayerNormalization(x, scale; axis, epsilon, stash_type) -- ONNX Runtime registers it
        in the default domain (ai.onnx, version 1), so it is keyed "SimplifiedLayerNormalization":
        RMSNorm over the axes from ``axis`` on, computed in the stash type; (y, inv_std_var)
    FusedMatMul(A, B; alpha, transA, transB, transBatchA, transBatchB) = alpha op(A) @ op(B)
        transBatch moves the first axis behind the other batch axes, trans swaps the last two
    FusedConv(X, W, B?, Z?; Conv's attributes, activation, activation_params)
        = activation(Conv(X, W, B) + Z)      (ONNX Runtime's graph optimizer writes it)
    FusedGemm(A, B, C?; Gemm's attributes, activation, activation_alpha/beta)
        = activation(Gemm(A, B, C))
        activation: Relu, Tanh, Sigmoid, LeakyRelu(alpha), HardSigmoid(alpha, beta),
        Clip(min, max) (FusedConv only), Elu(alpha) (FusedGemm only)
    EmbedLayerNormalization(ids, segment_ids?, word, position, segment?, gamma, beta, mask?,
        position_ids?) = (LayerNorm(word[ids] + position[position_ids or 0..S-1]
        + segment[segment_ids]), number of 1s in each mask row, the sum before LayerNorm)

Attention and MultiHeadAttention are in :mod:`.microsoft_attention`. Not converted (they stay
opaque, run by ONNX Runtime, which is correct): BiasSoftmax (no CPU kernel in ONNX Runtime, so no
oracle here) and the quantization tool's contrib ops (QAttention, QEmbedLayerNormalization,
QLinearAdd/Mul/Concat/..., QGemm, DynamicQuantizeMatMul): their kernels quantize and requantize
with their own scale arithmetic, which a float re-statement can miss by one quantization step.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from graphopt.frontends.onnx.context import Ctx
from graphopt.frontends.onnx.ops import microsoft_attention  # noqa: F401  (registers Attention)
from graphopt.frontends.onnx.ops.contrib import declare_dtypes, ms_converter
from graphopt.frontends.onnx.ops.registry import CONVERTERS, converter
from graphopt.frontends.onnx.runtime import layer_norm_manual, layer_norm_stats
from graphopt.frontends.onnx.values import ONNX_TO_TORCH, Value


def plus(ctx: Ctx, x: Value, i: int) -> Value:
    """``x + input i`` when input ``i`` is present, else ``x``."""
    return ctx.call(torch.add, x, ctx.tensor(i)) if ctx.has(i) else x


@ms_converter("Gelu", "BiasGelu")
def _gelu(ctx: Ctx) -> Value:
    return ctx.call(F.gelu, plus(ctx, ctx.tensor(0), 1))


@ms_converter("FastGelu")
def _fast_gelu(ctx: Ctx) -> Value:
    return ctx.call(F.gelu, plus(ctx, ctx.tensor(0), 1), approximate="tanh")


@ms_converter("QuickGelu")
def _quick_gelu(ctx: Ctx) -> Value:
    x = ctx.tensor(0)
    alpha = float(ctx.attr("alpha", 1.702))
    return ctx.call(torch.mul, x, ctx.call(torch.sigmoid, ctx.call(torch.mul, x, alpha)))


@ms_converter("BiasAdd")
def _bias_add(ctx: Ctx) -> Value:
    return ctx.call(torch.add, plus(ctx, ctx.tensor(0), 1), ctx.tensor(2))


# -- normalizations ------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, axis: int, eps: float, scale: torch.Tensor, stash: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the axes from ``axis`` on, in ``stash``: (x * inv * scale, inv), with
    inv = 1 / sqrt(mean(x^2) + eps) kept as size-1 dims; y has the scale's dtype."""
    xs = x.to(stash)
    dims = tuple(range(axis % x.dim(), x.dim()))
    inv = torch.rsqrt(xs.pow(2).mean(dim=dims, keepdim=True) + eps)
    return (xs * inv * scale.to(stash)).to(scale.dtype), inv


def _stats_used(ctx: Ctx, outputs: tuple[int, ...]) -> bool:
    return any(ctx.output_used(j) for j in outputs)


def _skip_sum(ctx: Ctx, bias_input: int) -> Value:
    # ONNX Runtime adds in this order: (input + skip) + bias
    return plus(ctx, ctx.call(torch.add, ctx.tensor(0), ctx.tensor(1)), bias_input)


def _skip_norm_dtypes(ctx: Ctx) -> list[torch.dtype | None]:
    # output, mean, inv_std_var (float32 whatever the input), input_skip_bias_sum
    return [ctx.dtype(0), torch.float32, torch.float32, ctx.dtype(0)]


def _hidden_size(ctx: Ctx) -> int | None:
    gamma = ctx.const(2)
    if gamma is not None and gamma.dim() == 1:
        return int(gamma.numel())
    return ctx.static_dim(0, -1)


@ms_converter("SkipLayerNormalization", dtypes=_skip_norm_dtypes)
def _skip_layer_norm(ctx: Ctx) -> list[Value]:
    eps = float(ctx.attr("epsilon", 1e-12))
    s = _skip_sum(ctx, 4)
    gamma = ctx.tensor(2)
    beta = ctx.tensor(3) if ctx.has(3) else None
    hidden = _hidden_size(ctx)
    if hidden is None:  # F.layer_norm needs the normalized size as an int
        y = ctx.call(layer_norm_manual, s, -1, eps, gamma, beta)
    else:
        y = ctx.call(F.layer_norm, s, [hidden], gamma, beta, eps)
    outputs: list[Value] = [y, None, None, s]
    if _stats_used(ctx, (1, 2)):
        stats = ctx.call(layer_norm_stats, s, -1, eps, torch.float32)
        outputs[1:3] = [ctx.call(operator.getitem, stats, j) for j in (0, 1)]
    return outputs[: len(ctx.node.output)]


@ms_converter("SkipSimplifiedLayerNormalization", dtypes=_skip_norm_dtypes)
def _skip_simplified_layer_norm(ctx: Ctx) -> list[Value]:
    if _stats_used(ctx, (1,)):
        raise ctx.fail(
            "the 'mean' output (1) is used; RMSNorm computes no mean and ONNX Runtime leaves "
            "it undefined",
            "Use only the outputs 'output', 'inv_std_var' and 'input_skip_bias_sum'.",
        )
    eps = float(ctx.attr("epsilon", 1e-12))
    s = _skip_sum(ctx, 3)
    y_inv = ctx.call(rms_norm, s, -1, eps, ctx.tensor(2), torch.float32)
    y, inv = (ctx.call(operator.getitem, y_inv, j) for j in (0, 1))
    return [y, None, inv, s][: len(ctx.node.output)]


@converter("SimplifiedLayerNormalization")
def _simplified_layer_norm(ctx: Ctx) -> list[Value]:
    stash = ONNX_TO_TORCH.get(int(ctx.attr("stash_type", 1)))
    if stash not in (torch.float32, torch.float64):
        raise ctx.fail(f"stash_type={ctx.attr('stash_type')} is not float or double")
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    y_inv = ctx.call(rms_norm, ctx.tensor(0), axis, eps, ctx.tensor(1), stash)
    declare_dtypes(ctx, [ctx.dtype(1), stash])  # ONNX's shape inference knows no such op either
    return [ctx.call(operator.getitem, y_inv, j) for j in range(len(ctx.node.output))]


# -- FusedMatMul ---------------------------------------------------------------------------------


def _fused_perm(rank: int, trans: int, trans_batch: int) -> list[int]:
    """FusedMatMul's op(x) as a permutation: [d0, d1, .., d(r-2), d(r-1)] -> transBatch: [d1, ..,
    d(r-2), d0, d(r-1)]; trans then swaps the last two axes."""
    perm = [*range(1, rank - 1), 0, rank - 1] if trans_batch else list(range(rank))
    if trans:
        perm[-2], perm[-1] = perm[-1], perm[-2]
    return perm


def fused_matmul_operand(x: torch.Tensor, trans: int, trans_batch: int) -> torch.Tensor:
    """op(x) for an ``x`` whose rank was unknown at import."""
    if x.dim() < (3 if trans_batch else 2):
        raise ValueError(f"FusedMatMul: transBatch={trans_batch}, trans={trans} on {x.dim()} dims")
    return x.permute(_fused_perm(x.dim(), trans, trans_batch))


def _fused_operand(ctx: Ctx, i: int, trans: int, trans_batch: int) -> Value:
    x = ctx.tensor(i)
    if not trans and not trans_batch:
        return x
    rank = ctx.rank(i)
    if rank is None:  # after another contrib op: the permutation is chosen when the graph runs
        return ctx.call(fused_matmul_operand, x, trans, trans_batch)
    if rank < (3 if trans_batch else 2):
        side = "AB"[i]
        raise ctx.fail(f"transBatch{side}={trans_batch}, trans{side}={trans} on a {rank}-D {side}")
    return ctx.method("permute", x, _fused_perm(rank, trans, trans_batch))


@ms_converter("FusedMatMul")
def _fused_matmul(ctx: Ctx) -> Value:
    a = _fused_operand(ctx, 0, int(ctx.attr("transA", 0)), int(ctx.attr("transBatchA", 0)))
    b = _fused_operand(ctx, 1, int(ctx.attr("transB", 0)), int(ctx.attr("transBatchB", 0)))
    y = ctx.call(torch.matmul, a, b)
    alpha = float(ctx.attr("alpha", 1.0))
    return y if alpha == 1.0 else ctx.call(torch.mul, y, alpha)


# -- EmbedLayerNormalization -------------------------------------------------------------------


def _embed_dtypes(ctx: Ctx) -> list[torch.dtype | None]:
    # output, mask_index, embedding_sum: the embeddings' dtype and int32
    return [ctx.dtype(2), torch.int32, ctx.dtype(2)]


def embed_positions(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The position embeddings of 0 .. S-1 for ``ids`` of shape (B, S): (S, hidden)."""
    return table[: ids.shape[1]]


def mask_lengths(mask: torch.Tensor) -> torch.Tensor:
    """EmbedLayerNormalization's mask_index: the number of 1s in each row of ``mask``, int32."""
    return (mask == 1).sum(dim=1, dtype=torch.int32)


@ms_converter("EmbedLayerNormalization", dtypes=_embed_dtypes)
def _embed_layer_norm(ctx: Ctx) -> list[Value]:
    if ctx.output_used(1) and not ctx.has(7):
        raise ctx.fail("the mask_index output (1) is used but there is no mask input (7)")
    if ctx.has(1) != ctx.has(4):
        raise ctx.fail("segment_ids (1) and segment_embedding (4) must be given together")
    ids = ctx.method("long", ctx.tensor(0))
    s = ctx.call(F.embedding, ids, ctx.tensor(2))
    if ctx.has(8):
        pos = ctx.call(F.embedding, ctx.method("long", ctx.tensor(8)), ctx.tensor(3))
    else:
        pos = ctx.call(embed_positions, ids, ctx.tensor(3))
    s = ctx.call(torch.add, s, pos)
    if ctx.has(1):
        seg_ids = ctx.method("long", ctx.tensor(1))
        s = ctx.call(torch.add, s, ctx.call(F.embedding, seg_ids, ctx.tensor(4)))
    eps = float(ctx.attr("epsilon", 1e-12))
    gamma = ctx.tensor(5)
    hidden = ctx.const(5).numel() if ctx.const(5) is not None else ctx.static_dim(2, 1)
    if hidden is None:
        y = ctx.call(layer_norm_manual, s, -1, eps, gamma, ctx.tensor(6))
    else:
        y = ctx.call(F.layer_norm, s, [int(hidden)], gamma, ctx.tensor(6), eps)
    mask_index = ctx.call(mask_lengths, ctx.tensor(7)) if ctx.has(7) else None
    return [y, mask_index, s][: len(ctx.node.output)]


# -- FusedConv, FusedGemm ------------------------------------------------------------------------


def _activation_fn(ctx: Ctx, name: str, params: list[float]) -> tuple:
    """(fn, args) of an activation that ONNX Runtime fused into a Conv or Gemm."""
    fixed = {"Relu": F.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid}
    if name in fixed and not params:
        return fixed[name], ()
    if name == "LeakyRelu" and len(params) == 1:
        return F.leaky_relu, (params[0],)
    if name == "Elu" and len(params) == 1:
        return F.elu, (params[0],)
    if name == "Clip" and len(params) == 2:
        return torch.clamp, (params[0], params[1])
    if name == "HardSigmoid" and len(params) == 2:
        return hard_sigmoid, (params[0], params[1])
    raise ctx.fail(f"activation={name!r} with parameters {params} is not supported")


def hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@ms_converter("FusedConv")
def _fused_conv(ctx: Ctx) -> Value:
    name = str(ctx.attr("activation", ""))
    params = [float(p) for p in ctx.attr("activation_params", [])]
    if name == "Elu":
        raise ctx.fail("activation='Elu' is not one of FusedConv's activations")
    fn, args = _activation_fn(ctx, name, params) if name else (None, ())
    y = CONVERTERS["Conv"](ctx)  # inputs 0-2 and the attributes are Conv's
    y = plus(ctx, y, 3)  # Z, added before the activation
    return y if fn is None else ctx.call(fn, y, *args)


@ms_converter("FusedGemm")
def _fused_gemm(ctx: Ctx) -> Value:
    name = str(ctx.attr("activation", ""))
    params = {
        "LeakyRelu": [float(ctx.attr("activation_alpha", 0.01))],
        "Elu": [float(ctx.attr("activation_alpha", 1.0))],
        "HardSigmoid": [
            float(ctx.attr("activation_alpha", 0.2)),
            float(ctx.attr("activation_beta", 0.5)),
        ],
    }.get(name, [])
    if name == "Clip":
        raise ctx.fail("activation='Clip' is not one of FusedGemm's activations")
    fn, args = _activation_fn(ctx, name, params) if name else (None, ())
    y = CONVERTERS["Gemm"](ctx)
    return y if fn is None else ctx.call(fn, y, *args)

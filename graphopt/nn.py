"""The ``nn.Module`` layers that graphopt's passes put into a rewritten graph.

* ``MonarchLinear``, ``BlockDiagonalLinear``, ``LowRankLinear``: structured stand-ins for a dense
  ``nn.Linear``, each with the closed-form projection of a dense weight onto its class
  (``from_dense``); ``PointwiseConv`` runs one of them as a 1x1 convolution
  (``substitute-monarch``). The math -- the Monarch factorisation ``W = P_out R P L P_in``, why
  the truncated SVD of each slice is the optimal projection, why Monarch(b) holds every
  block-diagonal matrix with b blocks, the zero padding of sizes b does not divide -- is in
  :mod:`graphopt.algebra.monarch`.
* ``FusedAttention``, ``SkipLayerNorm``: attention (``softmax(q k^T * scale + mask) v``) and a
  residual add followed by LayerNorm, computed in torch exactly as the ops they replace, and
  exported as ONNX Runtime's fused ``com.microsoft`` kernels (``MultiHeadAttention``,
  ``SkipLayerNormalization``) (``fuse-attention``).
* ``MergedSpan``: a span of convolutions in the fine-tunable form that depth compression
  (``merge-convs{budget=...}``) trains before merging it into the one conv it computes
  (:mod:`graphopt.algebra.conv_merge`).

The Monarch forward pass is two batched matrix products on ``[b, tokens, ...]`` tensors with
reshapes and transposes between them: it exports to ONNX as two ``MatMul`` with ``[b, p, q]``
and ``[b, q, s]`` initializers, never as a dense ``n_in x n_out`` matrix.

>>> from graphopt.algebra.monarch import relative_error
>>> dense = nn.Linear(768, 3072)
>>> layer = MonarchLinear.from_dense(dense.weight, dense.bias, nblocks=4)
>>> relative_error(dense.weight, layer.dense_weight())
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.algebra.conv_merge import ConvSpec, Refusal, merge_specs
from graphopt.algebra.monarch import (
    MonarchSizes,
    block_diagonal_blocks,
    block_diagonal_dense,
    check_bias,
    check_sizes,
    default_rank,
    low_rank_factors,
)
from graphopt.errors import InputError

__all__ = [
    "BlockDiagonalLinear",
    "FusedAttention",
    "LowRankLinear",
    "MergedSpan",
    "MonarchLinear",
    "PointwiseConv",
    "SkipLayerNorm",
]


def _rows(x: torch.Tensor, features: int, width: int) -> tuple[torch.Size, torch.Tensor]:
    """``x``'s leading shape and ``x`` as rows of ``features``, zero-padded to ``width``."""
    lead = x.shape[:-1]
    x = x.reshape(-1, features)
    return lead, (F.pad(x, (0, width - features)) if width != features else x)


def _unrows(
    y: torch.Tensor, lead: torch.Size, features: int, width: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Rows of ``width`` cropped to ``features``, plus ``bias``, back in the ``lead`` shape
    (the widths are the layer's own numbers: FX traces the layer)."""
    if width != features:
        y = y[:, :features]
    if bias is not None:
        y = y + bias
    return y.reshape(lead + (features,))


def _parameter(shape: tuple[int, ...], dtype: torch.dtype | None) -> nn.Parameter:
    """An uninitialised parameter, a normal tensor even under ``torch.inference_mode()`` (an
    inference tensor could not be fine-tuned: autograd cannot save it)."""
    with torch.inference_mode(False):
        return nn.Parameter(torch.empty(shape, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# Monarch


class MonarchLinear(nn.Module):
    """A Monarch matrix as a drop-in for ``nn.Linear`` (see the module docstring for the math).

    ``rank``: the rank of each of the ``nblocks**2`` slices, default ``ceil(min(p, s) / b)``.
    Parameters: ``b*b*r*(p + s)`` (+ bias), against ``n_in * n_out`` for the dense layer: about
    ``(1 + min/max) / b`` of it, so 4 blocks keep 31% of a 768 -> 3072 layer.

    >>> layer = MonarchLinear(768, 3072, nblocks=4)
    >>> layer(torch.randn(1, 197, 768)).shape
    torch.Size([1, 197, 3072])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        rank: int | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = MonarchSizes.of(in_features, out_features, nblocks, rank)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = b = nblocks
        self.in_block = sizes.in_block
        self.out_block = sizes.out_block
        self.rank = sizes.rank
        # the narrower side is interleaved (see graphopt.algebra.monarch): then Monarch(b) holds
        # every block-diagonal matrix with b blocks
        self.interleave_output = sizes.interleave_output
        q = b * self.rank
        self.blocks1 = _parameter((b, self.in_block, q), dtype)
        self.blocks2 = _parameter((b, q, self.out_block), dtype)
        self.bias = _parameter((out_features,), dtype) if bias else None
        self.reset_parameters()

    @staticmethod
    def default_rank(in_features: int, out_features: int, nblocks: int) -> int:
        """``ceil(min(p, s) / b)``: the slice rank of the reference implementation's sizes."""
        return default_rank(in_features, out_features, nblocks)

    @property
    def sizes(self) -> MonarchSizes:
        """The layer's factorisation sizes (its slice view and projection live there)."""
        return MonarchSizes(self.in_features, self.out_features, self.nblocks, self.rank)

    def reset_parameters(self) -> None:
        """Uniform initialisation scaled like ``nn.Linear``'s, per factor."""
        with torch.no_grad():
            nn.init.uniform_(self.blocks1, -(self.in_block**-0.5), self.in_block**-0.5)
            fan2 = self.blocks2.shape[1]
            nn.init.uniform_(self.blocks2, -(fan2**-0.5), fan2**-0.5)
            if self.bias is not None:
                bound = self.in_features**-0.5
                nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, rank={self.rank}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, s, r = self.nblocks, self.in_block, self.out_block, self.rank
        lead, x = _rows(x, self.in_features, b * p)
        if self.interleave_output:
            xb = x.reshape(-1, b, p).transpose(0, 1)  # (b, N, p): block k = x[:, k*p:(k+1)*p]
        else:
            xb = x.reshape(-1, p, b).permute(2, 0, 1)  # (b, N, p): block k = x[:, k::b]
        u = torch.matmul(xb, self.blocks1)  # (b_k, N, b_l * r)
        v = u.reshape(b, -1, b, r).permute(2, 1, 0, 3).reshape(b, -1, b * r)  # (b_l, N, b_k * r)
        w = torch.matmul(v, self.blocks2)  # (b_l, N, s)
        if self.interleave_output:
            y = w.permute(1, 2, 0).reshape(-1, s * b)  # y[:, s' * b + l] = w[l, :, s']
        else:
            y = w.transpose(0, 1).reshape(-1, b * s)  # y[:, l * s + s'] = w[l, :, s']
        return _unrows(y, lead, self.out_features, b * s, self.bias)

    def slices_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(b, b, s, p)`` slices ``T[k, l]`` of a dense ``n_out x n_in`` weight (padded):
        ``T[k, l] = W[rows of output block l, columns of input block k]``."""
        return self.sizes.slices_of(weight)

    def dense_from_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`slices_of`: the ``n_out x n_in`` matrix with these slices."""
        return self.sizes.dense_from_slices(slices)

    def dense_weight(self) -> torch.Tensor:
        """The ``n_out x n_in`` matrix this layer multiplies by (without the bias)."""
        return self.sizes.dense(self.blocks1, self.blocks2)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        nblocks: int = 4,
        rank: int | None = None,
    ) -> MonarchLinear:
        """The Frobenius-closest Monarch layer to ``weight`` (``n_out x n_in``), bias kept.

        Per slice ``T_kl = U S V^T``, truncated to rank ``r``:
        ``R[l, k*r:(k+1)*r, :] = (U sqrt(S))^T`` and ``L[k, :, l*r:(l+1)*r] = (sqrt(S) V^T)^T``.
        Computed in float64 (:meth:`MonarchSizes.project`), stored in ``weight``'s dtype.
        """
        out_features, in_features = weight.shape
        check_bias(bias, out_features)
        layer = cls(in_features, out_features, nblocks, rank, bias is not None, dtype=weight.dtype)
        blocks1, blocks2 = layer.sizes.project(weight)
        with torch.no_grad():
            layer.blocks1.copy_(blocks1)
            layer.blocks2.copy_(blocks2)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer


# ------------------------------------------------------------------------------------------------
# baselines


class BlockDiagonalLinear(nn.Module):
    """``nblocks`` independent blocks ``p -> s`` (input block k feeds output block k only).

    Parameters ``b*p*s``, about ``n_in * n_out / b``. ``from_dense`` keeps the diagonal blocks
    of the (zero-padded) weight: the Frobenius-closest block-diagonal matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(in_features, out_features, nblocks)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.in_block = math.ceil(in_features / nblocks)
        self.out_block = math.ceil(out_features / nblocks)
        self.blocks = _parameter((nblocks, self.in_block, self.out_block), dtype)
        self.bias = _parameter((out_features,), dtype) if bias else None
        with torch.no_grad():
            bound = self.in_block**-0.5
            nn.init.uniform_(self.blocks, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, s = self.nblocks, self.in_block, self.out_block
        lead, x = _rows(x, self.in_features, b * p)
        w = torch.matmul(x.reshape(-1, b, p).transpose(0, 1), self.blocks)  # (b, N, s)
        y = w.transpose(0, 1).reshape(-1, b * s)
        return _unrows(y, lead, self.out_features, b * s, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``n_out x n_in`` matrix this layer multiplies by (without the bias)."""
        return block_diagonal_dense(self.blocks, self.out_features, self.in_features)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, nblocks: int = 4
    ) -> BlockDiagonalLinear:
        """The diagonal blocks of ``weight`` (``n_out x n_in``, zero-padded), bias kept."""
        out_features, in_features = weight.shape
        check_bias(bias, out_features)
        layer = cls(in_features, out_features, nblocks, bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            layer.blocks.copy_(block_diagonal_blocks(weight, nblocks))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer


class LowRankLinear(nn.Module):
    """``y = (x @ down) @ up + bias`` with ``down: n_in x rank``, ``up: rank x n_out``.

    Parameters ``rank * (n_in + n_out)``. ``from_dense`` is the truncated SVD (Eckart-Young).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be between 1 and {min(in_features, out_features)}, got {rank}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = _parameter((in_features, rank), dtype)
        self.up = _parameter((rank, out_features), dtype)
        self.bias = _parameter((out_features,), dtype) if bias else None
        with torch.no_grad():
            nn.init.uniform_(self.down, -(in_features**-0.5), in_features**-0.5)
            nn.init.uniform_(self.up, -(rank**-0.5), rank**-0.5)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -(in_features**-0.5), in_features**-0.5)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(torch.matmul(x, self.down), self.up)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """The ``n_out x n_in`` matrix this layer multiplies by (without the bias)."""
        return (self.down @ self.up).T

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, rank: int
    ) -> LowRankLinear:
        """The rank-``rank`` truncated SVD of ``weight`` (``n_out x n_in``), bias kept."""
        out_features, in_features = weight.shape
        check_bias(bias, out_features)
        layer = cls(in_features, out_features, rank, bias is not None, dtype=weight.dtype)
        down, up = low_rank_factors(weight, rank)
        with torch.no_grad():
            layer.down.copy_(down.to(weight.dtype))
            layer.up.copy_(up.to(weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer


class PointwiseConv(nn.Module):
    """A 1x1 convolution (stride 1, no padding, one group) done by a Linear-like ``layer`` on
    the channel axis: ``(N, C, *spatial) -> (N, *spatial, C) -> layer -> back``.

    ``spatial_dims`` is fixed at construction so the permutations are static (ONNX export
    mishandles ``movedim`` with negative axes).
    """

    def __init__(self, layer: nn.Module, spatial_dims: int = 2) -> None:
        super().__init__()
        self.layer = layer
        self.spatial_dims = spatial_dims

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.spatial_dims
        y = self.layer(x.permute(0, *range(2, d + 2), 1))
        return y.permute(0, d + 1, *range(1, d + 1))

    def dense_weight(self) -> torch.Tensor:
        """The ``C_out x C_in`` matrix of the 1x1 convolution."""
        return self.layer.dense_weight()


# ------------------------------------------------------------------------------------------------
# the fine-tunable form of a merged span (merge-convs{budget=...})


class MergedSpan(nn.Module):
    """Convs applied in order as the one conv they merge into, in a form that trains: the
    input is zero-padded once by the span's moved padding, every conv runs unpadded, and a
    residual ``x + body(x)`` inside the span adds ``x`` centre-cropped to the body's output.
    :meth:`spec` is the merged conv (exact up to float rounding: both compute the same valid
    convs of the padded input).

    ``convs``: ConvSpecs with their original padding; ``bodies``: ``(a, b)``, convs ``a..b``
    (0-based) with the skip around them.
    """

    def __init__(
        self,
        convs: list[ConvSpec],
        bodies: list[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = True,
    ) -> None:
        super().__init__()
        dims = convs[0].dims
        self.paddings = [tuple(c.padding) for c in convs]
        self.bodies = sorted(bodies)
        self.convs = nn.ModuleList(
            c.module(dtype, padding=0).requires_grad_(requires_grad) for c in convs
        )
        moved = [0] * dims  # p = p1 + p2*s1 + p3*s1*s2 ...
        stride = [1] * dims
        for spec in convs:
            for d in range(dims):
                moved[d] += spec.padding[d] * stride[d]
                stride[d] *= spec.stride[d]
        self.padding = tuple(moved)
        self._pad = tuple(p for m in reversed(moved) for p in (m, m))
        for a, b in self.bodies:
            if any(s != 1 for c in convs[a : b + 1] for s in c.stride):
                raise InputError(f"residual body {a}..{b} has a strided conv: x + f(x) cannot hold")
        # the skip of a stride-1 body is cropped by the body's own padding on each side
        self._crops = {
            b: (a, [sum(convs[k].padding[d] for k in range(a, b + 1)) for d in range(dims)])
            for a, b in self.bodies
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self._pad) if any(self._pad) else x
        starts = {a for a, _ in self.bodies}
        saved: dict[int, torch.Tensor] = {}
        for k, conv in enumerate(self.convs):
            if k in starts:
                saved[k] = x
            x = conv(x)
            if k in self._crops:
                a, crop = self._crops[k]
                skip = saved.pop(a)
                index = (...,) + tuple(
                    slice(c, skip.shape[-len(crop) + d] - c) for d, c in enumerate(crop)
                )
                x = x + skip[index]
        return x

    def specs(self) -> list[ConvSpec]:
        """The convs as they are now (after fine-tuning), with their original padding."""
        return [
            ConvSpec(c.weight.detach(), c.bias.detach(), c.stride, p, c.dilation, c.groups)
            for c, p in zip(self.convs, self.paddings, strict=True)
        ]

    def spec(self) -> ConvSpec:
        """The one conv this span computes."""
        merged = merge_specs(self.specs(), self.bodies, None, move_padding=True)
        if isinstance(merged, Refusal):  # the plan only holds spans the algebra merged
            raise InputError(f"the fixed span no longer merges: {merged}")
        return merged


# ------------------------------------------------------------------------------------------------
# transformer blocks as ONNX Runtime's fused kernels (fuse-attention)


class FusedAttention(nn.Module):
    """Scaled dot-product attention on ``[B, N, S, H]`` heads, exported as one
    ``com.microsoft::MultiHeadAttention`` node.

    In torch it computes what the ops it replaced computed, in their order: ``form="sdpa"``
    calls ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sdpa_scale)``;
    ``form="mul"`` is ``softmax((q @ k^T) * c + mask) @ v``, ``"div"`` divides by ``c``,
    ``"q"`` scales the query first, ``(q * c) @ k^T``, ``"none"`` has no scale. ``mask`` (a
    4-D ``[B|1, N|1, S, T]`` tensor) is added to the scores, or, boolean, keeps the scores where
    it is true (``-inf`` elsewhere), as SDPA reads it.

    The export: ``q`` is laid out as ``[B, S, N*H]``, ``k`` and ``v`` go in as ``[B, N, T, H]``
    (MultiHeadAttention's unprojected key/value form), the mask as ``attention_bias`` (boolean:
    ``Where(mask, 0, -inf)``), the scale as the ``scale`` attribute (``1/c`` for ``"div"``); the
    ``[B, S, N*H]`` output is laid back out as ``[B, N, S, H]``.

    >>> att = FusedAttention(heads=6, head_size=64, form="mul", scale=0.125)
    >>> att(*torch.randn(3, 1, 6, 197, 64)).shape
    torch.Size([1, 6, 197, 64])
    """

    def __init__(
        self,
        heads: int,
        head_size: int,
        form: str,
        scale: float | None = None,
        bool_mask: bool = False,
    ) -> None:
        super().__init__()
        if form not in _ATTENTION_FORMS:
            raise InputError(f"attention form {form!r}: one of {', '.join(_ATTENTION_FORMS)}")
        self.heads, self.head_size, self.form = heads, head_size, form
        self.scale, self.bool_mask = scale, bool_mask

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # the fused node; torch itself runs (and trains) ops
            return _AttentionFunction.apply(q, k, v, mask, self)
        return self.compute(q, k, v, mask)

    def compute(self, q, k, v, mask):  # noqa: ANN001, ANN201 - the ops it replaced
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        if self.form == "q":
            scores = (q * self.scale) @ k.transpose(-2, -1)
        else:
            scores = q @ k.transpose(-2, -1)
            if self.form == "mul":
                scores = scores * self.scale
            elif self.form == "div":
                scores = scores / self.scale
        if mask is not None and self.bool_mask:
            scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        elif mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v

    def onnx_scale(self) -> float:
        """MultiHeadAttention's ``scale``: what multiplies ``q k^T``."""
        if self.form == "none":
            return 1.0
        if self.scale is None:  # SDPA's default
            return 1.0 / math.sqrt(self.head_size)
        return 1.0 / self.scale if self.form == "div" else float(self.scale)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_size={self.head_size}, form={self.form}, scale={self.scale}"
        )


_ATTENTION_FORMS = ("sdpa", "mul", "div", "q", "none")


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, module):  # noqa: ANN001, ANN205
        return module.compute(q, k, v, mask)

    @staticmethod
    def symbolic(g, q, k, v, mask, module):  # noqa: ANN001, ANN205
        const = lambda t: g.op("Constant", value_t=t)  # noqa: E731
        q3 = g.op("Transpose", q, perm_i=[0, 2, 1, 3])
        q3 = g.op("Reshape", q3, const(torch.tensor([0, 0, -1])))
        inputs = [q3, k, v]
        if mask is not None and not isinstance(mask.type(), torch._C.NoneType):
            if module.bool_mask:
                zero, neg = const(torch.tensor(0.0)), const(torch.tensor(float("-inf")))
                mask = g.op("Where", mask, zero, neg)
            absent = g.op("prim::Constant")
            absent.setType(torch._C.NoneType.get())
            inputs += [absent, absent, mask]  # bias, key_padding_mask, attention_bias
        out = g.op(
            "com.microsoft::MultiHeadAttention",
            *inputs,
            num_heads_i=module.heads,
            scale_f=module.onnx_scale(),
        )
        out.setType(_typed(k, 3))  # else the export declares its dtype unknown (0)
        out = g.op("Reshape", out, const(torch.tensor([0, 0, module.heads, -1])))
        return g.op("Transpose", out, perm_i=[0, 2, 1, 3])


def _typed(like, rank: int):  # noqa: ANN001, ANN202
    """The ONNX type of a new output: ``like``'s dtype, ``rank`` dims of unknown size."""
    return like.type().with_sizes([None] * rank)


class SkipLayerNorm(nn.Module):
    """``s = a + b; (layer_norm(s), s)`` over the last axis, exported as one
    ``com.microsoft::SkipLayerNormalization`` node (its outputs 0 and 3: the normalised sum
    and the sum, which a pre-LN transformer's residual path reads on).

    >>> ln = SkipLayerNorm(torch.ones(384), torch.zeros(384), eps=1e-6)
    >>> y, s = ln(torch.randn(1, 197, 384), torch.randn(1, 197, 384))
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.eps = eps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.onnx.is_in_onnx_export():  # the fused node; torch itself runs (and trains) ops
            return _SkipLayerNormFunction.apply(a, b, self.weight, self.bias, self.eps)
        s = a + b
        return F.layer_norm(s, self.weight.shape, self.weight, self.bias, self.eps), s

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class _SkipLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, bias, eps):  # noqa: ANN001, ANN205
        s = a + b
        return F.layer_norm(s, weight.shape, weight, bias, eps), s

    @staticmethod
    def symbolic(g, a, b, weight, bias, eps):  # noqa: ANN001, ANN205
        out = g.op(
            "com.microsoft::SkipLayerNormalization", a, b, weight, bias, epsilon_f=eps, outputs=4
        )
        rank = len(a.type().sizes() or ()) or 3
        for value in out:  # normalised sum, mean, 1/std (both [.., 1]), sum
            value.setType(_typed(a, rank))
        return out[0], out[3]

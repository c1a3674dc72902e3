"""Structured stand-ins for a dense ``nn.Linear``: Monarch, block-diagonal and low-rank layers,
each with the closed-form projection of a dense weight onto its class (``from_dense``).

Monarch (Dao et al., ICML 2022) with ``b`` blocks and per-slice rank ``r``, for ``y = W x``
(``W``: ``n_out x n_in``)::

    p = ceil(n_in / b)   s = ceil(n_out / b)   q = b * r      x zero-padded to b*p, y cut to n_out
    stage 1, block k:    u[k] = x_k @ L[k]                    L: (b, p, q)
    permutation P:       v[l] = concat_k u[k][l*r:(l+1)*r]    (the transpose of a (b, b) grid)
    stage 2, block l:    w[l] = v[l] @ R[l]                   R: (b, q, s)

One side is interleaved, the other contiguous: when ``s <= p`` (a layer that keeps or shrinks
the width) output block ``l`` is rows ``l, l+b, l+2b, ...`` and input block ``k`` is columns
``k*p .. (k+1)*p - 1``; when ``s > p`` (a widening layer) it is the other way round. Then

    W[row(l, s'), col(k, p')] = sum_t L[k, p', l*r + t] * R[l, k*r + t, s']

so the slice ``T_kl = W[rows of block l, columns of block k]`` (``s x p``) is the product
``R[l, k*r:(k+1)*r, :]^T @ L[k, :, l*r:(l+1)*r]^T`` of rank <= r, and no other slice uses
those factors. The slices partition ``W``: the least-squares fit of a dense ``W`` decouples into
``b*b`` independent rank-r problems and, by Eckart-Young, the truncated SVD of each slice is the
global optimum in Frobenius norm (``MonarchLinear.from_dense``). The default rank
``r = ceil(min(p, s) / b)`` gives the sizes of the reference code (``HazyResearch/fly``,
``MonarchLinear``); interleaving the narrower side makes every slice of a block-diagonal matrix
with the same ``b`` have rank <= r, so ``BlockDiagonalLinear(b)`` is contained in
``MonarchLinear(b)`` and the Monarch projection is never worse than the block-diagonal one with
the same number of blocks (it has 1 to 2 times its parameters).

Sizes that ``b`` does not divide are zero-padded. The padded rows and columns are fitted to
zero; that is the exact optimum when ``b`` divides both sizes and close to it otherwise (the
optimum over the unpadded part alone is a weighted low-rank problem without a closed form).

The forward pass is two batched matrix products on ``[b, tokens, ...]`` tensors with reshapes
and transposes between them: it exports to ONNX as two ``MatMul`` with ``[b, p, q]`` and
``[b, q, s]`` initializers, never as a dense ``n_in x n_out`` matrix.

Baselines: ``BlockDiagonalLinear`` (``b`` blocks ``p -> s``, projection = keep the diagonal
blocks) and ``LowRankLinear`` (``W ~ U V``, projection = truncated SVD split as ``U sqrt(S)``,
``sqrt(S) V^T``).

>>> dense = nn.Linear(768, 3072)
>>> layer = MonarchLinear.from_dense(dense.weight, dense.bias, nblocks=4)
>>> relative_error(dense.weight, layer.dense_weight())
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockDiagonalLinear",
    "LowRankLinear",
    "MonarchLinear",
    "PointwiseConv",
    "relative_error",
]


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx||_F / ||weight||_F`` in float64 (0 for a zero weight matched)."""
    w = weight.detach().double()
    diff = float((w - approx.detach().double()).norm())
    norm = float(w.norm())
    return diff / norm if norm > 0 else diff


def _check_sizes(in_features: int, out_features: int, nblocks: int) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be positive, got {in_features} -> {out_features}")
    if not 1 <= nblocks <= min(in_features, out_features):
        raise ValueError(
            f"nblocks must be between 1 and min(in_features, out_features) = "
            f"{min(in_features, out_features)}, got {nblocks}"
        )


def _pad2d(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` zero-padded at the bottom and right to ``rows x cols``."""
    return F.pad(weight, (0, cols - weight.shape[1], 0, rows - weight.shape[0]))


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


def _check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


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
        _check_sizes(in_features, out_features, nblocks)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = b = nblocks
        self.in_block = math.ceil(in_features / b)
        self.out_block = math.ceil(out_features / b)
        self.rank = rank if rank is not None else self.default_rank(in_features, out_features, b)
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        # the narrower side is interleaved (see the module docstring): then Monarch(b) holds
        # every block-diagonal matrix with b blocks
        self.interleave_output = self.out_block <= self.in_block
        q = b * self.rank
        self.blocks1 = _parameter((b, self.in_block, q), dtype)
        self.blocks2 = _parameter((b, q, self.out_block), dtype)
        self.bias = _parameter((out_features,), dtype) if bias else None
        self.reset_parameters()

    @staticmethod
    def default_rank(in_features: int, out_features: int, nblocks: int) -> int:
        """``ceil(min(p, s) / b)``: the slice rank of the reference implementation's sizes."""
        p = math.ceil(in_features / nblocks)
        s = math.ceil(out_features / nblocks)
        return math.ceil(min(p, s) / nblocks)

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

    # -- the slice view: T[k, l] = W[rows of output block l, columns of input block k]

    def _grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """How ``W_ext`` (``b*s x b*p``) is viewed as 4-D, and the permutation to (k, l, s', p')."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        if self.interleave_output:  # rows (s', l), columns (k, p')
            return (s, b, b, p), (2, 1, 0, 3)
        return (b, s, p, b), (3, 0, 1, 2)  # rows (l, s'), columns (p', k)

    def slices_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(b, b, s, p)`` slices ``T[k, l]`` of a dense ``n_out x n_in`` weight (padded)."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        view, perm = self._grid()
        return _pad2d(weight, b * s, b * p).reshape(view).permute(perm)

    def dense_from_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`slices_of`: the ``n_out x n_in`` matrix with these slices."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        view, perm = self._grid()
        inverse = [perm.index(i) for i in range(4)]
        full = slices.permute(inverse).reshape(b * s, b * p)
        return full[: self.out_features, : self.in_features]

    def dense_weight(self) -> torch.Tensor:
        """The ``n_out x n_in`` matrix this layer multiplies by (without the bias)."""
        b, p, s, r = self.nblocks, self.in_block, self.out_block, self.rank
        left = self.blocks1.reshape(b, p, b, r)  # [k, p', l, t]
        right = self.blocks2.reshape(b, b, r, s)  # [l, k, t, s']
        slices = torch.einsum("kplt,lkts->klsp", left, right)
        return self.dense_from_slices(slices)

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
        Computed in float64, stored in ``weight``'s dtype.
        """
        out_features, in_features = weight.shape
        _check_bias(bias, out_features)
        layer = cls(in_features, out_features, nblocks, rank, bias is not None, dtype=weight.dtype)
        b, p, s, r = layer.nblocks, layer.in_block, layer.out_block, layer.rank
        slices = layer.slices_of(weight.detach().double())  # (b, b, s, p)
        u, sv, vh = torch.linalg.svd(slices, full_matrices=False)
        keep = min(r, sv.shape[-1])
        root = sv[..., :keep].sqrt()
        left_f = torch.zeros(b, b, s, r, dtype=torch.float64)  # [k, l, s', t]
        right_f = torch.zeros(b, b, r, p, dtype=torch.float64)  # [k, l, t, p']
        left_f[..., :keep] = u[..., :keep] * root.unsqueeze(-2)
        right_f[..., :keep, :] = root.unsqueeze(-1) * vh[..., :keep, :]
        with torch.no_grad():
            # L[k, p', l*r + t] = right_f[k, l, t, p'];  R[l, k*r + t, s'] = left_f[k, l, s', t]
            layer.blocks1.copy_(right_f.permute(0, 3, 1, 2).reshape(b, p, b * r))
            layer.blocks2.copy_(left_f.permute(1, 0, 3, 2).reshape(b, b * r, s))
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
        _check_sizes(in_features, out_features, nblocks)
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
        full = torch.block_diag(*self.blocks.transpose(1, 2))  # (b*s, b*p)
        return full[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, nblocks: int = 4
    ) -> BlockDiagonalLinear:
        """The diagonal blocks of ``weight`` (``n_out x n_in``, zero-padded), bias kept."""
        out_features, in_features = weight.shape
        _check_bias(bias, out_features)
        layer = cls(in_features, out_features, nblocks, bias is not None, dtype=weight.dtype)
        b, p, s = nblocks, layer.in_block, layer.out_block
        full = _pad2d(weight.detach(), b * s, b * p).reshape(b, s, b, p)
        diag = full.diagonal(dim1=0, dim2=2).permute(2, 1, 0)  # (b, p, s): W_kk^T
        with torch.no_grad():
            layer.blocks.copy_(diag)
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
        _check_bias(bias, out_features)
        layer = cls(in_features, out_features, rank, bias is not None, dtype=weight.dtype)
        u, sv, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        root = sv[:rank].sqrt()
        with torch.no_grad():
            layer.down.copy_((vh[:rank].T * root).to(weight.dtype))
            layer.up.copy_((root.unsqueeze(1) * u[:, :rank].T).to(weight.dtype))
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

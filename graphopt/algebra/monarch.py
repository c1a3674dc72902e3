"""Monarch matrices, and the closed-form projections of a dense matrix onto Monarch,
block-diagonal and low-rank matrices (the layers built on them are in :mod:`graphopt.nn`).

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
global optimum in Frobenius norm (:meth:`MonarchSizes.project`). The default rank
``r = ceil(min(p, s) / b)`` gives the sizes of the reference code (``HazyResearch/fly``,
``MonarchLinear``); interleaving the narrower side makes every slice of a block-diagonal matrix
with the same ``b`` have rank <= r, so ``BlockDiagonalLinear(b)`` is contained in
``MonarchLinear(b)`` and the Monarch projection is never worse than the block-diagonal one with
the same number of blocks (it has 1 to 2 times its parameters).

Sizes that ``b`` does not divide are zero-padded. The padded rows and columns are fitted to
zero; that is the exact optimum when ``b`` divides both sizes and close to it otherwise (the
optimum over the unpadded part alone is a weighted low-rank problem without a closed form).

Baselines: block-diagonal (``b`` blocks ``p -> s``, projection = keep the diagonal blocks,
:func:`block_diagonal_blocks`) and low-rank (``W ~ U V``, projection = truncated SVD split as
``U sqrt(S)``, ``sqrt(S) V^T``, :func:`low_rank_factors`).

>>> sizes = MonarchSizes.of(768, 3072, nblocks=4)
>>> blocks1, blocks2 = sizes.project(weight)
>>> relative_error(weight, sizes.dense(blocks1, blocks2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MonarchSizes",
    "block_diagonal_blocks",
    "block_diagonal_dense",
    "check_bias",
    "check_sizes",
    "default_rank",
    "low_rank_factors",
    "pad2d",
    "relative_error",
]


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx||_F / ||weight||_F`` in float64 (0 for a zero weight matched)."""
    w = weight.detach().double()
    diff = float((w - approx.detach().double()).norm())
    norm = float(w.norm())
    return diff / norm if norm > 0 else diff


def check_sizes(in_features: int, out_features: int, nblocks: int) -> None:
    """Raises ``ValueError`` unless both sizes are positive and ``1 <= nblocks <= min`` of them."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be positive, got {in_features} -> {out_features}")
    if not 1 <= nblocks <= min(in_features, out_features):
        raise ValueError(
            f"nblocks must be between 1 and min(in_features, out_features) = "
            f"{min(in_features, out_features)}, got {nblocks}"
        )


def check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    """Raises ``ValueError`` unless ``bias`` is None or of shape ``(out_features,)``."""
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def pad2d(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` zero-padded at the bottom and right to ``rows x cols``."""
    return F.pad(weight, (0, cols - weight.shape[1], 0, rows - weight.shape[0]))


def default_rank(in_features: int, out_features: int, nblocks: int) -> int:
    """``ceil(min(p, s) / b)``: the slice rank of the reference implementation's sizes."""
    p = math.ceil(in_features / nblocks)
    s = math.ceil(out_features / nblocks)
    return math.ceil(min(p, s) / nblocks)


# ------------------------------------------------------------------------------------------------
# Monarch


@dataclass(frozen=True)
class MonarchSizes:
    """The sizes of a Monarch factorisation ``(L, R)`` of an ``n_out x n_in`` matrix: ``b``
    blocks ``p = ceil(n_in / b)`` wide in and ``s = ceil(n_out / b)`` out, slice rank ``r``,
    ``L: (b, p, b*r)``, ``R: (b, b*r, s)``; the narrower side is interleaved."""

    in_features: int
    out_features: int
    nblocks: int
    rank: int

    @classmethod
    def of(
        cls, in_features: int, out_features: int, nblocks: int, rank: int | None = None
    ) -> MonarchSizes:
        """Checked sizes; ``rank`` defaults to :func:`default_rank`."""
        check_sizes(in_features, out_features, nblocks)
        rank = rank if rank is not None else default_rank(in_features, out_features, nblocks)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        return cls(in_features, out_features, nblocks, rank)

    @property
    def in_block(self) -> int:
        """``p``."""
        return math.ceil(self.in_features / self.nblocks)

    @property
    def out_block(self) -> int:
        """``s``."""
        return math.ceil(self.out_features / self.nblocks)

    @property
    def interleave_output(self) -> bool:
        """The output side is the interleaved one (``s <= p``): then Monarch(b) holds every
        block-diagonal matrix with b blocks."""
        return self.out_block <= self.in_block

    # -- the slice view: T[k, l] = W[rows of output block l, columns of input block k]

    def grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """How ``W_ext`` (``b*s x b*p``) is viewed as 4-D, and the permutation to (k, l, s', p')."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        if self.interleave_output:  # rows (s', l), columns (k, p')
            return (s, b, b, p), (2, 1, 0, 3)
        return (b, s, p, b), (3, 0, 1, 2)  # rows (l, s'), columns (p', k)

    def slices_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(b, b, s, p)`` slices ``T[k, l]`` of a dense ``n_out x n_in`` weight (padded)."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        view, perm = self.grid()
        return pad2d(weight, b * s, b * p).reshape(view).permute(perm)

    def dense_from_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`slices_of`: the ``n_out x n_in`` matrix with these slices."""
        b, p, s = self.nblocks, self.in_block, self.out_block
        view, perm = self.grid()
        inverse = [perm.index(i) for i in range(4)]
        full = slices.permute(inverse).reshape(b * s, b * p)
        return full[: self.out_features, : self.in_features]

    def dense(self, blocks1: torch.Tensor, blocks2: torch.Tensor) -> torch.Tensor:
        """The ``n_out x n_in`` matrix of the factors ``L = blocks1``, ``R = blocks2``."""
        b, p, s, r = self.nblocks, self.in_block, self.out_block, self.rank
        left = blocks1.reshape(b, p, b, r)  # [k, p', l, t]
        right = blocks2.reshape(b, b, r, s)  # [l, k, t, s']
        slices = torch.einsum("kplt,lkts->klsp", left, right)
        return self.dense_from_slices(slices)

    def project(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(L, R)`` of the Frobenius-closest Monarch matrix to ``weight``
        (``n_out x n_in``), in float64.

        Per slice ``T_kl = U S V^T``, truncated to rank ``r``:
        ``R[l, k*r:(k+1)*r, :] = (U sqrt(S))^T`` and ``L[k, :, l*r:(l+1)*r] = (sqrt(S) V^T)^T``.
        """
        b, p, s, r = self.nblocks, self.in_block, self.out_block, self.rank
        slices = self.slices_of(weight.detach().double())  # (b, b, s, p)
        u, sv, vh = torch.linalg.svd(slices, full_matrices=False)
        keep = min(r, sv.shape[-1])
        root = sv[..., :keep].sqrt()
        left_f = torch.zeros(b, b, s, r, dtype=torch.float64)  # [k, l, s', t]
        right_f = torch.zeros(b, b, r, p, dtype=torch.float64)  # [k, l, t, p']
        left_f[..., :keep] = u[..., :keep] * root.unsqueeze(-2)
        right_f[..., :keep, :] = root.unsqueeze(-1) * vh[..., :keep, :]
        # L[k, p', l*r + t] = right_f[k, l, t, p'];  R[l, k*r + t, s'] = left_f[k, l, s', t]
        blocks1 = right_f.permute(0, 3, 1, 2).reshape(b, p, b * r)
        blocks2 = left_f.permute(1, 0, 3, 2).reshape(b, b * r, s)
        return blocks1, blocks2


# ------------------------------------------------------------------------------------------------
# baselines


def block_diagonal_blocks(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The diagonal blocks ``W_kk^T`` (``(b, p, s)``) of ``weight`` (``n_out x n_in``,
    zero-padded): the Frobenius-closest block-diagonal matrix, in ``weight``'s dtype."""
    out_features, in_features = weight.shape
    b = nblocks
    p, s = math.ceil(in_features / b), math.ceil(out_features / b)
    full = pad2d(weight.detach(), b * s, b * p).reshape(b, s, b, p)
    return full.diagonal(dim1=0, dim2=2).permute(2, 1, 0)  # (b, p, s): W_kk^T


def block_diagonal_dense(blocks: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The ``n_out x n_in`` matrix of the ``(b, p, s)`` blocks (each ``W_kk^T``)."""
    full = torch.block_diag(*blocks.transpose(1, 2))  # (b*s, b*p)
    return full[:out_features, :in_features]


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)``, ``n_in x rank`` and ``rank x n_out``, with ``(down @ up)^T`` the rank-``rank``
    truncated SVD of ``weight`` (Eckart-Young), split as ``sqrt(S) V^T`` and ``U sqrt(S)``; in
    float64."""
    u, sv, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = sv[:rank].sqrt()
    return vh[:rank].T * root, root.unsqueeze(1) * u[:, :rank].T

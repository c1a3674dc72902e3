"""The substitutes of one layer: each projected in closed form (:mod:`graphopt.algebra.monarch`),
its error against the dense layer on the layer's own inputs, and the units timed on the target
(the dense layer and each substitute alone, at the layer's real input shape)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.algebra.monarch import relative_error
from graphopt.backends.measure import Latency, UnitTimer
from graphopt.nn import BlockDiagonalLinear, LowRankLinear, MonarchLinear, PointwiseConv
from graphopt.passes.substitute_monarch.plan import Candidate
from graphopt.passes.substitute_monarch.sites import CONV_MODULES, Site

UNIT_VERSION = "substitute-monarch/1"  # bump when a unit's exported form changes


def candidates(
    site: Site, nblocks: Sequence[int], block_diagonal: bool, low_rank: bool
) -> list[tuple[Candidate, nn.Module]]:
    """Projected substitutes with fewer weight parameters than the dense layer (errors unset)."""
    n_in, n_out = site.in_features, site.out_features
    dense = n_in * n_out
    weight, bias = site.weight.detach(), None if site.bias is None else site.bias.detach()
    out: dict[str, tuple[str, nn.Module]] = {}
    for b in nblocks:
        if b > min(n_in, n_out):
            continue
        mon = MonarchLinear.from_dense(weight, bias, nblocks=b)
        params = mon.blocks1.numel() + mon.blocks2.numel()
        if params >= dense:
            continue
        out.setdefault(f"monarch(b={b},r={mon.rank})", ("monarch", mon))
        if block_diagonal:
            b2 = min(max(2, round(dense / params)), min(n_in, n_out))
            out.setdefault(
                f"block-diagonal(b={b2})",
                ("block-diagonal", BlockDiagonalLinear.from_dense(weight, bias, nblocks=b2)),
            )
        if low_rank:
            k = max(1, round(params / (n_in + n_out)))
            if k * (n_in + n_out) < dense and k < min(n_in, n_out):
                out.setdefault(
                    f"low-rank(r={k})", ("low-rank", LowRankLinear.from_dense(weight, bias, rank=k))
                )
    result = []
    for label, (kind, module) in out.items():
        module.eval().requires_grad_(False)
        if site.spatial_dims:
            module = PointwiseConv(module, site.spatial_dims).eval()
        params = sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
        result.append((Candidate(label, kind, params, math.nan, math.nan), module))
    return result


def errors(site: Site, rows: torch.Tensor, module: nn.Module) -> tuple[float, float]:
    """(rel_error, 1 - mean row cosine) of ``module`` against the dense layer on ``rows``."""
    layer = module.layer if isinstance(module, PointwiseConv) else module
    x = rows.to(site.weight.dtype)
    with torch.no_grad():
        want = F.linear(x, site.weight, site.bias).double()
        got = layer(x).double()
    cos = F.cosine_similarity(got, want, dim=1, eps=1e-12)
    return relative_error(want, got), float(1.0 - cos.mean())


def dense_unit(site: Site) -> nn.Module:
    """The dense layer alone, as the backend will time it."""
    bias = site.bias is not None
    if site.spatial_dims:
        conv = CONV_MODULES[site.spatial_dims - 1]
        unit = conv(site.in_features, site.out_features, 1, bias=bias, dtype=site.weight.dtype)
        weight = site.weight.reshape(*site.weight.shape, *([1] * site.spatial_dims))
    else:
        unit = nn.Linear(site.in_features, site.out_features, bias=bias, dtype=site.weight.dtype)
        weight = site.weight
    with torch.no_grad():
        unit.weight.copy_(weight)
        if bias:
            unit.bias.copy_(site.bias)
    return unit.eval()


# ------------------------------------------------------------------------------------------------
# measuring on the target


def latencies(
    timer: UnitTimer, units: dict[str, nn.Module], shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, Latency]:
    """``{label: latency}`` of one layer's units, each timed on an input of ``shape``."""
    keys = {
        label: timer.key(
            unit=UNIT_VERSION, module=repr(module), shape=list(shape), dtype=str(dtype)
        )
        for label, module in units.items()
    }
    return timer.latencies({label: (m, [shape]) for label, m in units.items()}, dtype, keys)

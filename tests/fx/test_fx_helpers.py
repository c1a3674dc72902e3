"""graphopt.fx's shared helpers and algebra.bn_fold's channel scalings, on their own."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.algebra.bn_fold import (
    output_channel_sum,
    scale_input_channels,
    scale_output_channels,
)
from graphopt.fx.branches import conv_branch
from graphopt.fx.layers import as_bn, as_layer, call_counts, is_shared, param_owners
from graphopt.fx.memo import RunMemo
from graphopt.fx.names import fetch_attr, free_name, set_attr
from graphopt.fx.ops import is_add, is_sum


def test_free_name_takes_the_first_free_index():
    m = nn.Module()
    m.register_buffer("w_0", torch.zeros(1))
    m.register_buffer("w_2", torch.zeros(1))
    assert free_name(m, "w") == "w_1"
    assert free_name(m, "b", bare=True) == "b"
    m.register_buffer("b", torch.zeros(1))
    assert free_name(m, "b", bare=True, start=1) == "b_1"


def test_set_attr_keeps_a_parameter_a_parameter():
    m = nn.Sequential(nn.Linear(2, 3))
    m[0].weight.requires_grad_(False)
    set_attr(m, "0.weight", torch.ones(3, 2))
    assert isinstance(m[0].weight, nn.Parameter) and not m[0].weight.requires_grad
    assert torch.equal(fetch_attr(m, "0.weight"), torch.ones(3, 2))
    with pytest.raises(AttributeError):
        fetch_attr(m, "0.nothing")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_channel_scalings_match_their_formulas(groups):
    torch.manual_seed(0)
    out, c_g = 8, 3
    w = torch.randn(out, c_g, 3, 3, dtype=torch.float64)
    a = torch.rand(out, dtype=torch.float64) + 0.5
    expected = torch.stack([a[o] * w[o] for o in range(out)])
    assert torch.equal(scale_output_channels(w, a), expected)
    # ConvTranspose [C_in, C_out/g, k..]: output channel gi*(C_out/g) + j
    wt = torch.randn(4 * groups, 2, 3, dtype=torch.float64)
    at = torch.rand(2 * groups, dtype=torch.float64) + 0.5
    per_group = wt.shape[0] // groups
    expected = wt.clone()
    for gi in range(groups):
        for j in range(2):
            expected[gi * per_group : (gi + 1) * per_group, j] *= at[gi * 2 + j]
    assert torch.equal(scale_output_channels(wt, at, True, groups), expected)
    assert torch.allclose(output_channel_sum(wt, True, groups), _per_output_sum(wt, groups))
    assert torch.allclose(output_channel_sum(w), w.sum(dim=(1, 2, 3)))
    # input channel c of output o's group is group(o) * c_g + c
    cin = torch.rand(c_g * groups, dtype=torch.float64) + 0.5
    wi = torch.randn(out * groups, c_g, 3, dtype=torch.float64)
    expected = wi.clone()
    for o in range(out * groups):
        g = o // out
        expected[o] *= cin[g * c_g : (g + 1) * c_g, None]
    assert torch.equal(scale_input_channels(wi, cin, groups), expected)


def _per_output_sum(wt: torch.Tensor, groups: int) -> torch.Tensor:
    per_group, c_out_g = wt.shape[0] // groups, wt.shape[1]
    sums = [
        wt[gi * per_group : (gi + 1) * per_group, j].sum()
        for gi in range(groups)
        for j in range(c_out_g)
    ]
    return torch.stack(sums)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.w = nn.Parameter(torch.randn(3, 3, 1, 1))

    def forward(self, x):
        y = self.bn(self.conv(x)) + self.conv(x)
        return F.conv2d(y, self.w) + F.conv2d(x, self.w)


def test_layers_are_seen_alike_and_sharing_is_found():
    gm = fx.symbolic_trace(_Shared().eval())
    layers = [layer for n in gm.graph.nodes if (layer := as_layer(gm, n, True)) is not None]
    assert [layer.kind for layer in layers] == ["conv"] * 4
    assert [layer.module is not None for layer in layers] == [True, True, False, False]
    calls, owners = call_counts(gm), param_owners(gm)
    assert all(is_shared(layer, calls, owners) for layer in layers)
    bns = [bn for n in gm.graph.nodes if (bn := as_bn(gm, n)) is not None]
    assert len(bns) == 1 and bns[0].eps == 1e-5 and not bns[0].training
    adds = [n for n in gm.graph.nodes if is_add(n)]
    assert len(adds) == 2 and all(is_sum(n) for n in adds)


def test_conv_branch_is_float64_and_the_memo_converts_once():
    gm = fx.symbolic_trace(_Shared().eval())
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    memo = RunMemo(gm)
    a = conv_branch(gm, conv, single_use=False, memo=memo)
    b = conv_branch(gm, conv, single_use=False, memo=memo)
    assert a.weight.dtype == torch.float64 and a.weight is b.weight
    assert (
        not a.written
        and not memo.written(gm.conv.weight)
        and a.stride == (1, 1)
        and a.padding == (1, 1)
    )
    ref = weakref.ref(memo)
    del memo, a, b
    gc.collect()
    assert ref() is None

"""algebra.conv_merge: chains of convs merged into one, checked against running the chain in
float64; every refusal reason has a case; random chains are merged exactly or refused, never
wrong."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import fx, nn

from graphopt.algebra.conv_merge import ConvSpec, Refusal, merge
from graphopt.errors import InputError
from graphopt.passes.merge_convs import spec_of

D = torch.float64
REASONS = {
    "padding",
    "bias-at-padding",
    "residual-shape",
    "residual-centre",
    "kernel-size",
    "groups",
}


def conv(c_in, c_out, k, *, stride=1, padding=0, dilation=1, groups=1, bias=True, seed=0, dims=2):
    g = torch.Generator().manual_seed(seed)
    kernel = (k,) * dims if isinstance(k, int) else k
    w = torch.randn((c_out, c_in // groups, *kernel), generator=g, dtype=D)
    b = torch.randn(c_out, generator=g, dtype=D) if bias else None
    return ConvSpec(w, b, stride, padding, dilation, groups)


def run(chain, x, residual=False):
    y = x
    for c in chain:
        y = c(y)
    return x + y if residual else y


def close(merged, chain, x, residual=False):
    ref = run(chain, x, residual)
    out = merged(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-10 * max(ref.abs().max().item(), 1e-30)


def inputs(channels, sizes=((9, 9), (10, 12)), dims=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((2, channels, *size[:dims]), generator=g, dtype=D) for size in sizes]


# --- exact merges over the parameter grid --------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 4])  # 4 = depthwise on 4 channels
@pytest.mark.parametrize("s1,s2", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("k1,k2", list(itertools.product([1, 3, 5], repeat=2)))
def test_valid_pair_is_exact(k1, k2, s1, s2, groups):
    first = conv(4, 4, k1, stride=s1, padding=k1 // 2, groups=groups, seed=k1 + 10 * k2)
    second = conv(4, 4, k2, stride=s2, groups=groups, seed=k2)
    merged = merge([first, second])
    assert not isinstance(merged, Refusal), merged
    assert merged.groups == groups
    assert merged.stride == (s1 * s2,) * 2
    if k2 > 1 or k1 > 1:
        assert merged.kernel_size == ((k1 + (k2 - 1) * s1,) * 2 if k1 > 1 else (k2,) * 2)
    for x in inputs(4, sizes=((11, 11), (12, 13))):
        close(merged, [first, second], x)


def test_kernel_grows_by_stride_times_k2():
    """A stride-2 3x3 then a 3x3 is a 7x7 with stride 2 (algorithms.md §3.2)."""
    first, second = conv(3, 5, 3, stride=2, padding=1), conv(5, 4, 3, seed=2)
    merged = merge([first, second])
    assert (merged.kernel_size, merged.stride, merged.padding) == ((7, 7), (2, 2), (1, 1))
    for x in inputs(3):
        close(merged, [first, second], x)


def test_strided_pointwise_then_kxk_is_a_dilated_kernel():
    """1x1 stride 2 then 3x3: taps every second pixel, a 3x3 with dilation 2 (not a 5x5)."""
    first, second = conv(3, 6, 1, stride=2), conv(6, 4, 3, seed=3)
    merged = merge([first, second])
    assert (merged.kernel_size, merged.dilation, merged.stride) == ((3, 3), (2, 2), (2, 2))
    for x in inputs(3):
        close(merged, [first, second], x)


def test_dilations_compose():
    first = conv(4, 4, 3, dilation=2, padding=2, groups=4)
    second = conv(4, 4, 3, dilation=2, groups=4, seed=5)
    merged = merge([first, second])
    assert (merged.kernel_size, merged.dilation, merged.groups) == ((5, 5), (2, 2), 4)
    mixed = merge([conv(4, 4, 3, dilation=2), conv(4, 4, 3, dilation=3, seed=6)])
    assert (mixed.kernel_size, mixed.dilation) == ((11, 11), (1, 1))
    for x in inputs(4, sizes=((15, 15), (16, 14))):
        close(merged, [first, second], x)
        close(mixed, [conv(4, 4, 3, dilation=2), conv(4, 4, 3, dilation=3, seed=6)], x)


@pytest.mark.parametrize(
    "c,m,o,g1,g2,expected",
    [
        (4, 4, 4, 4, 4, 4),  # depthwise o depthwise stays depthwise
        (4, 8, 8, 4, 8, 4),  # depthwise with multiplier 2, then depthwise
        (8, 8, 8, 2, 4, 2),  # nested groups: gcd
        (6, 6, 6, 2, 3, 1),  # groups that do not line up: densified
        (4, 4, 4, 1, 4, 1),  # dense then depthwise: dense
    ],
)
def test_groups(c, m, o, g1, g2, expected):
    chain = [conv(c, m, 3, groups=g1, padding=1), conv(m, o, 3, groups=g2, seed=9)]
    merged = merge(chain)
    assert merged.groups == expected
    for x in inputs(c):
        close(merged, chain, x)


def test_linear_bottleneck_with_residual():
    """MobileNetV2 block without activations: 1x1 expand (no bias), dw 3x3 padded, 1x1 project,
    plus x -- one 3x3 conv with the identity at its centre."""
    chain = [
        conv(4, 8, 1, bias=False),
        conv(8, 8, 3, padding=1, groups=8, seed=1),
        conv(8, 4, 1, seed=2),
    ]
    merged = merge(chain, residual=True)
    assert (merged.kernel_size, merged.padding, merged.groups) == ((3, 3), (1, 1), 1)
    for x in inputs(4):
        close(merged, chain, x, residual=True)


def test_grouped_residual_and_single_conv():
    chain = [conv(4, 4, 3, padding=1, groups=2), conv(4, 4, 1, groups=2, seed=4)]
    for x in inputs(4):
        close(merge(chain, residual=True), chain, x, residual=True)
        close(merge(chain[:1], residual=True), chain[:1], x, residual=True)


def test_padding_moves_to_a_pointwise_first_conv():
    """1x1 (zero bias, any stride) then a padded kxk: the ring is W1 * 0 = 0 either way."""
    for stride in (1, 2):
        chain = [conv(3, 6, 1, stride=stride, bias=False), conv(6, 4, 5, padding=2, seed=7)]
        merged = merge(chain)
        assert merged.padding == (2 * stride,) * 2
        for x in inputs(3):
            close(merged, chain, x)


def test_padding_moves_past_a_fully_padded_conv():
    """A conv padded by its whole extent reads only padding at the ring around its output."""
    chain = [conv(3, 4, 3, padding=2, bias=False), conv(4, 4, 3, padding=1, seed=8)]
    merged = merge(chain)
    assert merged.padding == (3, 3)
    for x in inputs(3):
        close(merged, chain, x)


@pytest.mark.parametrize("dims", [1, 3])
def test_other_dimensions(dims):
    chain = [
        conv(2, 4, 1, dims=dims, bias=False),
        conv(4, 4, 3, padding=1, stride=2, dims=dims, seed=1),
        conv(4, 2, 3, dims=dims, groups=2, seed=2),
    ]
    merged = merge(chain)
    for x in inputs(2, sizes=((9, 9, 9), (8, 7, 10)), dims=dims):
        close(merged, chain, x)


def test_move_padding_changes_only_the_border():
    """Depth-compression mode: padding moved to the first conv anyway; the interior is exact."""
    chain = [conv(3, 4, 3, padding=1), conv(4, 4, 3, padding=1, seed=3)]
    merged = merge(chain, move_padding=True)
    assert merged.padding == (2, 2)
    x = inputs(3)[0]
    diff = (merged(x) - run(chain, x)).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-10
    assert diff.max() > 1e-3


# --- refusals, one case per reason ----------------------------------------------------------------


def refused(result, reason):
    assert isinstance(result, Refusal), result
    assert result.reason == reason, result
    assert str(result)


def test_refuses_padding():
    """3x3 'same' then 3x3 'same': the ring around conv1's output is not conv1 of padding."""
    result = merge([conv(3, 4, 3, padding=1, bias=False), conv(4, 4, 3, padding=1)])
    refused(result, "padding")
    assert result.position == 1


def test_refuses_bias_at_padding():
    refused(merge([conv(3, 4, 1), conv(4, 4, 3, padding=1)]), "bias-at-padding")
    # the bias reaches the ring through a later conv too
    chain = [conv(3, 4, 1, bias=False), conv(4, 4, 1), conv(4, 4, 3, padding=1)]
    refused(merge(chain), "bias-at-padding")
    assert merge(chain).position == 2


def test_refuses_residual_shape():
    refused(merge([conv(4, 6, 3, padding=1)], residual=True), "residual-shape")
    refused(merge([conv(4, 4, 3, padding=1, stride=2)], residual=True), "residual-shape")


def test_refuses_residual_centre():
    refused(merge([conv(4, 4, 3), conv(4, 4, 3)], residual=True), "residual-centre")  # valid
    refused(merge([conv(4, 4, 2), conv(4, 4, 1)], residual=True), "residual-centre")  # even


def test_refuses_kernel_size():
    chain = [conv(4, 4, 3, padding=1), conv(4, 4, 3), conv(4, 4, 3)]
    refused(merge(chain, max_kernel=5), "kernel-size")
    assert merge(chain[:2], max_kernel=5).kernel_size == (5, 5)


def test_refuses_groups():
    chain = [conv(4, 4, 3, groups=4), conv(4, 4, 1)]
    refused(merge(chain, densify=False), "groups")
    assert merge(chain).groups == 1
    assert merge([conv(4, 4, 3, groups=4), conv(4, 4, 3, groups=4)], densify=False).groups == 4


def test_malformed_chains_raise():
    with pytest.raises(InputError, match="inputs"):
        merge([conv(3, 4, 1), conv(5, 4, 1)])
    with pytest.raises(InputError, match="at least one"):
        merge([])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = F.conv2d(self.a(x), self.w, stride=1)
        return self.fc(self.b(y).mean((2, 3)))


def test_spec_of_reads_the_graph():
    gm = fx.symbolic_trace(_Net())
    nodes = {n.name: n for n in gm.graph.nodes}
    a = spec_of(gm, nodes["a"])
    assert isinstance(a, ConvSpec) and a.padding == (1, 1) and not a.bias.any()
    functional = spec_of(gm, nodes["conv2d"])
    assert isinstance(functional, ConvSpec) and functional.kernel_size == (1, 1)
    refused(spec_of(gm, nodes["b"]), "padding-mode")
    refused(spec_of(gm, nodes["fc"]), "not-a-conv")
    chain = [a, functional]
    x = torch.randn(1, 3, 6, 6, dtype=D)
    close(merge(chain), chain, x)


# --- random chains: exact or refused with a reason, never wrong ---------------------------------


@st.composite
def chains(draw):
    length = draw(st.integers(2, 4))
    channels = [draw(st.sampled_from([2, 4, 6])) for _ in range(length + 1)]
    chain = []
    for i in range(length):
        c_in, c_out = channels[i], channels[i + 1]
        common = math.gcd(c_in, c_out)
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 6) if common % g == 0]))
        k = draw(st.sampled_from([1, 2, 3, 5]))
        chain.append(
            conv(
                c_in,
                c_out,
                k,
                stride=draw(st.sampled_from([1, 1, 2])),
                padding=draw(st.sampled_from([0, 0, 1, 2, k - 1])),
                dilation=draw(st.sampled_from([1, 1, 2])),
                groups=groups,
                bias=draw(st.booleans()),
                seed=draw(st.integers(0, 1000)),
            )
        )
    residual = channels[0] == channels[-1] and draw(st.booleans())
    size = (draw(st.integers(7, 20)), draw(st.integers(7, 20)))
    return chain, residual, size


@given(chains())
def test_random_chains_exact_or_refused(case):
    chain, residual, size = case
    x = torch.randn((2, chain[0].in_channels, *size), dtype=D)
    try:
        ref = run(chain, x)
    except RuntimeError:  # the input is too small for the chain
        assume(False)
    assume(ref.numel() > 0)
    merged = merge(chain, residual=residual)
    if isinstance(merged, Refusal):
        assert merged.reason in REASONS
        return
    if residual:
        assert ref.shape == x.shape
    close(merged, chain, x, residual)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_rounds_the_float64_weights_once_to_its_dtype(dtype):
    """#15.9: ``module()`` built a float32 conv and cast it to ``dtype`` afterwards, so a
    float64 model's merged kernel was rounded to float32 on the way."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    spec = ConvSpec(w, torch.randn(6, generator=g, dtype=torch.float64), padding=1, groups=1)
    conv = spec.module(dtype)
    assert conv.weight.dtype == dtype
    assert torch.equal(conv.weight, w.to(dtype)) and torch.equal(conv.bias, spec.bias.to(dtype))


def test_module_made_under_inference_mode_can_be_trained():
    spec = ConvSpec(torch.randn(4, 4, 1, 1, dtype=torch.float64))
    with torch.inference_mode():
        conv = spec.module()
    assert not conv.weight.is_inference()
    conv(torch.randn(1, 4, 3, 3)).sum().backward()
    assert conv.weight.grad is not None

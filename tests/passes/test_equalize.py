"""equalize-layers: numerics over the layer grid, ranges made uniform, refusals, properties.

Tolerances come from ``EqualizeLayers.numerics``. First layers get output channels scaled by
factors 10^-2..10^2, the situation equalisation exists for (what BN folding produces): without
that, a wrong scale could hide behind scales near 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from graphopt import zoo
from graphopt.core.numerics import compare
from graphopt.core.pass_infra import PassContext
from graphopt.passes.equalize import (
    EqualizeLayers,
    channel_ranges,
    equalization_scales,
    range_spread,
    scale_pair,
)
from graphopt.passes.fold_conv_bn import FoldConvBN
from graphopt.testing import assert_pass_preserves, random_cnns, run_pass, seeded

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SIZE = {1: 11, 2: 7, 3: 5}


_gen = seeded


def _skew_(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Scale the output channels of ``layer`` by 10^U(-2, 2) (weights and bias together)."""
    n = layer.weight.shape[0]
    f = 10 ** (torch.rand(n, generator=_gen(seed)) * 4 - 2)
    with torch.no_grad():
        layer.weight.mul_(f.reshape(-1, *[1] * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.mul_(f)
    return layer


def _x(dims: int, c: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, c, *([_SIZE[dims]] * dims), generator=_gen(seed))


def _equalize(model: nn.Module, x: torch.Tensor, **kw):
    return assert_pass_preserves(
        EqualizeLayers(), model.eval(), (x,), more_inputs=[(_x(x.dim() - 2, x.shape[1], 5),)], **kw
    )


def _convs(gm) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


# ------------------------------------------------------------------------------------------------
# the algebra


def test_one_step_makes_both_ranges_sqrt_r1_r2():
    w1 = torch.randn(6, 4, 3, 3, generator=_gen(0)).double() * 5
    w2 = torch.randn(4, 3, 1, 1, generator=_gen(1)).double()  # groups=2: 6 inputs, 3 per group
    r1, r2 = channel_ranges(w1, 0), channel_ranges(w2, 1, groups=2)
    s = equalization_scales(r1, r2)
    w1n, _, w2n = scale_pair(w1, None, w2, s, groups=2)
    torch.testing.assert_close(channel_ranges(w1n, 0), torch.sqrt(r1 * r2))
    torch.testing.assert_close(channel_ranges(w2n, 1, groups=2), torch.sqrt(r1 * r2))
    # a dead channel keeps s = 1
    r1[0] = 0.0
    assert equalization_scales(r1, r2)[0] == 1.0


# ------------------------------------------------------------------------------------------------
# numerics over the grid


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups1,groups2", [(1, 1), (2, 1), (1, 2), (2, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_relu_conv_grid(dims, groups1, groups2, bias):
    conv = _CONV[dims]
    model = nn.Sequential(
        _skew_(conv(4, 8, 3, padding=1, groups=groups1, bias=bias)),
        nn.ReLU(),
        conv(8, 4, 3, stride=2, padding=1, groups=groups2, bias=bias),
    )
    result = _equalize(model, _x(dims, 4), expect_modified=True)
    assert result.stats["equalized"] == 1
    first, second = _convs(result.graph)
    r1, r2 = channel_ranges(first.weight, 0), channel_ranges(second.weight, 1, groups2)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)  # one pair: equal after one step


@pytest.mark.parametrize(
    "act",
    [
        nn.ReLU(),
        nn.LeakyReLU(0.1),
        nn.PReLU(8),
        nn.Identity(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(3, 1, 1),
        nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.MaxPool2d(2)),
    ],
)
def test_positively_homogeneous_activations(act):
    if isinstance(act, nn.PReLU):
        with torch.no_grad():
            act.weight.copy_(torch.rand(8, generator=_gen(3)))
    model = nn.Sequential(_skew_(nn.Conv2d(3, 8, 3)), act, nn.Conv2d(8, 5, 1))
    result = _equalize(model, _x(2, 3), expect_modified=True)
    assert result.stats["equalized"] == 1


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3, generator=_gen(4)))
        self.b1 = nn.Parameter(torch.randn(8, generator=_gen(5)))
        self.w2 = nn.Parameter(torch.randn(6, 4, 1, 1, generator=_gen(6)))
        with torch.no_grad():
            self.w1.mul_(torch.logspace(-2, 2, 8).reshape(8, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        return F.conv2d(y, self.w2, None, groups=2)


def test_functional_convs():
    result = _equalize(_Functional(), _x(2, 3), expect_modified=True)
    assert result.stats["equalized"] == 1


def test_linear_relu_linear():
    model = nn.Sequential(_skew_(nn.Linear(6, 10)), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(4, 6, generator=_gen(7))
    result = assert_pass_preserves(EqualizeLayers(), model.eval(), (x,), expect_modified=True)
    assert result.stats["equalized"] == 1


# ------------------------------------------------------------------------------------------------
# the point of it: per-channel ranges become uniform


def _pointwise_dw_pointwise(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _skew_(nn.Conv2d(4, 16, 1), seed=1),
        act(),
        _skew_(nn.Conv2d(16, 16, 3, padding=1, groups=16), seed=2),
        act(),
        nn.Conv2d(16, 8, 1),
    )


def test_chain_through_a_depthwise_conv_converges_and_evens_the_ranges():
    model = _pointwise_dw_pointwise()
    spreads = [range_spread(m.weight) for m in _convs(model)]
    result = _equalize(model, _x(2, 4), expect_modified=True)
    assert result.stats["equalized"] == 2
    assert "not-converged" not in result.stats
    after = [range_spread(m.weight) for m in _convs(result.graph)]
    # the skewed layers spread over ~10^4 (times the dw's own 10^4); after, within 100x of even
    assert max(spreads[:2]) > 1e3
    assert max(after) < max(spreads) / 50, (spreads, after)
    summary = result.decisions[-1]
    assert summary.after < summary.before / 50
    assert "equalized" in str(result.decisions[0])
    # at the fixed point each pair's scales are all within the tolerance of 1
    tol = EqualizeLayers.Options().tolerance
    convs = _convs(result.graph)
    for a, b in zip(convs, convs[1:], strict=False):
        s = equalization_scales(channel_ranges(a.weight, 0), channel_ranges(b.weight, 1, b.groups))
        assert float((s - 1).abs().max()) < 2 * tol


def test_idempotent():
    model = _pointwise_dw_pointwise()
    x = _x(2, 4)
    first = _equalize(model, x, expect_modified=True)
    second = assert_pass_preserves(EqualizeLayers(), first.graph, (x,), expect_modified=False)
    assert second.stats["equalized"] == 0


# ------------------------------------------------------------------------------------------------
# MobileNetV2


def _relu6_to_relu(module: nn.Module) -> nn.Module:
    """What DFQ does before equalising (changes the function: not part of the pass)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(module, name, nn.ReLU())
        else:
            _relu6_to_relu(child)
    return module


def test_mobilenetv2_block_relu6_is_refused_with_the_reason():
    block = zoo.randomize_bn_stats_(zoo.InvertedResidual(8, 8, 1, 6), _gen(0)).eval()
    x = torch.randn(2, 8, 8, 8, generator=_gen(1))
    folded, _ = run_pass(FoldConvBN(), block, (x,))
    result = assert_pass_preserves(EqualizeLayers(), folded, (x,), expect_modified=False)
    assert result.stats == {"skipped:not-positive-homogeneous": 2}
    assert all("ReLU6(s*x) != s*ReLU6(x)" in str(d) for d in result.decisions)


def test_mobilenetv2_block_with_relu_equalizes_expand_dw_project():
    block = _relu6_to_relu(zoo.randomize_bn_stats_(zoo.InvertedResidual(8, 16, 2, 6), _gen(0)))
    x = torch.randn(2, 8, 8, 8, generator=_gen(1))
    folded, _ = run_pass(FoldConvBN(), block.eval(), (x,))
    result = assert_pass_preserves(
        EqualizeLayers(), folded, (x,), more_inputs=[(x[:1],)], expect_modified=True
    )
    assert result.stats["equalized"] == 2
    assert result.decisions[-1].after < result.decisions[-1].before


def test_mobilenetv2_before_folding_says_to_fold_first():
    blocks = nn.Sequential(zoo.InvertedResidual(8, 16, 2, 6), zoo.InvertedResidual(16, 24, 2, 6))
    block = zoo.randomize_bn_stats_(blocks, _gen(0)).eval()  # projection -> BN -> expansion
    x = torch.randn(1, 8, 8, 8, generator=_gen(1))
    _, result = run_pass(EqualizeLayers(), block, (x,))
    assert result.stats["skipped:batchnorm-between"] >= 1
    assert any("fold-conv-bn" in str(d) for d in result.decisions)


def test_mobilenetv2_whole_network():
    m = zoo.get("mobilenetv2")
    x = torch.randn(1, 3, 64, 64, generator=_gen(2))
    folded, _ = run_pass(FoldConvBN(), m.model, (x,))
    result = assert_pass_preserves(EqualizeLayers(), folded, (x,), expect_modified=True)
    # projection -> next expansion (no activation) where no residual add reads the projection
    assert result.stats["equalized"] >= 1
    assert result.stats["skipped:not-positive-homogeneous"] > 0
    assert result.stats["skipped:output-used-elsewhere"] > 0


# ------------------------------------------------------------------------------------------------
# must not fire


@pytest.mark.parametrize(
    "act,reason",
    [
        (nn.ReLU6(), "not-positive-homogeneous"),
        (nn.GELU(), "not-positive-homogeneous"),
        (nn.Hardswish(), "not-positive-homogeneous"),
        (nn.Hardtanh(0.0, 6.0), "not-positive-homogeneous"),
        (nn.BatchNorm2d(8), "batchnorm-between"),
    ],
)
def test_refused_between(act, reason):
    model = nn.Sequential(_skew_(nn.Conv2d(3, 8, 3)), act, nn.Conv2d(8, 5, 1))
    if isinstance(act, nn.BatchNorm2d):
        zoo.randomize_bn_stats_(act, _gen(0))
    result = _equalize(model, _x(2, 3), expect_modified=False)
    assert result.stats == {f"skipped:{reason}": 1}


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _skew_(nn.Conv2d(4, 4, 3, padding=1))
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return y + self.b(torch.relu(y))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _skew_(nn.Conv2d(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


class _ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _skew_(nn.Conv2d(3, 7, 3))
        self.fc = nn.Linear(5, 2)  # reads the last (width) axis, not the channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)))


@pytest.mark.parametrize(
    "model,cin,reason",
    [
        (_Residual(), 4, "output-used-elsewhere"),
        (_Shared(), 4, "shared-weight"),
        (_ConvLinear(), 3, "shape-mismatch"),
        (
            nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.ReLU(), nn.Conv2d(4, 2, 1)),
            3,
            "transposed",
        ),
    ],
)
def test_refused_structures(model, cin, reason):
    x = _x(2, cin)
    result = assert_pass_preserves(EqualizeLayers(), model.eval(), (x,), expect_modified=False)
    assert result.stats[f"skipped:{reason}"] == 1, dict(result.stats)
    assert result.stats["equalized"] == 0


# ------------------------------------------------------------------------------------------------
# properties


@st.composite
def _chains(draw):
    """conv -> homogeneous act -> conv -> ... with random groups, kernels and skews."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    c = draw(st.sampled_from([2, 4, 6]))
    cin = c
    layers: list[nn.Module] = []
    for i in range(draw(st.integers(2, 4))):
        groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
        cout = groups * draw(st.integers(1, max(1, 8 // groups)))
        k = draw(st.sampled_from([1, 3]))
        conv = _CONV[dims](c, cout, k, padding=k // 2, groups=groups, bias=draw(st.booleans()))
        layers.append(_skew_(conv, seed=i + draw(st.integers(0, 99))))
        layers.append(draw(st.sampled_from([nn.ReLU, nn.Identity, lambda: nn.LeakyReLU(0.2)]))())
        c = cout
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*layers[:-1]).eval(), _x(dims, cin, seed=draw(st.integers(0, 99)))


@settings(max_examples=100)
@given(_chains())
def test_random_chains_keep_numerics_and_are_idempotent(case):
    model, x = case
    result = assert_pass_preserves(EqualizeLayers(), model, (x,), more_inputs=[(x[:1],)])
    assert "not-converged" not in result.stats
    assert_pass_preserves(EqualizeLayers(), result.graph, (x,), expect_modified=False)


@settings(max_examples=100)
@given(random_cnns())
def test_random_cnns_after_folding(case):
    folded, _ = run_pass(FoldConvBN(), case.model, case.inputs)
    result = assert_pass_preserves(
        EqualizeLayers(), copy.deepcopy(folded), case.inputs, more_inputs=[case.other_batch()]
    )
    if result.modified:
        assert_pass_preserves(EqualizeLayers(), result.graph, case.inputs, expect_modified=False)


def test_under_inference_mode(under_inference_mode):
    """The rescaled weights are normal parameters, also when the pass runs under
    torch.inference_mode() (inference tensors could not be fine-tuned afterwards)."""
    result = under_inference_mode(EqualizeLayers(), _pointwise_dw_pointwise().eval(), (_x(2, 4),))
    assert result.stats["equalized"] == 2


# ------------------------------------------------------------------------------------------------
# weights that forward changes in place are not rescaled (issue 15's class of bug)


class _WrittenPair(nn.Module):
    """conv -> ReLU -> conv (or Linear -> ReLU -> Linear, or 1x1 -> dw -> 1x1) whose forward also
    updates one layer's weight or bias in place, as EMA weights or weight clipping do."""

    def __init__(self, kind: str, written: str) -> None:
        super().__init__()
        self.written = written
        if kind == "linear":
            self.body = nn.Sequential(_skew_(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 5))
        elif kind == "conv":
            self.body = nn.Sequential(_skew_(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 5, 1))
        else:
            self.body = _pointwise_dw_pointwise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        layer, name = self.written.split(".")
        getattr(self.body[int(layer)], name).data.mul_(0.9).add_(0.05)
        return y


def _twice(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x.clone()) for _ in range(2)]


@pytest.mark.parametrize(
    "kind,written,refused,moved",
    [
        ("conv", "0.weight", 1, False),
        ("conv", "0.bias", 1, False),
        ("conv", "2.weight", 1, False),
        ("conv", "2.bias", 1, False),  # left as it is, but the rule is per layer: refused too
        ("linear", "0.weight", 1, False),
        ("linear", "2.weight", 1, False),
        ("dw", "2.weight", 2, False),  # the depthwise conv is in both pairs
        ("dw", "0.weight", 1, True),  # dw -> 1x1 still moves
    ],
)
def test_weight_written_in_place_in_forward_is_not_rescaled(kind, written, refused, moved):
    """Rescaled, the second call wrote into the rescaled weights (``W/s * 0.9 + 0.05`` is not
    ``(W * 0.9 + 0.05) / s``): off by 0.05-0.07. Run twice (the weights change between calls),
    the graph agrees with the model."""
    x = (
        torch.randn(2, 6, generator=_gen(1))
        if kind == "linear"
        else _x(2, 3 if kind == "conv" else 4)
    )
    model = _WrittenPair(kind, written).eval()
    want = _twice(copy.deepcopy(model), x)
    traced = copy.deepcopy(model)  # not capture: it runs the model (its state would move ahead)
    result = EqualizeLayers().run(fx.symbolic_trace(traced), PassContext(sample_inputs=(x,)))
    got = _twice(result.graph, x)
    for call, (w, g) in enumerate(zip(want, got, strict=True), 1):
        cmp = compare([w], [g], EqualizeLayers.numerics)
        assert cmp.ok, f"call {call}: {cmp.describe()}"
    assert result.stats["skipped:written-in-place"] == refused, dict(result.stats)
    assert result.modified == moved and result.stats["equalized"] == int(moved)
    assert any(str(r).endswith("written-in-place") for r in result.decisions)

"""substitute-monarch: the structured layers, their projections, the plan, and the pass.

The layers and projections are checked against their dense matrices (float64, so the
tolerances are rounding only). The pass is checked twice over: with scripted latencies (the
``scripted_timing`` fixture replaces the timing of a layer's units, not the decision logic) for
its wiring and refusals, and on ONNX Runtime itself for the claims about the target: a
substitute that is slower is not kept, one that is faster is, a second run measures nothing.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

import graphopt
from graphopt.algebra.monarch import relative_error
from graphopt.backends import measure
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import Latency, UnitTimer
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext
from graphopt.errors import PipelineError
from graphopt.frontends.torch import capture
from graphopt.nn import BlockDiagonalLinear, LowRankLinear, MonarchLinear, PointwiseConv
from graphopt.passes.substitute_monarch import (
    Candidate,
    LayerPlan,
    SubstituteMonarch,
    decide,
    plan,
)
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.target import Target
from graphopt.testing import assert_pass_preserves, run_pass, seeded

# (in_features, out_features, nblocks): square, widening, narrowing, sizes nblocks does not
# divide, one block, and the 768 -> 3072
SHAPES = [
    (64, 64, 4),
    (48, 80, 4),
    (80, 30, 4),
    (50, 70, 3),
    (7, 30, 2),
    (33, 33, 1),
    (768, 3072, 4),
]


_gen = seeded


def _random_monarch(n_in: int, n_out: int, b: int, seed: int = 0, **kw) -> MonarchLinear:
    torch.manual_seed(seed)
    return MonarchLinear(n_in, n_out, b, **kw).double()


def _params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if not n.endswith("bias"))


# ------------------------------------------------------------------------------------------------
# 1. the layers


@pytest.mark.parametrize(("n_in", "n_out", "b"), SHAPES)
def test_monarch_forward_is_its_dense_matrix(n_in, n_out, b):
    layer = _random_monarch(n_in, n_out, b)
    x = torch.randn(3, 5, n_in, generator=_gen(), dtype=torch.float64)
    want = x @ layer.dense_weight().T + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert layer(x[0, 0]).shape == (n_out,)  # an input without batch axes


@pytest.mark.parametrize(("n_in", "n_out", "b"), SHAPES[:5])
def test_baselines_forward_is_their_dense_matrix(n_in, n_out, b):
    x = torch.randn(4, 2, n_in, generator=_gen(), dtype=torch.float64)
    for layer in (
        BlockDiagonalLinear(n_in, n_out, b).double(),
        LowRankLinear(n_in, n_out, rank=2).double(),
    ):
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias)


def test_parameter_counts_follow_the_formulas():
    m = MonarchLinear(768, 3072, nblocks=4)  # p = 192, s = 768, r = ceil(192 / 4) = 48
    assert (m.in_block, m.out_block, m.rank) == (192, 768, 48)
    assert _params(m) == 4 * 4 * 48 * (192 + 768) == 737_280  # 31% of 2,359,296
    assert _params(BlockDiagonalLinear(768, 3072, 4)) == 768 * 3072 // 4
    assert _params(LowRankLinear(768, 3072, 96)) == 96 * (768 + 3072)


def test_block_diagonal_matrix_has_low_rank_monarch_slices():
    """Every slice T_kl of a block-diagonal matrix has rank <= r: the containment the
    never-worse property below rests on, checked directly (widening and narrowing)."""
    for n_in, n_out in ((96, 40), (40, 96)):
        bd = BlockDiagonalLinear(n_in, n_out, 4).double()
        mon = MonarchLinear(n_in, n_out, 4)
        slices = mon.slices_of(bd.dense_weight().detach())
        ranks = torch.linalg.matrix_rank(slices)
        assert int(ranks.max()) <= mon.rank, ranks


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(8, 3, nblocks=4)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(8, 8, rank=9)
    with pytest.raises(ValueError, match="bias"):
        MonarchLinear.from_dense(torch.randn(6, 8), torch.randn(5), nblocks=2)


def _initializer_shapes(proto: onnx.ModelProto) -> list[tuple[int, ...]]:
    return [tuple(t.dims) for t in proto.graph.initializer]


@pytest.mark.parametrize(("n_in", "n_out", "b"), [(96, 160, 4), (50, 70, 3)])
def test_monarch_exports_as_two_batched_matmuls_not_a_dense_matrix(n_in, n_out, b):
    layer = MonarchLinear(n_in, n_out, b).eval()
    proto = export_onnx(layer, (torch.randn(2, 7, n_in),))
    ops = [n.op_type for n in proto.graph.node]
    shapes = _initializer_shapes(proto)
    q = b * layer.rank
    assert ops.count("MatMul") == 2 and "Gemm" not in ops, ops
    assert (b, layer.in_block, q) in shapes and (b, q, layer.out_block) in shapes, shapes
    assert not {(n_in, n_out), (n_out, n_in)} & set(shapes), shapes
    # and ONNX Runtime computes the layer, at another batch size too
    session = OnnxRuntimeBackend("cpu").load(proto)
    x = torch.randn(5, 7, n_in, generator=_gen())
    got = torch.from_numpy(session.run([x.numpy()])[0])
    torch.testing.assert_close(got, layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_baselines_and_pointwise_conv_export_without_a_dense_matrix():
    cases = [
        (BlockDiagonalLinear(50, 70, 3), torch.randn(2, 50), [(3, 17, 24)]),
        (LowRankLinear(96, 160, 8), torch.randn(2, 96), [(96, 8), (8, 160)]),
        (PointwiseConv(MonarchLinear(64, 64, 4), 2), torch.randn(2, 64, 5, 5), [(4, 16, 16)]),
    ]
    for layer, x, expected in cases:
        proto = export_onnx(layer.eval(), (x,))
        shapes = _initializer_shapes(proto)
        assert set(expected) <= set(shapes), (type(layer).__name__, shapes)
        assert max(math.prod(s) for s in shapes) < 64 * 64, shapes
        got = OnnxRuntimeBackend("cpu").load(proto).run([x.numpy()])[0]
        torch.testing.assert_close(torch.from_numpy(got), layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_monarch_layer_traces_with_fx():
    model = nn.Sequential(MonarchLinear(24, 40, 4), nn.ReLU())
    gm = fx.symbolic_trace(model)
    x = torch.randn(3, 24)
    torch.testing.assert_close(gm(x), model(x))


# ------------------------------------------------------------------------------------------------
# 2. projections


@pytest.mark.parametrize(("n_in", "n_out", "b"), SHAPES)
def test_projection_recovers_an_exact_monarch_matrix(n_in, n_out, b):
    source = MonarchLinear(n_in, n_out, b)  # float32, as the pass sees weights
    weight = source.dense_weight().detach()
    projected = MonarchLinear.from_dense(weight, source.bias, nblocks=b)
    assert relative_error(weight, projected.dense_weight()) <= 1e-5
    x = torch.randn(4, n_in, generator=_gen())
    torch.testing.assert_close(projected(x), source(x), rtol=1e-4, atol=1e-5)


def test_baseline_projections_recover_their_own_classes():
    bd = BlockDiagonalLinear(50, 70, 3).double()
    w = bd.dense_weight().detach()
    assert relative_error(w, BlockDiagonalLinear.from_dense(w, nblocks=3).dense_weight()) == 0
    lr = LowRankLinear(40, 60, 5).double()
    w = lr.dense_weight().detach()
    assert relative_error(w, LowRankLinear.from_dense(w, rank=5).dense_weight()) < 1e-12
    # block-diagonal sits inside Monarch with the same number of blocks, every shape
    for n_in, n_out, b in SHAPES[:6]:
        w = BlockDiagonalLinear(n_in, n_out, b).double().dense_weight().detach()
        assert relative_error(w, MonarchLinear.from_dense(w, nblocks=b).dense_weight()) < 1e-12


@st.composite
def _matrices(draw):
    """Dense weights of many kinds, including the ones structured against Monarch."""
    n_in, n_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    b = draw(st.integers(1, min(n_in, n_out, 6)))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["gaussian", "low-rank", "block-diagonal", "monarch", "sparse"]))
    gen = _gen(seed)
    if kind == "gaussian":
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    elif kind == "low-rank":
        k = draw(st.integers(1, min(n_in, n_out)))
        w = torch.randn(n_out, k, generator=gen, dtype=torch.float64) @ torch.randn(
            k, n_in, generator=gen, dtype=torch.float64
        )
    elif kind == "block-diagonal":
        blocks = draw(st.integers(1, min(n_in, n_out)))
        torch.manual_seed(seed)
        w = BlockDiagonalLinear(n_in, n_out, blocks).double().dense_weight().detach()
    elif kind == "monarch":
        blocks = draw(st.integers(1, min(n_in, n_out)))
        w = _random_monarch(n_in, n_out, blocks, seed).dense_weight().detach()
    else:
        dense = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        w = dense * (torch.rand(n_out, n_in, generator=gen) < 0.2)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return SimpleNamespace(weight=w * scale, b=b, kind=kind)


@given(_matrices())
def test_monarch_projection_never_worse_than_block_diagonal_with_the_same_blocks(case):
    """A theorem, so tested on adversarial matrices too: block-diagonal(b) lies inside
    Monarch(b) (see ``test_block_diagonal_matrix_has_low_rank_monarch_slices``) and the Monarch
    projection is optimal on the padded matrix, whose padding the block-diagonal fit leaves at
    zero as well. Monarch(b) has 1-2x the parameters of block-diagonal(b)."""
    w, b = case.weight, case.b
    monarch = relative_error(w, MonarchLinear.from_dense(w, nblocks=b).dense_weight())
    block = relative_error(w, BlockDiagonalLinear.from_dense(w, nblocks=b).dense_weight())
    assert monarch <= block * (1 + 1e-9) + 1e-12, (case.kind, monarch, block)


def test_equal_parameter_count_is_no_guarantee():
    """Why the equal-parameter property holds only under a condition: Monarch(4) and
    block-diagonal(2) of a 16x16 matrix both have 128 parameters, and a matrix that *is*
    block-diagonal with 2 blocks has dense 4x4 slices that rank-1 Monarch slices cannot hold."""
    torch.manual_seed(0)
    w = BlockDiagonalLinear(16, 16, 2).double().dense_weight().detach()
    monarch = MonarchLinear.from_dense(w, nblocks=4)
    block = BlockDiagonalLinear.from_dense(w, nblocks=2)
    assert _params(monarch) == _params(block) == 128
    assert relative_error(w, block.dense_weight()) == 0.0
    assert relative_error(w, monarch.dense_weight()) > 0.3


@given(
    st.sampled_from([64, 128, 192]),
    st.sampled_from([4, 8]),
    st.integers(0, 2**16),
    st.sampled_from([1e-2, 1.0, 1e2]),
)
def test_monarch_beats_block_diagonal_of_equal_parameter_count_on_unstructured_matrices(
    n, b, seed, scale
):
    """The condition: a square n x n weight with b*b dividing n (so block-diagonal(b/2) has
    exactly Monarch(b)'s 2n^2/b parameters) and no block structure (iid Gaussian entries, the
    note's 4.3 regime). Each rank-r slice SVD keeps more energy than its parameter share, the
    diagonal blocks keep exactly their share: 0.62 vs 0.71 (b=4), 0.79 vs 0.87 (b=8)."""
    w = torch.randn(n, n, generator=_gen(seed), dtype=torch.float64) * scale
    monarch = MonarchLinear.from_dense(w, nblocks=b)
    block = BlockDiagonalLinear.from_dense(w, nblocks=b // 2)
    assert _params(monarch) == _params(block) == 2 * n * n // b
    e_monarch = relative_error(w, monarch.dense_weight())
    e_block = relative_error(w, block.dense_weight())
    assert e_monarch < e_block, (e_monarch, e_block)


@given(
    st.sampled_from([(16, 16, 4), (32, 16, 4), (12, 24, 2), (27, 9, 3)]),
    st.integers(0, 2**16),
    st.floats(1e-3, 1.0),
)
def test_projection_is_the_global_optimum(shape, seed, step):
    """Where b divides both sizes the projection is the least-squares optimum over all
    Monarch matrices: moving its factors in any direction, by any step, never lowers the error."""
    n_in, n_out, b = shape
    gen = _gen(seed)
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    best = MonarchLinear.from_dense(w, nblocks=b)
    error = relative_error(w, best.dense_weight())
    with torch.no_grad():
        for p in (best.blocks1, best.blocks2):
            p.add_(step * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert relative_error(w, best.dense_weight()) >= error - 1e-12


# ------------------------------------------------------------------------------------------------
# 3. the plan (pure)


def _candidate(label: str, error: float, ms: float | None) -> Candidate:
    return Candidate(label, label.split("(")[0], 100, error, error / 2, ms)


def _layer(dense_ms: float | None, *candidates: Candidate) -> LayerPlan:
    return LayerPlan("fc", "Linear", 64, 64, (1, 16, 64), 4096, dense_ms, list(candidates))


_LABELS = ["monarch(b=4,r=4)", "monarch(b=8,r=1)", "block-diagonal(b=2)", "low-rank(r=16)"]


@given(
    st.floats(0.001, 10.0),
    st.lists(
        st.tuples(
            st.sampled_from(_LABELS),
            st.floats(0.0, 2.0),
            st.one_of(st.none(), st.floats(0.0005, 20.0)),
        ),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    st.floats(0.0, 1.5),
    st.floats(0.5, 2.0),
)
def test_plan_never_keeps_a_slower_or_over_budget_substitute(dense_ms, raw, max_error, speedup):
    layer = _layer(dense_ms, *(_candidate(*r) for r in raw))
    (decided,) = plan([layer], metric="rel_error", max_error=max_error, min_speedup=speedup)
    eligible = [
        c
        for c in layer.candidates
        if c.rel_error <= max_error
        and c.latency_ms is not None
        and c.latency_ms < dense_ms
        and dense_ms / c.latency_ms >= speedup
    ]
    if decided.chosen is None:
        assert not eligible and decided.reason
    else:
        c = decided.chosen
        assert c.latency_ms < dense_ms and c.rel_error <= max_error  # faster, within budget
        assert c.latency_ms == min(e.latency_ms for e in eligible)  # and the fastest such
        assert decided.reason == ""
    assert layer.chosen is None  # decide() returns a copy; the input is left alone


def test_plan_reasons():
    kw = dict(metric="rel_error", max_error=0.2, min_speedup=1.05)
    fast, slow = _candidate("monarch(b=4)", 0.1, 0.5), _candidate("monarch(b=8)", 0.1, 2.0)
    assert decide(_layer(1.0), **kw).reason == "no-smaller-candidate"
    assert decide(_layer(1.0, _candidate("low-rank(r=1)", 0.9, 0.1)), **kw).reason == (
        "over-error-budget"
    )
    assert decide(_layer(None, fast), **kw).reason == "not-measured"
    assert decide(_layer(1.0, slow), **kw).reason == "not-faster"
    assert decide(_layer(0.51, fast), **kw).reason == "not-faster"  # 1.02x < min_speedup
    # min_speedup below 1 never admits a slower substitute
    assert decide(_layer(1.0, slow), **{**kw, "min_speedup": 0.1}).reason == "not-faster"
    kept = decide(_layer(1.0, slow, fast), **kw)
    assert kept.chosen == fast and kept.speedup == 2.0
    assert "kept monarch(b=4)" in str(kept) and "2.00x" in str(kept)
    # the cosine metric reads the other error
    assert decide(_layer(1.0, fast), metric="cosine", max_error=0.04, min_speedup=1).reason == (
        "over-error-budget"
    )


# ------------------------------------------------------------------------------------------------
# 4. the pass


@pytest.fixture
def scripted_timing(monkeypatch):
    """Latencies without timing anything: dense 1 ms; a candidate ``speed[kind]`` ms (0.5 ms
    unless set). Records which units each layer asked for."""
    speed: dict[str, float] = {}
    calls: list[list[str]] = []

    def fake(self, units, dtype):
        calls.append(sorted(units))
        ms = {k: 1.0 if k == "dense" else speed.get(k.split("(")[0], 0.5) for k in units}
        return {k: Latency(v, v, v, 1) for k, v in ms.items()}

    monkeypatch.setattr(UnitTimer, "_time", fake)
    return SimpleNamespace(speed=speed, calls=calls)


class _MLP(nn.Module):
    def __init__(self, n: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, n)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _monarch_mlp(n: int = 64, hidden: int = 128, b: int = 4) -> _MLP:
    """An MLP whose weights are exactly Monarch(b): the projection loses nothing."""
    torch.manual_seed(0)
    model = _MLP(n, hidden)
    with torch.no_grad():
        for fc in (model.fc1, model.fc2):
            fc.weight.copy_(MonarchLinear(fc.in_features, fc.out_features, b).dense_weight())
    return model.eval()


def _ctx(x: torch.Tensor, tmp_path, **kw) -> PassContext:
    return PassContext(sample_inputs=(x,), cache_dir=tmp_path, **kw)


def test_registered_with_options_that_print_back():
    text = 'substitute-monarch{nblocks="2,4",low_rank=false,max_error=0.3}'
    assert str(parse_pipeline(text)) == text
    p = parse_pipeline(text).instantiate()[0]
    assert isinstance(p, SubstituteMonarch) and p.nblocks == [2, 4]
    assert str(p) == text  # the instance prints its options back the same way
    assert p.numerics == Numerics.lossy("cosine", 0.9)
    assert SubstituteMonarch(output_cosine=0.5).numerics == Numerics.lossy("cosine", 0.5)
    with pytest.raises(PipelineError, match="nblocks"):
        SubstituteMonarch(nblocks="4,x")
    with pytest.raises(PipelineError, match="metric"):
        parse_pipeline("substitute-monarch{metric=l2}")


def test_keeps_an_exact_monarch_substitute_when_faster(scripted_timing, tmp_path):
    x = torch.randn(2, 16, 64, generator=_gen())
    model = _monarch_mlp()
    scripted_timing.speed.update({"block-diagonal": 0.3, "low-rank": 0.2})  # faster, but lossy
    result = assert_pass_preserves(
        SubstituteMonarch(nblocks="4", min_features=0, max_error=1e-4),
        model,
        (x,),
        more_inputs=[(torch.randn(5, 3, 64, generator=_gen(1)),)],
        expect_modified=True,
        ctx=_ctx(x, tmp_path),
    )
    assert dict(result.stats) == {"kept": 2, "kept:monarch": 2, "timed-units": 4}
    fc1, fc2 = result.graph.fc1, result.graph.fc2
    assert isinstance(fc1, MonarchLinear) and isinstance(fc2, MonarchLinear)
    assert (fc1.nblocks, fc1.interleave_output, fc2.interleave_output) == (4, False, True)
    # only the within-budget candidates were timed: dense and the exact Monarch
    assert [sorted(c) for c in scripted_timing.calls] == [["dense", "monarch(b=4,r=4)"]] * 2
    decision = result.decisions[0]
    assert decision.chosen.rel_error < 1e-6 and decision.speedup == 2.0
    over = [c for c in decision.candidates if c.latency_ms is None]
    assert {c.kind for c in over} == {"block-diagonal", "low-rank"}
    assert all(c.rel_error > 1e-4 for c in over)


def test_fastest_candidate_within_budget_wins(scripted_timing, tmp_path):
    x = torch.randn(1, 16, 64, generator=_gen())
    scripted_timing.speed.update({"monarch": 0.6, "block-diagonal": 0.4, "low-rank": 0.9})
    gm, result = run_pass(
        SubstituteMonarch(nblocks="4", min_features=0, max_error=10.0), _MLP(), (x,),
        _ctx(x, tmp_path),
    )  # fmt: skip
    assert dict(result.stats) == {"kept": 2, "kept:block-diagonal": 2, "timed-units": 8}
    assert isinstance(gm.fc1, BlockDiagonalLinear)


def test_error_is_measured_on_the_layers_own_inputs(scripted_timing, tmp_path):
    """fc2's error comes from what reaches fc2 on the calibration batches (not the sample
    inputs): relu(fc1(x)) * 10 + 3 on its first 32 features, zero on the others. fc2's weight
    is exactly Monarch on those 32 columns (input block 0, which no other block's slices touch)
    and noise elsewhere: the layer's outputs are reproduced although the weight is not."""

    class Masked(_MLP):
        def forward(self, x):
            h = torch.relu(self.fc1(x)) * 10 + 3
            return self.fc2(h * (torch.arange(128) < 32))

    torch.manual_seed(0)
    model = Masked().eval()
    with torch.no_grad():
        weight = MonarchLinear(128, 64, 4).dense_weight()
        weight[:, 32:] += torch.randn(64, 96, generator=_gen(5))
        model.fc2.weight.copy_(weight)
    x = torch.randn(1, 4, 64, generator=_gen())
    batches = [(torch.randn(2, 8, 64, generator=_gen(i)),) for i in range(3)]
    ctx = _ctx(x, tmp_path, calibration_data=iter(batches))
    _, result = run_pass(SubstituteMonarch(nblocks="4", min_features=0, max_error=10.0), model,
                         (x,), ctx)  # fmt: skip
    got = {c.label: c for c in result.decisions[1].candidates}["monarch(b=4,r=4)"]
    with torch.no_grad():
        rows = torch.cat([torch.relu(model.fc1(b[0])) * 10 + 3 for b in batches]).reshape(-1, 128)
        rows = rows * (torch.arange(128) < 32)
        monarch = MonarchLinear.from_dense(model.fc2.weight, model.fc2.bias, nblocks=4)
        want, approx = model.fc2(rows).double(), monarch(rows).double()
    rel = float((approx - want).norm() / want.norm())
    cosine = 1 - float(F.cosine_similarity(approx, want, dim=1).mean())
    assert got.rel_error == pytest.approx(rel, rel=1e-6)
    assert got.cosine_distance == pytest.approx(cosine, rel=1e-4, abs=1e-9)
    assert rel < 1e-5 and relative_error(model.fc2.weight, monarch.dense_weight()) > 0.5


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(96, 64, generator=_gen()) / 8)
        self.b = nn.Parameter(torch.randn(96, generator=_gen(1)))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


def test_functional_linear_and_pointwise_conv_are_substituted(scripted_timing, tmp_path):
    conv = nn.Sequential(nn.Conv2d(64, 48, 1), nn.ReLU()).eval()
    for model, x in (
        (_Functional().eval(), torch.randn(2, 64, generator=_gen())),
        (conv, torch.randn(2, 64, 3, 3, generator=_gen())),
    ):
        gm, result = run_pass(
            SubstituteMonarch(nblocks="4", min_features=0, max_error=10.0, block_diagonal=False,
                              low_rank=False), model, (x,), _ctx(x, tmp_path),
        )  # fmt: skip
        assert result.stats["kept:monarch"] == 1, dict(result.stats)
        (module,) = [m for m in gm.modules() if isinstance(m, MonarchLinear)]
        weight = model.w if isinstance(model, _Functional) else model[0].weight
        want = MonarchLinear.from_dense(weight.reshape(weight.shape[0], -1), nblocks=4)
        torch.testing.assert_close(module.dense_weight(), want.dense_weight())
        if isinstance(model, _Functional):
            expected = F.linear(x, want.dense_weight(), model.b)
            assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # old weights dropped
            assert not hasattr(gm, "w")
        else:
            assert isinstance(gm.get_submodule("0"), PointwiseConv)
            expected = torch.relu(F.conv2d(x, want.dense_weight()[..., None, None], conv[0].bias))
        torch.testing.assert_close(gm(x), expected.detach(), rtol=1e-5, atol=1e-5)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(self.fc(x))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _InputWeight(nn.Module):
    def forward(self, x, w):
        return F.linear(x, w)


_x64 = torch.randn(2, 64, generator=_gen())


@pytest.mark.parametrize(
    ("model", "inputs", "options", "stats"),
    [
        (nn.Linear(64, 32), (_x64,), {}, {"skipped:too-small": 1}),
        (_Twice(), (_x64,), {"min_features": 0}, {"skipped:shared-weight": 1}),
        (_Tied(), (_x64,), {"min_features": 0}, {"skipped:shared-weight": 2}),
        (
            nn.Sequential(nn.Conv2d(64, 64, 1, stride=2)),
            (torch.randn(1, 64, 4, 4),),
            {"min_features": 0},
            {"skipped:not-pointwise": 1},
        ),
        (nn.Sequential(nn.Conv2d(64, 64, 3)), (torch.randn(1, 64, 4, 4),), {"min_features": 0}, {}),
        (
            _InputWeight(),
            (_x64, torch.randn(64, 64)),
            {"min_features": 0},
            {"skipped:weight-not-constant": 1},
        ),
        (
            nn.Linear(64, 64).double(),
            (_x64.double(),),
            {"min_features": 0, "max_error": 0.05},
            {"skipped:over-error-budget": 1},
        ),
    ],
    ids=["small", "called-twice", "tied", "strided", "3x3", "input-weight", "over-budget"],
)
def test_refusals(scripted_timing, tmp_path, model, inputs, options, stats):
    result = assert_pass_preserves(
        SubstituteMonarch(**options),
        model.eval(),
        inputs,
        expect_modified=False,
        ctx=PassContext(sample_inputs=inputs, cache_dir=tmp_path),
    )
    assert dict(result.stats) == stats
    assert not scripted_timing.calls  # nothing eligible, nothing timed


def test_refuses_without_data_or_a_measurable_target(scripted_timing, tmp_path):
    x = torch.randn(1, 16, 64, generator=_gen())
    no_data = PassContext(cache_dir=tmp_path)
    phone = _ctx(x, tmp_path, target=Target.parse("android-arm64"))
    phone.backend = OnnxRuntimeBackend(phone.target)
    for ctx, reason in ((no_data, "no-calibration-data"), (phone, "target-not-measurable")):
        _, result = run_pass(SubstituteMonarch(min_features=0), _MLP(), (x,), ctx)
        assert (result.modified, dict(result.stats)) == (False, {f"skipped:{reason}": 2})
    assert not scripted_timing.calls


def test_slower_substitute_is_not_kept_on_onnxruntime(tmp_path):
    """64 -> 64 on 16 tokens: the two batched matmuls and three transposes cost more than one
    small GEMM (measured here: dense 0.008 ms, Monarch(4) 0.013 ms, Monarch(8) 0.017 ms)."""
    x = torch.randn(1, 16, 64, generator=_gen())
    options = dict(nblocks="4,8", min_features=0, max_error=10.0, block_diagonal=False,
                   low_rank=False, runs=20)  # fmt: skip
    result = assert_pass_preserves(
        SubstituteMonarch(**options),
        nn.Sequential(nn.Linear(64, 64)).eval(),
        (x,),
        expect_modified=False,
        ctx=_ctx(x, tmp_path),
    )
    (decision,) = result.decisions
    assert decision.reason == "not-faster" and decision.chosen is None
    assert [c.kind for c in decision.candidates] == ["monarch", "monarch"]
    assert all(c.latency_ms > decision.dense_ms for c in decision.candidates), str(decision)
    assert dict(result.stats) == {"skipped:not-faster": 1, "timed-units": 3}


def test_faster_monarch_is_kept_on_onnxruntime_and_a_second_run_measures_nothing(
    tmp_path, monkeypatch
):
    """512 -> 2048 on 16 tokens: Monarch(8) has 1/6 of the FLOPs (measured: 0.31 -> 0.10 ms)."""
    x = torch.randn(1, 16, 512, generator=_gen())
    model = nn.Sequential(nn.Linear(512, 2048)).eval()
    options = dict(nblocks="8", max_error=10.0, block_diagonal=False, low_rank=False, runs=15)
    gm, first = run_pass(SubstituteMonarch(**options), model, (x,), _ctx(x, tmp_path))
    assert first.stats["kept:monarch"] == 1 and first.stats["timed-units"] == 2, str(
        first.decisions[0]
    )
    assert isinstance(gm.get_submodule("0"), MonarchLinear)
    assert first.decisions[0].speedup > 1.05

    def no_timing(*args, **kwargs):
        raise AssertionError("the second run timed something")

    monkeypatch.setattr(measure, "time_interleaved", no_timing)
    _, second = run_pass(SubstituteMonarch(**options), model, (x,), _ctx(x, tmp_path))
    assert "timed-units" not in second.stats and second.stats["kept:monarch"] == 1
    assert second.decisions[0].dense_ms == first.decisions[0].dense_ms
    assert second.decisions[0].chosen == first.decisions[0].chosen


def test_identical_layers_are_timed_once(scripted_timing, tmp_path):
    class TwoSame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.a(x) + self.b(x)

    x = torch.randn(1, 16, 64, generator=_gen())
    opts = dict(nblocks="4", min_features=0, max_error=10.0)
    _, result = run_pass(SubstituteMonarch(**opts), TwoSame().eval(), (x,), _ctx(x, tmp_path))
    assert len(scripted_timing.calls) == 1 and result.stats["kept"] == 2


def test_finetune_hook_runs_after_a_substitution_only(scripted_timing, tmp_path):
    x = torch.randn(1, 16, 64, generator=_gen())
    seen = []

    def finetune(gm):
        seen.append((gm.training, [type(m).__name__ for m in gm.modules()]))
        gm.train()  # the pass puts the mode back

    opts = dict(nblocks="4", min_features=0, max_error=10.0, block_diagonal=False, low_rank=False,
                cache=False)  # fmt: skip
    gm, result = run_pass(SubstituteMonarch(finetune=finetune, **opts), _MLP().eval(), (x,),
                          _ctx(x, tmp_path))  # fmt: skip
    assert len(seen) == 1 and seen[0][1].count("MonarchLinear") == 2
    assert result.stats["finetuned"] == 1
    assert not any(m.training for m in gm.modules())  # put back in eval mode, every module
    assert gm.fc1.blocks1.requires_grad  # trainable, like the layer it replaced
    # through the context, and not at all when nothing changed
    scripted_timing.speed["monarch"] = 2.0
    _, result = run_pass(SubstituteMonarch(**opts), _MLP().eval(), (x,),
                         _ctx(x, tmp_path, finetune=finetune))  # fmt: skip
    assert len(seen) == 1 and "finetuned" not in result.stats
    scripted_timing.speed["monarch"] = 0.5
    run_pass(SubstituteMonarch(**opts), _MLP().eval(), (x,), _ctx(x, tmp_path, finetune=finetune))
    assert len(seen) == 2


def test_optimize_takes_the_finetune_hook_and_reports_each_layer(scripted_timing):
    x = torch.randn(1, 16, 64, generator=_gen())
    calls = []
    result = graphopt.optimize(
        _monarch_mlp(),
        "cpu",
        (x,),
        pipeline="substitute-monarch{nblocks=4,min_features=0,max_error=0.001}",
        finetune=calls.append,
        measure=False,
    )
    assert len(calls) == 1 and isinstance(calls[0], fx.GraphModule)
    record = result.report.records[0]
    assert record.stats["kept:monarch"] == 2 and len(record.decisions) == 3
    text = str(result.report)
    assert "fc1 [Linear 64->128, input 1x16x64]: kept monarch(b=4,r=4)" in text
    assert "fine-tuned with append" in text
    assert result.report.to_dict()["records"][0]["decisions"][0]["chosen"]["kind"] == "monarch"
    torch.testing.assert_close(result(x), _monarch_mlp()(x), rtol=1e-4, atol=1e-4)


def test_pass_manager_rolls_back_a_rewrite_that_breaks_the_output_contract(
    scripted_timing, tmp_path
):
    """A projection far off (Gaussian weights, everything admitted) breaks cosine >= 0.99."""
    x = torch.randn(1, 16, 64, generator=_gen())
    torch.manual_seed(0)
    model = _MLP().eval()
    gm = capture(model, (x,)).graph
    pm = PassManager([SubstituteMonarch(nblocks="8", min_features=0, max_error=10.0,
                                        output_cosine=0.99)])  # fmt: skip
    out = pm.run(gm, _ctx(x, tmp_path))
    assert out.records[0].status == "rolled-back" and out.records[0].modified
    assert isinstance(out.graph.fc1, nn.Linear)


# ------------------------------------------------------------------------------------------------
# issue 15: inference mode


def test_under_inference_mode_with_a_training_hook(scripted_timing, tmp_path, under_inference_mode):
    """The substitutes are normal parameters and the fine-tuning hook runs with autograd on,
    also when the pass runs under torch.inference_mode()."""
    x = torch.randn(1, 16, 64, generator=_gen())
    losses = []

    def finetune(gm):
        opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
        loss = gm(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))

    p = SubstituteMonarch(finetune=finetune, nblocks="4", min_features=0, max_error=1e-4)
    result = under_inference_mode(p, _monarch_mlp(), (x,), ctx=lambda: _ctx(x, tmp_path))
    assert result.stats["kept:monarch"] == 2 and result.stats["finetuned"] == 1
    assert len(losses) == 2  # one per run of the pass

"""merge-convs in depth-compression mode (``budget``): activations removed under a latency
budget chosen by importance, spans fine-tunable, then merged exactly.

Latencies are scripted (a fixed cost per conv plus 1 ms per million multiply-adds) except in
the test
that time on ONNX Runtime for real; the budget arithmetic, importance and the merge are real.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from graphopt import zoo
from graphopt.algebra import conv_merge as algebra
from graphopt.backends.measure import Latency, UnitTimer
from graphopt.core.pass_infra import PassContext
from graphopt.errors import InputError, PipelineError
from graphopt.frontends.torch import capture
from graphopt.nn import MergedSpan
from graphopt.passes.fold_conv_bn import FoldConvBN
from graphopt.passes.merge_convs import Importance, MergeConvs, find_stretches
from graphopt.passes.merge_convs import depth as merge_depth
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.testing import random_bn, seeded


def _unit_ms(unit: nn.Module, shapes: list[tuple[int, ...]]) -> float:
    conv = unit.conv
    out = conv(torch.zeros(shapes[0], dtype=conv.weight.dtype))
    return _OVERHEAD_MS + (conv.weight[0].numel() * out.numel() + out.numel()) / 1e6


_OVERHEAD_MS = 0.05  # per unit: what merging saves besides multiply-adds


@pytest.fixture
def scripted(monkeypatch):
    """Units cost 0.05 ms + 1 ms per million multiply-adds; the whole model the same per conv
    + 0.01 ms.
    ``state.model_calls`` counts the model timings asked of the backend."""
    state = SimpleNamespace(model_calls=0)

    def units(self, found, dtype):
        return {k: Latency(*(3 * [_unit_ms(u, s)]), 1) for k, (u, s) in found.items()}

    def model(timer, modules, inputs):
        state.model_calls += 1
        return {name: Latency(*(3 * [_model_ms(m, inputs)]), 1) for name, m in modules.items()}

    monkeypatch.setattr(UnitTimer, "_time", units)
    monkeypatch.setattr(merge_depth, "model_latency", model)
    return state


def _model_ms(model: nn.Module, inputs: tuple) -> float:
    """0.01 ms + each conv the model calls, costed like a unit."""
    seen = []

    def hook(m, i, o):
        seen.append(_OVERHEAD_MS + m.weight[0].numel() * o.numel() / 1e6)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    handles = [c.register_forward_hook(hook) for c in convs]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return 0.01 + sum(seen)


def _block(i: int, o: int, stride: int, t: int, seed: int) -> list[nn.Module]:
    h = i * t
    return [
        nn.Conv2d(i, h, 1, bias=False),
        random_bn(nn.BatchNorm2d, h, seed),
        nn.ReLU6(),
        nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False),
        random_bn(nn.BatchNorm2d, h, seed + 1),
        nn.ReLU6(),
        nn.Conv2d(h, o, 1, bias=False),
        random_bn(nn.BatchNorm2d, o, seed + 2),
    ]


class _IR(nn.Module):
    def __init__(self, i: int, o: int, stride: int, t: int, seed: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_block(i, o, stride, t, seed))
        self.res = stride == 1 and i == o

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class TinyMBV2(nn.Module):
    """A MobileNetV2-style network: stem, four inverted residuals (two with the skip), head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), random_bn(nn.BatchNorm2d, 8, 1), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            _IR(8, 8, 1, 3, 10), _IR(8, 12, 2, 3, 20), _IR(12, 12, 1, 3, 30), _IR(12, 16, 1, 2, 40)
        )
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyMBV2().eval()


def _x(batch: int = 1, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=seeded(seed))


def _folded(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = capture(model, (x,)).graph
    return PassManager([FoldConvBN()]).run(gm, PassContext(sample_inputs=(x,))).graph


def _ctx(x: torch.Tensor, tmp_path, **kw) -> PassContext:
    calib = [(_x(4, seed=s),) for s in (5, 6)]
    return PassContext(sample_inputs=(x,), calibration_data=calib, cache_dir=tmp_path, **kw)


# ------------------------------------------------------------------------------------------------
# the fine-tunable form


def _random_span(draw_kernels, strides, groups_dw, residual, seed):
    g = seeded(seed)
    c = 6
    specs = []
    for k, s, dw in zip(draw_kernels, strides, groups_dw, strict=True):
        groups = c if dw else 1
        specs.append(
            algebra.ConvSpec(
                torch.randn(c, c // groups, k, k, generator=g, dtype=torch.float64),
                torch.randn(c, generator=g, dtype=torch.float64),
                stride=s,
                padding=k // 2,
                groups=groups,
            )
        )
    return specs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kernels=st.lists(st.sampled_from([1, 3]), min_size=2, max_size=4),
    data=st.data(),
)
def test_merged_span_form_equals_its_merged_conv(kernels, data):
    """MergedSpan (padding moved, skips cropped) computes exactly the conv spec() returns, for
    chains with strides, depthwise convs and a residual body inside or at the end."""
    n = len(kernels)
    strides = data.draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))
    dws = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    bodies: list[tuple[int, int]] = []
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a, n - 1))
    if data.draw(st.booleans()):
        strides = [1 if a <= k <= b else s for k, s in enumerate(strides)]
        bodies = [(a, b)]
    specs = _random_span(kernels, strides, dws, bodies, seed=n)
    span = MergedSpan(specs, bodies, torch.float64)
    x = torch.randn(2, 6, 13, 11, generator=seeded(3), dtype=torch.float64)
    merged = span.spec()
    assert span.padding == merged.padding
    y = span(x)
    expected = merged(x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_merged_span_trains_its_convs():
    specs = _random_span([1, 3, 1], [1, 1, 1], [False, True, False], [], seed=4)
    span = MergedSpan(specs, [(0, 2)], torch.float32)
    x = torch.randn(2, 6, 8, 8, generator=seeded(5))
    span(x).square().mean().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in span.convs)


def test_merged_span_refuses_a_strided_body():
    specs = _random_span([1, 3], [1, 2], [False, True], [], seed=6)
    with pytest.raises(InputError, match="strided"):
        MergedSpan(specs, [(0, 1)])


# ------------------------------------------------------------------------------------------------
# finding stretches through activations


def test_mobilenetv2_is_one_stretch_through_its_activations():
    entry = zoo.get("mobilenetv2")
    x = entry.example_inputs[0][:, :, :64, :64]
    gm = _folded(entry.model, x)
    (stretch,), _ = find_stretches(gm, through_activations=True)
    assert stretch.length == 52
    assert len(stretch.residuals) == 10
    assert len(stretch.acts) == 35  # every ReLU6, the last conv's included
    assert 52 in stretch.acts  # the head's activation, after the last position
    exact, _ = find_stretches(gm)
    assert all(not s.acts for s in exact)  # exact mode stops at every activation


def test_functional_activations_are_found():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (
                nn.Conv2d(3, 4, 3, padding=1),
                nn.Conv2d(4, 4, 1),
                nn.Conv2d(4, 2, 1),
            )

        def forward(self, x):
            return F.relu(self.c(self.b(torch.relu(self.a(x))).relu()))

    x = _x()
    gm = capture(Net().eval(), (x,)).graph
    (stretch,), _ = find_stretches(gm, through_activations=True)
    assert stretch.length == 3 and sorted(stretch.acts) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# the pass, scripted latencies


def test_plan_meets_the_budget_and_the_result_is_the_finetuned_architecture(scripted, tmp_path):
    """The hook sees the architecture (activations gone, spans fine-tunable); the merged graph
    computes what that architecture computes after the hook, within the exact tolerance."""
    model, x = _model(), _x()
    gm = _folded(model, x)
    probe = _x(3, seed=9)
    seen = {}

    def finetune(g: fx.GraphModule) -> None:
        spans = [m for m in g.modules() if isinstance(m, MergedSpan)]
        assert spans, "the hook runs on the fine-tunable form"
        with torch.no_grad():  # "training": every parameter moves
            for p in g.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=seeded(7)))
        seen["out"] = g(probe).detach()
        seen["relu6"] = sum(isinstance(m, nn.ReLU6) for _, m in _called(g))

    before_relu6 = sum(isinstance(m, nn.ReLU6) for _, m in _called(gm))
    p = MergeConvs(budget=0.6, finetune=finetune)
    result = p.run(gm, _ctx(x, tmp_path))
    (decision,) = result.decisions
    assert result.modified
    assert decision.predicted_ms <= 0.6 * decision.unmerged_ms + 1e-9
    assert result.stats["activations-removed"] == len(decision.removed) > 0
    assert seen["relu6"] == before_relu6 - len(decision.removed)
    assert not any(isinstance(m, MergedSpan) for m in result.graph.modules())
    out = result.graph(probe).detach()
    torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-5 * float(out.abs().max()))
    assert result.stats["merged-spans"] >= 1
    assert decision.finetuned == "finetune"
    assert "activations removed" in str(decision)


def _called(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    return [(n.target, gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def test_tighter_budgets_remove_more(scripted, tmp_path):
    x = _x()
    removed, predicted = [], []
    for budget in (0.9, 0.75, 0.6):
        gm = _folded(_model(), x)
        result = MergeConvs(budget=budget).run(gm, _ctx(x, tmp_path))
        (d,) = result.decisions
        removed.append(len(d.removed))
        predicted.append(d.predicted_ms)
    assert removed == sorted(removed) and removed[-1] > removed[0]
    assert predicted == sorted(predicted, reverse=True)


def test_importance_decides_which_activation_goes(scripted, tmp_path):
    """Two identical 1x1 pairs; a large positive bias keeps one ReLU's input positive, so
    removing that ReLU changes nothing: the plan removes it, not the other."""

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = seeded(11)
            self.a1, self.a2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.b1, self.b2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            for conv in (self.a1, self.a2, self.b1, self.b2):
                conv.weight.data = torch.randn(4, 4, 1, 1, generator=g)
                conv.bias.data = torch.randn(4, generator=g)
            self.b1.bias.data += 50.0  # ReLU after b1 sees positive inputs only

        def forward(self, x):
            y = self.a2(torch.relu(self.a1(x)))  # this ReLU matters
            return self.b2(torch.relu(self.b1(torch.relu(y))))

    x = torch.randn(1, 4, 8, 8, generator=seeded(12))
    gm = capture(Twin().eval(), (x,)).graph
    calib = [(torch.randn(8, 4, 8, 8, generator=seeded(13)),)]
    ctx = PassContext(sample_inputs=(x,), calibration_data=calib, cache_dir=tmp_path)
    result = MergeConvs(budget=0.85).run(gm, ctx)
    (d,) = result.decisions
    assert d.removed == ["relu_2"], str(d)
    assert d.importance == pytest.approx(0.0, abs=1e-12)


def test_metric_drives_importance(scripted, tmp_path):
    x = _x()
    calls = []

    def agreement(predict) -> float:
        calls.append(1)
        return float((predict(probe.numpy()).argmax(1) == reference).mean())

    probe = _x(8, seed=21)
    with torch.no_grad():
        reference = _model()(probe).argmax(1).numpy()
    gm = _folded(_model(), x)
    result = MergeConvs(budget=0.7, metric=agreement).run(gm, _ctx(x, tmp_path))
    (d,) = result.decisions
    assert d.importance_source == "metric agreement"
    assert len(calls) == d.evaluated_sets + 1  # the base and each distinct removed set


def test_budget_below_what_any_plan_reaches_is_an_error(scripted, tmp_path):
    x = _x()
    gm = _folded(_model(), x)
    with pytest.raises(InputError, match="budget"):
        MergeConvs(budget=0.01).run(gm, _ctx(x, tmp_path))


def test_failed_plan_is_rolled_back_and_reported(scripted, tmp_path):
    x = _x()
    gm = _folded(_model(), x)
    code = gm.code
    result = PassManager([MergeConvs(budget=0.01)]).run(gm, _ctx(x, tmp_path))
    assert result.graph.code == code
    assert result.records[0].status == "failed" and "budget" in result.records[0].message


def test_options_are_checked():
    with pytest.raises(PipelineError, match="not both"):
        MergeConvs(budget=0.5, budget_ms=3.0)
    with pytest.raises(PipelineError, match="budget"):
        MergeConvs(budget=1.5)
    (p,) = parse_pipeline("merge-convs{budget=0.7}")
    assert str(p.instantiate().numerics) == "lossy(cosine >= 0.5)"
    assert str(MergeConvs().numerics) == "exact"


def test_no_calibration_data_leaves_the_graph(scripted):
    x = _x()
    gm = _folded(_model(), x)
    result = MergeConvs(budget=0.7).run(gm, PassContext())
    assert not result.modified and result.stats["skipped:no-calibration-data"] == 1


def test_users_model_is_not_mutated(scripted, tmp_path):
    model, x = _model(), _x()
    state = copy.deepcopy(model.state_dict())
    gm = _folded(model, x)
    MergeConvs(budget=0.5).run(gm, _ctx(x, tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_importance_switches_restore_the_graph():
    model, x = _model(), _x()
    gm = _folded(model, x)
    (stretch,), _ = find_stretches(gm, through_activations=True)
    imp = Importance(gm, stretch.acts, [(x,)])
    some = sorted(stretch.acts)[:2]
    assert imp.score(some) < 0
    assert imp.score([]) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(imp.copy(x), gm(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# real ONNX Runtime


def test_depth_mode_on_onnxruntime_second_run_measures_nothing(tmp_path):
    model, x = _model(), _x(size=32)
    ctx = _ctx(x, tmp_path)
    ctx.calibration_data = [(_x(4, size=32, seed=s),) for s in (5, 6)]
    first = MergeConvs(budget=0.7, runs=10, max_time_s=5).run(_folded(model, x), ctx)
    (d,) = first.decisions
    assert first.stats["timed-units"] > 0
    assert d.measured_before_ms and d.measured_after_ms
    again = MergeConvs(budget=0.7, runs=10, max_time_s=5).run(_folded(model, x), ctx)
    assert "timed-units" not in again.stats
    assert again.decisions[0].removed == d.removed


def test_a_plan_measured_over_budget_is_planned_again(scripted, monkeypatch, tmp_path):
    """The whole model measured 25% slower than the tables predict: the pass re-plans under a
    smaller budget until the measurement fits (or no faster plan exists)."""
    scripted_model = merge_depth.model_latency

    def pessimistic(timer, modules, inputs):
        out = scripted_model(timer, modules, inputs)
        if "after" in out:
            ms = out["after"].median_ms * 1.25
            out["after"] = Latency(ms, ms, ms, 1)
        return out

    monkeypatch.setattr(merge_depth, "model_latency", pessimistic)
    x = _x()
    result = MergeConvs(budget=0.8).run(_folded(_model(), x), _ctx(x, tmp_path))
    (d,) = result.decisions
    assert len(d.attempts) >= 2, str(d)
    assert d.attempts[1][0] < d.attempts[0][0]  # the second plan predicts less
    ratios = [r for _, _, r in d.attempts]
    assert d.measured_after_ms / d.measured_before_ms == pytest.approx(min(ratios))


def test_no_plan_measured_faster_leaves_the_model(scripted, monkeypatch, tmp_path):
    """Every plan measured slower whole than the model (as tiny networks can be): the pass
    changes nothing and says why."""
    scripted_model = merge_depth.model_latency

    def slower(timer, modules, inputs):
        out = scripted_model(timer, modules, inputs)
        if "after" in out:
            ms = out["before"].median_ms * 1.1
            out["after"] = Latency(ms, ms, ms, 1)
        return out

    monkeypatch.setattr(merge_depth, "model_latency", slower)
    x = _x()
    gm = _folded(_model(), x)
    code = gm.code
    result = MergeConvs(budget=0.8).run(gm, _ctx(x, tmp_path))
    (d,) = result.decisions
    assert not result.modified and result.graph.code == code
    assert d.reason == "not-faster" and result.stats["skipped:not-faster"] == 1
    assert len(d.attempts) >= 2 and "no plan was measured faster" in str(d)


# ------------------------------------------------------------------------------------------------
# issue 15: inference mode, no_grad


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_finetune_hook_trains_when_the_pass_runs_under(mode, scripted, tmp_path):
    """Run under inference_mode or no_grad, the pass calls the fine-tuning hook with autograd
    on, and the fine-tunable spans hold normal parameters: the hook's ``loss.backward()`` and
    optimizer step work (they failed: no graph under no_grad; inference tensors that autograd
    cannot save under inference_mode), and the final merge computes what the trained
    architecture computes."""
    model, x = _model(), _x()
    gm = _folded(model, x)
    probe = _x(3, seed=9)
    seen = {}

    def finetune(g: fx.GraphModule) -> None:
        opt = torch.optim.SGD(g.parameters(), lr=1e-2)
        loss = g(probe).square().mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            seen["out"] = g(probe)

    with mode():
        result = MergeConvs(budget=0.6, finetune=finetune).run(gm, _ctx(x, tmp_path))
    (decision,) = result.decisions
    assert result.modified and decision.finetuned == "finetune"
    assert not any(t.is_inference() for t in result.graph.state_dict(keep_vars=True).values())
    with torch.no_grad():
        out = result.graph(probe)
    torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-5 * float(out.abs().max()))

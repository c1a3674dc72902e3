"""Regression tests for issue 15's findings at the API boundary: what optimize() accepts, what it
refuses, and that a failed check is never returned as a working artifact."""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import Numerics, compare, exact_tolerance, rounding_error
from graphopt.core.pass_infra import Pass, PassResult
from graphopt.core.registry import register_pass
from graphopt.errors import (
    ArgumentError,
    CaptureError,
    GraphoptError,
    InputError,
    VerificationError,
)
from graphopt.testing import randomize_bn, seeded


@register_pass
class ScaleConvsForTest(Pass):
    """A wrong 'exact' rewrite that only shows on non-zero inputs: conv weights x 1.5."""

    name = "scale-convs-for-test"
    numerics = Numerics.exact()

    @dataclass(frozen=True)
    class Options:
        factor: float = 1.5

    def run(self, gm, ctx):
        n = 0
        for m in gm.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.mul_(self.options.factor)
                n += 1
        return PassResult(gm, modified=n > 0, stats=Counter(scaled=n))


def _conv_net(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.ReLU()).eval()


# -- item 4: example inputs that cannot discriminate ----------------------------------------------


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.randn(0, 3, 8, 8), "empty"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 3, 8, 8), float("inf")), "NaN/inf"),
    ],
)
def test_non_discriminating_example_inputs_are_refused(x, words):
    with pytest.raises(InputError, match=words):
        graphopt.optimize(_conv_net(), "cpu", (x,), measure=False)


def test_constant_input_is_checked_on_a_random_sample_too():
    # on all-zero inputs a bias-free conv outputs 0 whatever its weights: the wrong pass would
    # pass every check; the seeded random sample of the same shape exposes it
    zeros = torch.zeros(1, 3, 8, 8)
    result = graphopt.optimize(
        _conv_net(), "cpu", (zeros,), pipeline="scale-convs-for-test", measure=False
    )
    (record,) = result.report.records
    assert record.status == "rolled-back"
    assert "random sample" in record.comparison.output
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = _conv_net()(x)
    assert (result(x) - want).abs().max() <= exact_tolerance(want)


# -- item 5: models that update their inputs ------------------------------------------------------


class AddsToInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x += 1
        return self.conv(x)


class ScalesInputInPlace(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x.relu()


@pytest.mark.parametrize("model", [AddsToInput(), ScalesInputInPlace()], ids=type)
def test_in_place_update_of_an_input_is_refused_and_the_callers_tensor_untouched(model):
    x = torch.zeros(1, 3, 4, 4)  # zeros: x.mul_(2) shows only on the random probe
    before = x.clone()
    with pytest.raises(CaptureError, match="in place"):
        graphopt.optimize(model, "cpu", (x,), measure=False)
    assert torch.equal(x, before)


def test_optimize_never_writes_to_the_callers_tensor():
    class InPlaceInside(nn.Module):  # in-place on an intermediate is fine
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return y

    x = torch.randn(2, 3)
    before = x.clone()
    result = graphopt.optimize(InPlaceInside(), "cpu", (x,), measure=False)
    assert torch.equal(x, before)
    assert torch.allclose(result(x), x * 2 + 1)


# -- item 6: hooks ----------------------------------------------------------------------------------


def _double(module, args, out):
    return out * 2


def _negate_input(module, args):
    return (-args[0],)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_models_with_forward_hooks_are_refused_naming_the_hook(kind):
    model = _conv_net(bias=True)
    if kind == "forward":
        handle = model[0].register_forward_hook(_double)
        name = "_double"
    else:
        handle = model.register_forward_pre_hook(_negate_input)
        name = "_negate_input"
    with pytest.raises(CaptureError, match=name):
        graphopt.optimize(model, "cpu", (torch.randn(1, 3, 8, 8),), measure=False)
    handle.remove()
    graphopt.optimize(model, "cpu", (torch.randn(1, 3, 8, 8),), measure=False)


# -- item 2: what graphopt returns is in eval mode ---------------------------------------------------


def test_graph_module_from_onnx_is_in_eval_mode_and_keeps_running_stats(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval()
    randomize_bn(model[0], seeded(3))
    x = torch.randn(2, 3, 5, 5)
    path = tmp_path / "bn.onnx"
    onnx.save(export_onnx(copy.deepcopy(model), (x,)), str(path))
    result = graphopt.optimize(str(path), "cpu", (x,), measure=False)
    gm = result.graph_module
    assert not gm.training
    assert not any(m.training for m in gm.modules())
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        got = gm(torch.randn(4, 3, 5, 5) * 5 + 2)
        want = model(x)
        assert torch.allclose(gm(x), want, atol=exact_tolerance(want))
    assert got.shape == (4, 3, 5, 5)
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


# -- item 7: a violated check is raised, naming the stage -----------------------------------------


class FreshNoise(nn.Module):
    """Symbolic tracing freezes torch.randn into a constant: capture changes what it computes."""

    def forward(self, x):
        return x + torch.randn(x.shape[-1])


def test_capture_that_changes_the_model_raises_naming_capture():
    with pytest.raises(VerificationError, match="captured graph") as info:
        graphopt.optimize(FreshNoise(), "cpu", (torch.randn(2, 4),), measure=False)
    assert info.value.stage == "capture"


def test_accept_mismatch_returns_the_artifact_with_the_warning():
    result = graphopt.optimize(
        FreshNoise(), "cpu", (torch.randn(2, 4),), measure=False, accept_mismatch=True
    )
    assert any("captured graph" in w for w in result.report.warnings)


class _TimesTwo(torch.autograd.Function):
    """x * 2 in torch; its ONNX symbolic (a wrong one, on purpose) multiplies by 3."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def symbolic(g, x):
        return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(3.0)))


def times_two(x):
    return _TimesTwo.apply(x)


torch.fx.wrap("times_two")


class ExportsDifferently(nn.Module):
    def forward(self, x):
        return times_two(x)


def test_artifact_that_disagrees_raises_and_blames_the_export():
    with pytest.raises(VerificationError, match="export") as info:
        graphopt.optimize(ExportsDifferently(), "cpu", (torch.randn(2, 4),), measure=False)
    assert info.value.stage == "export"
    assert info.value.report is not None and info.value.report.warnings


# -- item 8: dtypes and shapes are compared ---------------------------------------------------------


def test_compare_refuses_another_dtype_or_shape():
    ref = [torch.tensor([1, 2, 3])]
    cmp = compare(ref, [torch.tensor([1.0, 2.0, 3.0])], Numerics.exact())
    assert not cmp.ok and cmp.metric == "dtype" and "i64" in cmp.describe()
    cmp = compare([torch.tensor(1.0)], [torch.tensor([1.0])], Numerics.exact())
    assert not cmp.ok and cmp.metric == "shape"


def test_a_cosine_near_one_is_printed_with_its_distance_to_one():
    """``.3g`` printed cosine 0.99999988 and 0.9999 alike as ``1`` (issue 18)."""
    ref = [torch.tensor([1.0, 2.0, 3.0])]
    near = compare(ref, [torch.tensor([1.0, 2.0, 3.001])], Numerics.lossy("cosine", 0.99))
    assert near.ok and "cosine 1 - " in near.describe() and "allowed >= 0.99" in near.describe()
    assert f"{1 - near.measured:.2g}" in near.describe()


# -- item 9: the exact contract of deep models -------------------------------------------------------


class Cancelling(nn.Module):
    """Two nearly equal conv+BN branches subtracted: the output is small next to the float32
    rounding of each branch, as in deep real networks (1e-5 x max|out| is below rounding)."""

    def __init__(self) -> None:
        super().__init__()
        gen = seeded(5)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        randomize_bn(self.bn_a, gen)
        self.bn_b.load_state_dict(self.bn_a.state_dict())
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(self.a.weight.shape, generator=gen) * 10)
            self.b.weight.copy_(self.a.weight * (1 + 1e-3))
            self.b.bias.copy_(self.a.bias)
        self.eval()

    def forward(self, x):
        return self.bn_a(self.a(x)) - self.bn_b(self.b(x))


def test_exact_passes_are_judged_against_the_models_own_float32_rounding():
    model = Cancelling()
    x = torch.randn(2, 8, 16, 16, generator=seeded(6)) * 10
    with torch.no_grad():
        out = model(x)
    (err,) = rounding_error(model, (x,), [out])
    assert err > 1e-5 * float(out.abs().max())  # below the old fixed bound: every pass rolled back
    result = graphopt.optimize(model, "cpu", (x,), pipeline="fold-conv-bn", measure=False)
    (record,) = result.report.records
    assert record.status == "ok" and record.stats.get("folded") == 2, str(result.report)
    assert result.report.artifact_error.ok
    # the contract still catches a real error well above rounding
    scaled = graphopt.optimize(
        model, "cpu", (x,), pipeline="scale-convs-for-test{factor=1.01}", measure=False
    )
    assert scaled.report.records[0].status == "rolled-back"


# -- item 15: bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tune_minutes": math.nan}, "tune_minutes"),
        ({"tune_minutes": -1}, "tune_minutes"),
        ({"trials": -3}, "trials"),
        ({"trials": 1.5}, "trials"),
        ({"instruments": [object()]}, "Instrument"),
        ({"metric": 3}, "metric"),
        ({"precision": "int8", "calibration_data": [], "max_drop": "0.1"}, "max_drop"),
        ({"precision": "int8", "calibration_data": [], "max_drop": math.nan}, "max_drop"),
        ({"precision": "int8", "calibration_data": 3}, "calibration_data"),
        ({"backend": 3}, "backend"),
    ],
)
def test_bad_arguments_are_argument_errors(kwargs, words):
    with pytest.raises(GraphoptError, match=words):
        graphopt.optimize(_conv_net(), "cpu", (torch.randn(1, 3, 8, 8),), measure=False, **kwargs)


def test_database_that_is_a_file_or_unwritable_is_refused(tmp_path):
    file = tmp_path / "db"
    file.write_text("not a directory")
    x = (torch.randn(1, 3, 8, 8),)
    with pytest.raises(ArgumentError, match="is a file"):
        graphopt.optimize(_conv_net(), "cpu", x, database=file, measure=False)
    with pytest.raises(ArgumentError, match="cannot create"):
        graphopt.optimize(_conv_net(), "cpu", x, database=file / "sub", measure=False)


def test_save_none_is_an_argument_error():
    result = graphopt.optimize(_conv_net(), "cpu", (torch.randn(1, 3, 8, 8),), measure=False)
    with pytest.raises(ArgumentError, match="file path"):
        result.save(None)


def test_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _conv_net()
    with pytest.raises(CaptureError, match="meta"):
        graphopt.optimize(model, "cpu", (torch.randn(1, 3, 8, 8),), measure=False)


@pytest.mark.parametrize("value, words", [(None, "None"), (3, "int")])
def test_model_returning_no_tensor_says_so(value, words):
    class Returns(nn.Module):
        def forward(self, x):
            return value

    with pytest.raises(CaptureError, match=words):
        graphopt.optimize(Returns(), "cpu", (torch.randn(1, 3),), measure=False)


def test_only_graphopt_errors_escape_the_optimized_model():
    result = graphopt.optimize(_conv_net(), "cpu", (torch.randn(1, 3, 8, 8),), measure=False)
    with pytest.raises(GraphoptError):
        result(np.zeros((1, 3, 8, 8), dtype=np.float64))
    with pytest.raises(GraphoptError):
        result("not a tensor")


# -- item 1 at the API: optimize under inference_mode and no_grad -----------------------------------


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_optimize_under_inference_mode_and_no_grad(mode):
    model = _conv_net(bias=True)
    with mode():
        x = torch.randn(2, 3, 8, 8)
        result = graphopt.optimize(model, "cpu", (x,), measure=False)
        got = result(x)
    assert result.report.artifact_error.ok
    with torch.no_grad():
        want = model(x.clone())
    assert (got - want).abs().max() <= exact_tolerance(want)
    # what comes back can be fine-tuned: no inference tensor was captured
    gm = result.graph_module
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_tune_mode_lets_only_graphopt_errors_out():
    with pytest.raises(GraphoptError):
        graphopt.tune_mode(3)
    with pytest.raises(GraphoptError):
        graphopt.tune_mode(_conv_net(), "not inputs")


def test_zero_dimensional_inputs_and_outputs_keep_their_shape():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 3

    x = torch.tensor(2.0)
    result = graphopt.optimize(Scale(), "cpu", (x,), measure=False)
    assert result.report.artifact_error.ok
    got = result(torch.tensor(5.0))
    assert got.shape == () and float(got) == 15.0


# -- item 10 and 16 at the API: the interface is kept, a fixed batch is said -------------------------


def test_onnx_model_keeps_its_input_and_output_names(tmp_path):
    x = onnx.helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["N", 4])
    unused = onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 4])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input.1"], ["logits"])], "g", [x, unused], [y]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "named.onnx"
    onnx.save(model, str(path))
    result = graphopt.optimize(str(path), "cpu", measure=False)
    saved = onnx.load(str(result.save(tmp_path / "out.onnx")))
    assert [i.name for i in saved.graph.input] == ["input.1", "mask"]
    assert [o.name for o in saved.graph.output] == ["logits"]
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(result(a, a), np.maximum(a, 0))


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)  # only the dynamo exporter

    def forward(self, x):
        return self.bn(self.conv(x)).reshape(2, 4, 36)  # the code fixes the batch at 2


def test_a_batch_the_model_fixes_is_reported_and_other_batches_refused():
    x = torch.randn(2, 3, 8, 8)
    result = graphopt.optimize(_FixedBatch().eval(), "cpu", (x,), measure=False)
    assert any("runs at the example's shapes only" in w for w in result.report.warnings)
    assert result(x).shape == (2, 4, 36)
    with pytest.raises(InputError, match="should be"):
        result(torch.randn(5, 3, 8, 8))


# -- item 11: a failure of the imported graph blames the import, not the user's inputs ---------------


def _onnx_file(tmp_path, nodes, inputs, outputs, name="m.onnx"):
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def test_imported_graph_that_fails_where_onnxruntime_runs_is_a_capture_error(tmp_path, monkeypatch):
    from graphopt.frontends.onnx.ops import elementwise

    def wrong_relu(x):  # an importer bug, injected: the translation of Relu cannot run
        return x.reshape(7, 7, 7)

    monkeypatch.setitem(elementwise._UNARY, "Relu", wrong_relu)
    f = onnx.TensorProto.FLOAT
    path = _onnx_file(
        tmp_path,
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        [onnx.helper.make_tensor_value_info("x", f, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", f, ["N", 4])],
    )
    with pytest.raises(CaptureError, match="import is at fault"):
        graphopt.optimize(path, "cpu", (torch.randn(2, 4),), measure=False)


def test_inputs_onnxruntime_refuses_too_are_the_users_input_error(tmp_path):
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    path = _onnx_file(
        tmp_path,
        [onnx.helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [
            onnx.helper.make_tensor_value_info("x", f, [2, 6]),
            onnx.helper.make_tensor_value_info("shape", i64, [2]),
        ],
        [onnx.helper.make_tensor_value_info("y", f, ["A", "B"])],
    )
    with pytest.raises(InputError, match="example inputs"):  # 12 values cannot be 5 x 5
        graphopt.optimize(path, "cpu", (torch.randn(2, 6), torch.tensor([5, 5])), measure=False)


class CountsCalls(nn.Module):
    """Updates a buffer in forward: an artifact cannot carry that state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x) * self.calls


def test_model_that_updates_its_own_buffers_is_refused_and_left_alone():
    model = CountsCalls().eval()
    with pytest.raises(CaptureError, match="calls"):
        graphopt.optimize(model, "cpu", (torch.randn(1, 3, 4, 4),), measure=False)
    assert float(model.calls) == 0.0

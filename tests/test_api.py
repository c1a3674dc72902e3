"""optimize() end to end: every zoo model, from torch and from an ONNX file; bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import exact_tolerance
from graphopt.errors import (
    CaptureError,
    GraphoptError,
    InputError,
    PipelineError,
    TargetError,
)

ZOO = zoo.names()


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_optimize_zoo_model_is_exact_and_leaves_model_alone(name):
    entry = zoo.get(name)
    before = _state(entry.model)
    result = graphopt.optimize(entry.model, "cpu", entry.example_inputs, measure=False, name=name)
    report = result.report
    assert report.graph_error.ok and report.artifact_error.ok, str(report)
    assert not report.rolled_back
    # the artifact, called like the model, on a fresh input and another batch size
    x = torch.randn(3, *entry.example_inputs[0].shape[1:])
    with torch.no_grad():
        want = entry.model(x)
    got = result(x)
    assert isinstance(got, torch.Tensor)
    assert (got - want).abs().max() <= exact_tolerance(want)
    after = entry.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if "BatchNorm2d" in report.ops_before:  # after a conv, or a branch that reparameterize merges
        assert "BatchNorm2d" not in report.ops_after


# the two biggest zoo models' ONNX files run with -m slow: dbb_resnet18's export is also read
# by test_reparameterize and test_onnx_import, and resnet50 is resnet18's structure, deeper
_ONNX_SLOW = {"dbb_resnet18", "resnet50"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _ONNX_SLOW else n for n in ZOO]
)
def test_optimize_zoo_model_from_onnx_file(name, tmp_path):
    entry = zoo.get(name)
    path = tmp_path / f"{name}.onnx"
    onnx.save(export_onnx(copy.deepcopy(entry.model), entry.example_inputs), str(path))
    result = graphopt.optimize(str(path), "cpu", measure=False)
    assert result.report.capture_method == "onnx"
    assert result.report.artifact_error.ok and result.report.graph_error.ok, str(result.report)
    x = (
        np.random.default_rng(0)
        .standard_normal((2, *entry.example_inputs[0].shape[1:]))
        .astype(np.float32)
    )
    got = result(x)
    assert isinstance(got, np.ndarray)
    with torch.no_grad():
        want = entry.model(torch.from_numpy(x))
    assert np.abs(got - want.numpy()).max() <= exact_tolerance(want)


def test_report_lists_passes_latency_and_saves(tmp_path):
    entry = zoo.get("digits_cnn")
    result = graphopt.optimize(entry.model, "cpu", entry.example_inputs)
    report = result.report
    text = str(report)
    for needle in (
        "fold-conv-bn",
        "folded=2",
        "artifact vs original model",
        "latency",
        "unrewritten export",
    ):
        assert needle in text
    assert report.latency_baseline.median_ms > 0 and report.latency_optimized.median_ms > 0
    low, high = report.latency_optimized.p10_ms, report.latency_optimized.p90_ms
    assert f"[{low:.3g}-{high:.3g}]" in text  # the spread beside the median
    assert report.speedup == pytest.approx(
        report.latency_baseline.median_ms / report.latency_optimized.median_ms
    )
    path = result.save(tmp_path / "out.onnx")
    model = onnx.load(str(path))
    assert model.ir_version <= 10
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    assert '"speedup"' in report.to_json()
    with pytest.raises(GraphoptError, match=r"saves .onnx or .ort files"):
        result.save(tmp_path / "out.so")


@pytest.mark.parametrize("mode", [torch.enable_grad, torch.inference_mode])
def test_graph_module_is_usable_as_torch_module(mode):
    entry = zoo.get("digits_cnn")
    with mode():  # users call optimize from inference code too
        result = graphopt.optimize(entry.model, "cpu", entry.example_inputs, measure=False)
        x = entry.example_inputs[0]
        got, want = result.graph_module(x), entry.model(x)
    assert [r.status for r in result.report.records] == ["ok"] * len(result.report.records)
    assert not result.graph_module.training
    assert (got - want).abs().max() <= exact_tolerance(want)


# ------------------------------------------------------------------------------------------------
# bad input: a clear GraphoptError, the process alive, the model untouched


@pytest.fixture
def small():
    entry = zoo.get("digits_cnn")
    return entry.model, entry.example_inputs


def test_corrupt_and_truncated_onnx_files(tmp_path, small):
    model, inputs = small
    good = export_onnx(model, inputs).SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot an onnx file" * 10)
    for name in ("trunc.onnx", "junk.onnx", "missing.onnx"):
        with pytest.raises(CaptureError):
            graphopt.optimize(str(tmp_path / name), "cpu", measure=False)


def test_bad_target_and_pipeline_fail_before_any_work(small):
    model, inputs = small
    before = _state(model)
    with pytest.raises(TargetError, match="Did you mean 'cpu'"):
        graphopt.optimize(model, "cpux", inputs)
    with pytest.raises(PipelineError, match="Did you mean 'fold-conv-bn'"):
        graphopt.optimize(model, "cpu", inputs, pipeline="fold-conv-bm")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_input_shape_and_dtype(small):
    model, inputs = small
    result = graphopt.optimize(model, "cpu", inputs, measure=False)
    with pytest.raises(
        InputError,
        match=r"should be x: float32\[batch,1,8,8\] \(batch: any size\).*got float32\[1, 1, 9, 8\]",
    ):
        result(torch.randn(1, 1, 9, 8))
    with pytest.raises(InputError, match="got float64"):
        result(torch.randn(1, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="takes 1 input"):
        result(inputs[0], inputs[0])
    with pytest.raises(InputError, match="raised on the example inputs"):
        graphopt.optimize(model, "cpu", (torch.randn(1, 3, 8, 8),))
    assert result(inputs[0]).shape == (1, 10)  # still works after the errors


def test_untraceable_model_gets_capture_error():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="leaf_modules"):
        graphopt.optimize(Gate(), "cpu", (torch.randn(1, 3),), measure=False)


def test_cuda_target_without_gpu_is_a_clear_error(small):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    model, inputs = small
    with pytest.raises(graphopt.BackendError, match="onnxruntime-gpu"):
        graphopt.optimize(model, "cuda", inputs)


def test_import_is_fast_and_lazy():
    code = (
        "import sys, time; t = time.perf_counter(); import graphopt; "
        "dt = time.perf_counter() - t; "
        "print(dt, 'torch' in sys.modules, 'onnxruntime' in sys.modules, 'tvm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dt, has_torch, has_ort, has_tvm = out.stdout.split()
    assert (has_torch, has_ort, has_tvm) == ("False", "False", "False")
    assert float(dt) < 1.0
    # and the lazy attributes resolve
    code = "import graphopt; print(graphopt.optimize.__name__, graphopt.PassManager.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["optimize", "PassManager"]


# ------------------------------------------------------------------------------------------------
# an artifact that disagrees: bisection names the pass


def _shifted_when_exported(x):
    """The identity in torch, x + 1 in an ONNX export: a rewrite that does not survive lowering."""
    return x + 1.0 if torch.onnx.is_in_onnx_export() else x


@graphopt.register_pass
class DivergeInExport(graphopt.Pass):
    name = "test-diverge-in-export"
    numerics = graphopt.Numerics.exact()

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            node = gm.graph.call_function(_shifted_when_exported, (out.args[0],))
        out.args = (node,)
        gm.recompile()
        return graphopt.PassResult(gm, modified=True)


def test_disagreeing_artifact_is_bisected_to_the_pass(small):
    model, inputs = small
    pipeline = "fold-conv-bn,test-diverge-in-export,eliminate-dead-code"
    with pytest.raises(graphopt.VerificationError, match="test-diverge-in-export") as info:
        graphopt.optimize(model, "cpu", inputs, pipeline=pipeline, measure=False)
    assert info.value.stage == "pass test-diverge-in-export"
    assert any("test-diverge-in-export" in w for w in info.value.report.warnings)
    # an expert may take the artifact anyway: the report keeps the diagnosis
    result = graphopt.optimize(
        model, "cpu", inputs, pipeline=pipeline, measure=False, accept_mismatch=True
    )
    report = result.report
    assert report.graph_error.ok and not report.artifact_error.ok
    assert "first disagrees after pass test-diverge-in-export" in report.artifact_diagnosis
    assert report.artifact_diagnosis in str(report)


def test_onnx_file_with_batchnorm_is_folded(tmp_path):
    """An ONNX file that still has BatchNormalization nodes (exported without constant folding,
    as other frameworks' exporters do) gets them folded by the same pass."""
    entry = zoo.get("digits_cnn")
    path = tmp_path / "bn.onnx"
    torch.onnx.export(
        copy.deepcopy(entry.model),
        entry.example_inputs,
        str(path),
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    result = graphopt.optimize(str(path), "cpu", measure=False)
    assert result.report.records[2].stats["folded"] == 2
    assert result.report.artifact_error.ok
    out = result.save(tmp_path / "folded.onnx")
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}

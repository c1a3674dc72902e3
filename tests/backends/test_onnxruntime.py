"""ONNX Runtime backend: sessions and their settings, errors, measurement and its cache, the
batch kept dynamic or made static (and said). The export itself: test_export.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt.backends import exported, get_backend
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import LatencyCache
from graphopt.backends.onnxruntime import OnnxRuntimeBackend, SettingsChoice
from graphopt.backends.onnxruntime import backend as ort_backend
from graphopt.errors import BackendError
from graphopt.testing import small_conv_net


def _model():
    return small_conv_net(0)


def test_session_settings():
    backend = OnnxRuntimeBackend("cpu", threads=1)
    opts = backend.session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert backend.settings()["providers"] == ["CPUExecutionProvider"]
    assert backend.version


def test_unloadable_model_and_bad_feed_are_backend_errors():
    backend = OnnxRuntimeBackend("cpu")
    bad = onnx.ModelProto()
    bad.ir_version = 8
    bad.graph.node.add(op_type="NoSuchOp", input=["x"], output=["y"])
    with pytest.raises(BackendError, match="could not load"):
        backend.load(bad)
    m, x = _model()
    artifact = backend.compile(m, (x,))
    with pytest.raises(BackendError, match="failed to run"):
        artifact.run([np.zeros((1, 4, 16, 16), np.float32)])


def test_mobile_target_verifies_here_but_refuses_timing_and_unknown_backend_is_explained():
    m, x = _model()
    backend = OnnxRuntimeBackend("android-arm64")
    assert backend.settings()["providers"] == ["CPUExecutionProvider"]
    artifact = backend.compile(m, (x,))
    (got,) = artifact.run([x.numpy()])
    with torch.no_grad():
        assert np.allclose(got, m(x).numpy(), atol=1e-5)
    with pytest.raises(BackendError, match="can't be measured from here.*TVM backend"):
        backend.measure(artifact, (x,))
    with pytest.raises(BackendError, match="can't be measured from here"):
        backend.select_settings(artifact, (x,))
    with pytest.raises(BackendError, match="unknown backend 'onnxruntim'.*Did you mean"):
        get_backend("onnxruntim", "cpu")


def test_measure_reports_median_and_spread_and_caches_on_disk(tmp_path, monkeypatch):
    m, x = _model()
    cache = LatencyCache(tmp_path / "lat.json")
    backend = OnnxRuntimeBackend("cpu", cache=cache)
    artifact = backend.compile(m, (x,))
    first = backend.measure(artifact, (x,), warmup=2, runs=10)
    assert first.runs == 10 and first.p10_ms <= first.median_ms <= first.p90_ms
    assert len(cache) == 1
    # use_cache=False measures afresh and leaves the cache alone
    other = backend.measure(
        artifact, (torch.randn(2, 3, 16, 16),), warmup=1, runs=3, use_cache=False
    )
    assert other.runs == 3 and len(cache) == 1
    calls = []
    monkeypatch.setattr(ort_backend, "time_callable", lambda *a, **k: calls.append(1))
    again = OnnxRuntimeBackend("cpu", cache=LatencyCache(tmp_path / "lat.json")).measure(
        artifact.proto, (x,), warmup=2, runs=10
    )
    assert again == first and not calls  # a second run measures nothing


def test_settings_are_first_class_and_with_settings_copies():
    backend = OnnxRuntimeBackend("cpu", threads=2)
    other = backend.with_settings(
        threads=1, optimization_level="extended", execution_mode="parallel", inter_op_threads=2
    )
    assert backend.settings()["execution_mode"] == "sequential" and backend.threads == 2
    assert other.settings() == {
        "threads": 1,
        "optimization_level": "extended",
        "providers": ["CPUExecutionProvider"],
        "execution_mode": "parallel",
        "inter_op_threads": 2,
        "spinning": True,
    }
    opts = other.session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 2
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    m, x = _model()
    session_opts = other.compile(m, (x,)).session.get_session_options()
    assert session_opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert session_opts.inter_op_num_threads == 2 and session_opts.intra_op_num_threads == 1
    with pytest.raises(BackendError, match="unknown session setting 'thread'.*Did you mean"):
        backend.with_settings(thread=1)
    with pytest.raises(BackendError, match="optimization_level must be one of.*Did you mean"):
        OnnxRuntimeBackend("cpu", optimization_level="extnded")


def test_select_settings_times_candidates_interleaved_and_picks_the_fastest_median():
    m, x = _model()
    backend = OnnxRuntimeBackend("cpu")
    proto = export_onnx(m, (x,))
    candidates = backend.candidate_settings()
    assert 1 <= len(candidates) <= 6
    assert len({tuple(sorted(c.items())) for c in candidates}) == len(candidates)
    choice = backend.select_settings(proto, (x,), runs=5, warmup=1, max_time_s=5.0)
    assert isinstance(choice, SettingsChoice)
    assert choice.best in candidates and choice.candidates[choice.label] == choice.best
    assert set(choice.timings) == set(choice.candidates) and len(choice.timings) == len(candidates)
    assert all(t.runs == 5 for t in choice.timings.values())
    assert choice.timings[choice.label].median_ms == min(
        t.median_ms for t in choice.timings.values()
    )
    assert "threads=1 sequential all" in choice.timings and str(choice).startswith("*")
    tuned = backend.with_settings(**choice.best)
    opts = tuned.load(proto).session.get_session_options()
    assert opts.intra_op_num_threads == choice.best["threads"]
    assert opts.inter_op_num_threads == choice.best["inter_op_threads"]
    assert backend.settings()["threads"] == OnnxRuntimeBackend("cpu").threads  # nothing global


def test_every_candidate_setting_gives_the_default_sessions_numbers():
    m, x = _model()
    backend = OnnxRuntimeBackend("cpu")
    proto = export_onnx(m, (x,))
    xb = torch.randn(4, 3, 16, 16).numpy()
    (want,) = backend.load(proto).run([xb])
    for settings in backend.candidate_settings():
        (got,) = backend.with_settings(**settings).load(proto).run([xb])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(settings))


# ---- issue 15: dynamic batch or a static one, said (item 16)


class _BatchFixedInCode(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x)).reshape(2, 4, 36)  # the batch is 2, in the code


def _check(artifact, m, batches):
    for batch in batches:
        x = torch.randn(batch, 3, 8, 8)
        (got,) = artifact.run([x.numpy()])
        with torch.no_grad():
            np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-4, atol=1e-5)


def test_valid_models_that_broke_the_dynamic_batch_export_lower():
    x = torch.randn(2, 3, 8, 8)
    no_stats = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False)
    ).eval()
    dilated_same = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding="same", dilation=(2, 3))
    ).eval()
    for m in (no_stats, dilated_same):
        artifact = OnnxRuntimeBackend("cpu").compile(m, (x,))
        assert artifact.static_shape_reason is None
        _check(artifact, m, (2, 3))


def test_a_batch_the_model_fixes_is_static_and_said():
    m = _BatchFixedInCode().eval()
    artifact = OnnxRuntimeBackend("cpu").compile(m, (torch.randn(2, 3, 8, 8),))
    assert "input0 axis 0 fixed at the example's size" in artifact.static_shape_reason
    _check(artifact, m, (2,))


def test_a_dynamic_batch_lowering_that_cannot_run_its_example_falls_back_to_static():
    class Split(torch.nn.Module):
        def forward(self, x):  # split a 1-D input along its only (batch) axis
            return torch.split(x * 2, 2, 0)

    x = torch.randn(7)
    artifact = OnnxRuntimeBackend("cpu").compile(Split(), (x,))
    assert "fixed at the example's ([7])" in artifact.static_shape_reason
    assert "ONNX Runtime failed to run" in artifact.static_shape_reason
    got = artifact.run([x.numpy()])
    assert [g.shape for g in got] == [(2,), (2,), (2,), (1,)]
    np.testing.assert_allclose(np.concatenate(got), x.numpy() * 2, rtol=1e-6)


def test_a_failing_dynamic_batch_export_falls_back_to_a_static_batch(monkeypatch):
    real = exported.export_onnx

    def no_dynamic(module, inputs, *, dynamic_axes=None, **kw):
        if dynamic_axes is None or any(dynamic_axes.values()):
            raise BackendError("could not export the graph to ONNX: something dynamic")
        return real(module, inputs, dynamic_axes={}, **kw)

    monkeypatch.setattr(exported, "export_onnx", no_dynamic)
    m, x = _model()
    artifact = OnnxRuntimeBackend("cpu").compile(m, (x,))
    assert artifact.static_shape_reason.startswith(
        "the shapes are fixed at the example's ([1, 3, 16, 16]): with dynamic axes"
    )
    assert "something dynamic" in artifact.static_shape_reason
    (got,) = artifact.run([x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-4, atol=1e-5)
    dims = artifact.proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1


def test_an_export_that_froze_a_runtime_value_is_refused_not_returned(monkeypatch):
    from onnx import TensorProto, helper

    # what the dynamo exporter made of ReduceMax with runtime axes: a constant of the wrong shape
    frozen = helper.make_model(
        helper.make_graph(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["output0"],
                    value=helper.make_tensor("v", TensorProto.FLOAT, [2, 0, 4], []),
                )
            ],
            "frozen",
            [helper.make_tensor_value_info("input0", TensorProto.FLOAT, [2, 3, 4])],
            [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [2, 0, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    frozen.ir_version = 8
    monkeypatch.setattr(exported, "export_onnx", lambda *a, **k: frozen)

    class Max(torch.nn.Module):
        def forward(self, x):
            return x.amax(1, keepdim=True)

    with pytest.raises(BackendError, match=r"shapes \[\(2, 0, 4\)\] on the example, the model"):
        OnnxRuntimeBackend("cpu").compile(Max(), (torch.randn(2, 3, 4),))

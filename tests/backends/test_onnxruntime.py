"""ONNX Runtime backend: export with a dynamic batch, sessions, errors, measurement and cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt.backends import get_backend
from graphopt.backends import onnxruntime as ort_backend
from graphopt.backends.measure import Latency, LatencyCache, time_interleaved
from graphopt.backends.onnxruntime import OnnxRuntimeBackend, SettingsChoice, export_onnx
from graphopt.capture import capture
from graphopt.errors import BackendError
from graphopt.testing import small_conv_net


def _model():
    return small_conv_net(0)


def test_export_keeps_batch_dynamic_and_ir_version_loadable():
    m, x = _model()
    gm = capture(m, (x,)).graph
    proto = export_onnx(gm, (x,), input_names=["image"])
    assert proto.ir_version <= 10
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert proto.graph.input[0].name == "image"
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 16, 16)
        (got,) = artifact.run([xb.numpy()])
        with torch.no_grad():
            want = m(xb).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


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


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "lat.json"
    for content in ("{not json", json.dumps({"version": 99, "entries": {}}), "[1, 2]"):
        path.write_text(content)
        cache = LatencyCache(path)
        with caplog.at_level(logging.WARNING):
            assert cache.get("anything") is None
        assert "ignoring latency cache" in caplog.text
        caplog.clear()
        cache.put("k", Latency(1.0, 0.9, 1.2, 10))
        assert LatencyCache(path).get("k") == Latency(1.0, 0.9, 1.2, 10)


def test_latency_statistics_and_interleaving():
    lat = Latency.from_samples([0.001, 0.002, 0.003, 0.004, 0.100])
    assert lat.median_ms == pytest.approx(3.0)
    assert lat.p10_ms < lat.median_ms < lat.p90_ms
    order = []
    result = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=0, runs=3, rewarm=0
    )
    assert order == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round
    assert result["a"].runs == result["b"].runs == 3


@pytest.mark.parametrize("rewarm", [0, 2])
def test_interleaved_timing_rewarms_each_timed_call(rewarm):
    calls = {"a": 0, "b": 0}

    def make(key):
        def fn():
            calls[key] += 1

        return fn

    timings = time_interleaved(
        {"a": make("a"), "b": make("b")}, warmup=2, runs=6, max_time_s=10.0, rewarm=rewarm
    )
    assert all(t.runs == 6 and t.median_ms >= 0 for t in timings.values())
    assert calls == {"a": 2 + 6 * (1 + rewarm), "b": 2 + 6 * (1 + rewarm)}


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

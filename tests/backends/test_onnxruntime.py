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
from graphopt.errors import BackendError, InputError
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


# ---- issue 15: the model's interface survives export (item 10)


class _TwoInTwoOut(torch.nn.Module):
    """Reads only its first input; returns two tensors."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, unused):
        y = self.linear(x)
        return y, y.relu()


def test_export_keeps_unused_inputs_by_name_count_and_order_and_takes_output_names():
    m = _TwoInTwoOut().eval()
    x, unused = torch.randn(2, 4), torch.randn(2, 7)
    proto = export_onnx(
        m, (x, unused), input_names=["x", "mask.1"], output_names=["logits:0", "act"]
    )
    # ONNX names as they are, not "mask_1": a caller feeding by name finds them
    assert [i.name for i in proto.graph.input] == ["x", "mask.1"]
    assert [o.name for o in proto.graph.output] == ["logits:0", "act"]
    mask_dims = proto.graph.input[1].type.tensor_type.shape.dim
    assert mask_dims[0].dim_param and mask_dims[1].dim_value == 7
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    got = artifact.run([x.numpy(), unused.numpy()])  # was: ValueError: zip() ...
    with torch.no_grad():
        want = m(x, unused)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="output name"):
        export_onnx(m, (x, unused), output_names=["only_one"])
    with pytest.raises(BackendError, match="repeat a name"):
        export_onnx(m, (x, unused), output_names=["y", "y"])
    with pytest.raises(InputError, match="takes 2 input"):
        artifact.run([x.numpy()])


def _shape_model(op: str) -> onnx.ModelProto:
    """An ONNX model whose integer input ``shape`` drives ``op`` at run time, plus an unused
    input."""
    from onnx import TensorProto, helper

    def const(name, values):
        return helper.make_node(
            "Constant",
            [],
            [name],
            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
        )

    x_shape = [3, 1] if op == "Expand" else [2, 3, 4]
    shape_len = {"Expand": 3, "Slice": 1, "Range": 1}.get(op, 2)
    nodes = {
        "Reshape": [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "Expand": [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "ConstantOfShape": [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["y"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.5]),
            )
        ],
        "Range": [],
        "Slice": [
            const("starts", [-1]),
            const("axes", [2]),
            const("steps", [-1]),
            helper.make_node("Slice", ["x", "starts", "shape", "axes", "steps"], ["y"]),
        ],
    }[op]
    if op == "Range":  # 0 .. shape[0], cast to float
        nodes = [
            const("zero", [0]),
            const("one", [1]),
            helper.make_node("Squeeze", ["zero"], ["start"]),
            helper.make_node("Squeeze", ["one"], ["delta"]),
            helper.make_node("Squeeze", ["shape"], ["limit"]),
            helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16),
        ]
    rank = {"Reshape": 2, "Expand": 3, "ConstantOfShape": 2, "Slice": 3, "Range": 1}[op]
    out_type = TensorProto.FLOAT16 if op == "Range" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        op,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [shape_len]),
            helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2, 5]),
        ],
        [helper.make_tensor_value_info("y", out_type, [f"d{i}" for i in range(rank)])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "op, example, other",
    [
        ("Reshape", [6, 4], [4, 6]),
        ("Expand", [2, 3, 1], [1, 3, 5]),
        ("ConstantOfShape", [2, 2], [3, 1]),
        ("Slice", [0], [-6]),
        ("Range", [3], [5]),
    ],
)
def test_runtime_shape_inputs_stay_inputs_when_an_imported_onnx_model_is_exported(
    op, example, other
):
    from graphopt.onnx_import import import_onnx

    gm = import_onnx(_shape_model(op))
    x = torch.randn(3, 1) if op == "Expand" else torch.randn(2, 3, 4)
    unused = torch.randn(2, 5)
    proto = export_onnx(
        gm, (x, torch.tensor(example), unused), input_names=["x", "shape", "unused"]
    )
    assert [i.name for i in proto.graph.input] == ["x", "shape", "unused"]
    artifact = OnnxRuntimeBackend("cpu").load(proto)
    for shape in (example, other):  # another shape value: not frozen to the example's
        (got,) = artifact.run([x.numpy(), np.array(shape, np.int64), unused.numpy()])
        with torch.no_grad():
            want = gm(x, torch.tensor(shape), unused)
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


class _ScalarInputs(torch.nn.Module):
    """0-d inputs and a 0-d output; the last axis moved with a negative index."""

    def forward(self, x, lo, hi):
        y = torch.clamp(x, lo, hi).movedim(1, -1)
        return y, (lo + hi) * 2


def test_zero_dim_inputs_and_outputs_and_negative_movedim_export_and_run():
    m = _ScalarInputs()
    x, lo, hi = torch.randn(2, 3, 4), torch.tensor(-0.5), torch.tensor(0.5)
    artifact = OnnxRuntimeBackend("cpu").compile(m, (x, lo, hi))
    assert artifact.static_batch_reason is None
    y, s = artifact.run([x.numpy(), lo.numpy(), hi.numpy()])  # was: rank 0 fed as rank 1
    want_y, want_s = m(x, lo, hi)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-6)
    assert s.shape == () and float(s) == float(want_s)


# ---- issue 15: the torch.export fallback lowers; attention exports (item 12)


class _ShapeBranch(torch.nn.Module):
    """Control flow on a shape: symbolic tracing fails, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.bn(self.linear(x))
        return -x


def test_a_torch_export_module_exports_and_still_refuses_train():
    m = _ShapeBranch().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
    x = torch.randn(3, 4)
    gm = torch.export.export(m, (x,), strict=False).module()
    artifact = OnnxRuntimeBackend("cpu").compile(gm, (x,))  # was: Calling train() ...
    (got,) = artifact.run([x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):  # torch.export's own guard is back in place
        gm.train()


def test_the_dynamo_exporter_is_installed():
    import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter imports it

    m = _TwoInTwoOut().eval()
    x = torch.randn(2, 4)
    proto = ort_backend._export_dynamo(
        m, (x, x), ["x", "unused"], ["a", "b"], True, ort_backend.OPSET, RuntimeError("-")
    )
    assert [o.name for o in proto.graph.output] == ["a", "b"]


class _Attention(torch.nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (as timm's ViT)."""

    def __init__(self, gqa: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.gqa = gqa

    def forward(self, x):
        qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.gqa:  # grouped-query: one key/value head for two query heads
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k[:, :1], v[:, :1], enable_gqa=True
            )
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_scaled_dot_product_attention_exports_with_a_dynamic_batch(gqa, traced):
    m = _Attention(gqa).eval()
    module = torch.fx.symbolic_trace(m) if traced else m
    artifact = OnnxRuntimeBackend("cpu").compile(module, (torch.randn(2, 5, 8),))
    assert artifact.static_batch_reason is None
    for batch in (1, 3):
        x = torch.randn(batch, 5, 8)
        (got,) = artifact.run([x.numpy()])
        with torch.no_grad():
            np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-5, atol=1e-5)


# ---- issue 15: exports in threads (item 13)


def test_exports_in_threads_all_succeed():
    from concurrent.futures import ThreadPoolExecutor

    def job(seed):
        m, x = small_conv_net(seed)
        (got,) = OnnxRuntimeBackend("cpu", threads=1).compile(m, (x,)).run([x.numpy()])
        with torch.no_grad():
            return float(np.abs(got - m(x).numpy()).max())

    with ThreadPoolExecutor(6) as pool:
        errors = list(pool.map(job, range(6)))  # was: 4 of 6 failed inside the exporter
    assert all(e < 1e-4 for e in errors), errors


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
        assert artifact.static_batch_reason is None
        _check(artifact, m, (2, 3))


def test_a_batch_the_model_fixes_is_static_and_said():
    m = _BatchFixedInCode().eval()
    artifact = OnnxRuntimeBackend("cpu").compile(m, (torch.randn(2, 3, 8, 8),))
    assert "batch is fixed at 2" in artifact.static_batch_reason
    _check(artifact, m, (2,))


def test_a_dynamic_batch_lowering_that_cannot_run_its_example_falls_back_to_static():
    class Split(torch.nn.Module):
        def forward(self, x):  # split a 1-D input along its only (batch) axis
            return torch.split(x * 2, 2, 0)

    x = torch.randn(7)
    artifact = OnnxRuntimeBackend("cpu").compile(Split(), (x,))
    assert "batch is fixed at 7" in artifact.static_batch_reason
    assert "ONNX Runtime failed to run" in artifact.static_batch_reason
    got = artifact.run([x.numpy()])
    assert [g.shape for g in got] == [(2,), (2,), (2,), (1,)]
    np.testing.assert_allclose(np.concatenate(got), x.numpy() * 2, rtol=1e-6)


def test_a_failing_dynamic_batch_export_falls_back_to_a_static_batch(monkeypatch):
    real = ort_backend.export_onnx

    def no_dynamic(module, inputs, *, dynamic_batch=True, **kw):
        if dynamic_batch:
            raise BackendError("could not export the graph to ONNX: something dynamic")
        return real(module, inputs, dynamic_batch=False, **kw)

    monkeypatch.setattr(ort_backend, "export_onnx", no_dynamic)
    m, x = _model()
    artifact = OnnxRuntimeBackend("cpu").compile(m, (x,))
    assert artifact.static_batch_reason.startswith("the batch is fixed at 1: with a dynamic")
    assert "something dynamic" in artifact.static_batch_reason
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
    monkeypatch.setattr(ort_backend, "export_onnx", lambda *a, **k: frozen)

    class Max(torch.nn.Module):
        def forward(self, x):
            return x.amax(1, keepdim=True)

    with pytest.raises(BackendError, match=r"shapes \[\(2, 0, 4\)\] on the example, the model"):
        OnnxRuntimeBackend("cpu").compile(Max(), (torch.randn(2, 3, 4),))

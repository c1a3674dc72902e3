"""The TVM backend: lowering, numbers, exported libraries, tuning database, targets, auto choice.

The tuning here is short (a small CNN, a few trials): the fast sibling of the slow ResNet-18
test below and of benchmarks/bench_tvm.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm", reason="the TVM backend needs pip install 'graphopt[tvm]'")

from graphopt import optimize  # noqa: E402
from graphopt.backends.tvm import (  # noqa: E402
    TuningDatabase,
    TvmBackend,
    is_cross,
    tvm_target,
)
from graphopt.errors import BackendError, GraphoptError, InputError  # noqa: E402
from graphopt.target import Target  # noqa: E402
from graphopt.testing import randomize_bn  # noqa: E402


def small_cnn(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Conv-BN-ReLU twice, pooling and a classifier; random weights and BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, gen)
    return model.eval(), (torch.randn(2, 3, 16, 16),)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small CNN tuned once (8 trials) into a database, and the result."""
    model, inputs = small_cnn()
    db = tmp_path_factory.mktemp("tvm") / "db"
    result = optimize(model, "cpu", inputs, backend="tvm", trials=8, database=db, measure=False)
    return model, inputs, db, result


def test_targets_use_the_dict_form_with_the_host_cpu():
    host = tvm_target(Target.parse("cpu"), cores=2)
    assert host.kind.name == "llvm"
    assert str(host.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()
    assert int(host.attrs["num-cores"]) == 2
    arm = tvm_target(Target.parse("aarch64-linux"))
    assert str(arm.attrs["mtriple"]) == "aarch64-linux-gnu" and is_cross(arm)
    assert not is_cross(host)
    given = tvm_target(Target.parse("llvm -mcpu=skylake-avx512 -num-cores=4"))
    assert str(given.attrs["mcpu"]) == "skylake-avx512" and int(given.attrs["num-cores"]) == 4


def test_untuned_artifact_matches_and_the_report_says_untuned(tmp_path):
    model, inputs = small_cnn(1)
    result = optimize(model, "cpu", inputs, backend="tvm", database=tmp_path / "db", measure=False)
    report = result.report
    assert report.backend == "tvm"
    assert report.artifact_error is not None and report.artifact_error.ok, report
    got = result(*inputs)
    expected = model(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=report.artifact_error.allowed)
    assert report.tvm_tasks and not any(t["status"] == "tuned" for t in report.tvm_tasks)
    assert "UNTUNED" in str(report) and any("untuned" in w for w in report.warnings)
    assert set(report.untuned_tasks) == {t["name"] for t in report.tvm_tasks}


def test_tvm_artifact_is_static_shape(tmp_path):
    model, inputs = small_cnn(2)
    result = optimize(model, "cpu", inputs, backend="tvm", database=tmp_path / "db", measure=False)
    with pytest.raises(InputError, match="should be"):
        result(torch.randn(3, 3, 16, 16))
    with pytest.raises(GraphoptError, match=r"\.so"):
        result.save(tmp_path / "model.onnx")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(GraphoptError, match="cannot write"):
        result.save(blocked / "model.so")


def test_exported_library_runs_in_a_fresh_process_without_graphopt(tuned, tmp_path):
    model, inputs, _, result = tuned
    lib = result.save(tmp_path / "model.so")
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    script = f"""
import sys, numpy as np, tvm.runtime
from tvm.runtime.vm import VirtualMachine
vm = VirtualMachine(tvm.runtime.load_module({str(lib)!r}), tvm.cpu())
out = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / "x.npy")!r})))
out = out[0] if not isinstance(out, tvm.runtime.Tensor) else out
np.save({str(tmp_path / "y.npy")!r}, out.numpy())
assert not any(m.startswith("graphopt") for m in sys.modules), "imported graphopt"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = np.load(tmp_path / "y.npy")
    expected = model(*inputs).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=result.report.artifact_error.allowed)


def test_tuning_writes_a_database_that_a_second_run_reuses(tuned):
    model, inputs, db, first = tuned
    tuning = first.report.tvm_tuning
    assert tuning["trials_run"] >= 8 and not tuning["reused"]
    assert tuning["failed_trials"] < tuning["trials_run"]
    assert any(t["status"] == "tuned" for t in first.report.tvm_tasks)
    assert first.report.artifact_error.ok
    records = (db / "database_tuning_record.json").read_text().splitlines()
    again = optimize(model, "cpu", inputs, backend="tvm", trials=8, database=db, measure=False)
    assert again.report.tvm_tuning["reused"] and again.report.tvm_tuning["trials_run"] == 0
    assert (db / "database_tuning_record.json").read_text().splitlines() == records
    assert [t["status"] for t in again.report.tvm_tasks] == [
        t["status"] for t in first.report.tvm_tasks
    ]
    np.testing.assert_array_equal(
        again.artifact.run([inputs[0].numpy()])[0], first.artifact.run([inputs[0].numpy()])[0]
    )


def test_a_larger_budget_tunes_again(tuned, tmp_path):
    model, inputs, db, _ = tuned
    copy_db = tmp_path / "db"
    shutil.copytree(db, copy_db)
    more = optimize(model, "cpu", inputs, backend="tvm", trials=9, database=copy_db, measure=False)
    assert not more.report.tvm_tuning["reused"] and more.report.tvm_tuning["trials_run"] > 0


@pytest.mark.parametrize(
    "damage",
    ["garbage-record", "truncated-workload", "bad-meta", "foreign-target"],
)
def test_corrupt_or_foreign_database_is_reported_and_ignored(tuned, tmp_path, damage):
    model, inputs, db, _ = tuned
    bad = tmp_path / "db"
    shutil.copytree(db, bad)
    if damage == "garbage-record":
        (bad / "database_tuning_record.json").write_text("not json at all\n")
    elif damage == "truncated-workload":
        text = (bad / "database_workload.json").read_text()
        (bad / "database_workload.json").write_text(text[: len(text) // 2])
    elif damage == "bad-meta":
        (bad / "graphopt.json").write_text("{")
    else:
        meta = json.loads((bad / "graphopt.json").read_text())
        meta["target"] = "llvm -keys=arm_cpu,cpu -mtriple=aarch64-linux-gnu"
        (bad / "graphopt.json").write_text(json.dumps(meta))
    result = optimize(model, "cpu", inputs, backend="tvm", database=bad, measure=False)
    kind = "foreign" if damage == "foreign-target" else "corrupt"
    assert any(f"is {kind}" in w for w in result.report.warnings), result.report.warnings
    assert list(tmp_path.glob(f"db.{kind}-*")), "the damaged database was not set aside"
    assert not any(t["status"] == "tuned" for t in result.report.tvm_tasks)
    assert result.report.artifact_error.ok


def test_database_meta_records_the_budget(tuned):
    _, _, db, _ = tuned
    meta = json.loads((db / "graphopt.json").read_text())
    assert meta["format"] == 1 and meta["budgets"]
    (spent,) = meta["budgets"].values()
    assert spent["trials"] >= 8 and spent["seconds"] > 0
    TuningDatabase(db, tvm_target(Target.parse("cpu")))  # valid: no exception, not moved
    assert db.exists()


def test_measure_api_has_the_onnxruntime_shape_and_caches(tuned):
    _, inputs, db, result = tuned
    backend = TvmBackend("cpu", database=db)
    first = backend.measure(result.artifact, inputs, runs=10)
    assert first.median_ms > 0 and first.runs >= 5
    assert backend.measure(result.artifact, inputs, runs=10) == first  # from the disk cache


def test_auto_keeps_onnxruntime_when_tvm_is_untuned(tmp_path):
    model, inputs = small_cnn(3)
    result = optimize(model, "cpu", inputs, backend="auto", database=tmp_path / "db")
    report = result.report
    assert report.backend == "onnxruntime"
    assert "not tuned" in report.backend_choice
    assert report.ort_settings_latencies and report.ort_settings["label"] in (
        report.ort_settings_latencies
    )
    assert report.latency_baseline and report.latency_optimized


def test_auto_measures_both_backends_when_tvm_is_tuned(tuned):
    model, inputs, db, _ = tuned
    result = optimize(model, "cpu", inputs, backend="auto", database=db)
    report = result.report
    labels = set(report.backend_latencies)  # "tvm", "onnxruntime <settings>", "openvino <hint>"
    assert "tvm" in labels and any(k.startswith("onnxruntime ") for k in labels)
    fastest = min(report.backend_latencies, key=lambda k: report.backend_latencies[k].median_ms)
    assert report.backend == fastest.split()[0] and report.backend_choice.startswith(fastest)
    assert "backends measured" in str(report)
    assert report.artifact_error.ok


def test_aarch64_library_is_an_aarch64_elf(tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs the cross compiler: apt-get install gcc-aarch64-linux-gnu")
    model, inputs = small_cnn(4)
    result = optimize(
        model, "aarch64-linux", inputs, backend="tvm", database=tmp_path / "db", measure=True
    )
    lib = result.save(tmp_path / "model.so")
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert any("cross-compiled" in w for w in result.report.warnings)
    assert any("latency not measured" in w for w in result.report.warnings)
    with pytest.raises(BackendError, match="cannot run on this machine"):
        result.artifact.run([inputs[0].numpy()])


def test_tuning_for_a_phone_needs_an_rpc_device():
    with pytest.raises(BackendError, match="rpc="):
        TvmBackend("android-arm64", trials=10)


def test_cuda_target():
    if not tvm.cuda(0).exist:
        pytest.skip("no NVIDIA GPU visible to TVM on this machine")
    model, inputs = small_cnn(5)
    result = optimize(model, "cuda", inputs, backend="tvm", measure=False)
    assert result.report.artifact_error.ok


def test_cuda_without_a_gpu_says_so():
    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="GPU"):
        TvmBackend("cuda")


@pytest.mark.slow
def test_resnet18_tuned_database_reused(tmp_path):
    """ResNet-18 tuned (64 trials), then compiled again from the database without a trial and
    with the same schedules (the time it saves is measured in benchmarks/bench_tvm.py)."""
    from graphopt import zoo

    entry = zoo.get("resnet18")
    db = tmp_path / "db"
    runs = [
        optimize(
            entry.model,
            "cpu",
            entry.example_inputs,
            backend="tvm",
            trials=64,
            database=db,
            measure=False,
        )  # fmt: skip
        for _ in range(2)
    ]
    first, again = (r.report for r in runs)
    assert first.tvm_tuning["trials_run"] >= 64 and not first.tvm_tuning["reused"]
    assert again.tvm_tuning["reused"] and again.tvm_tuning["trials_run"] == 0
    assert first.tvm_tasks == again.tvm_tasks
    assert first.artifact_error.ok and again.artifact_error.ok


def _scalar_constant_of_shape_model() -> onnx.ModelProto:
    """y = x + ConstantOfShape(shape=[]) (a scalar 0.5): transformer exports build masks this
    way, and TVM 0.27's ONNX importer rejects it (broadcast_to a rank-0 shape)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ConstantOfShape", ["empty"], ["half"], value=helper.make_tensor(
            "v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["x", "half"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "scalar_cos",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.zeros(0, np.int64), "empty")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_onnx_load_folds_shape_arithmetic_tvm_cannot_import(tmp_path):
    from graphopt.backends.tvm import relax_from_proto

    model = _scalar_constant_of_shape_model()
    with pytest.raises(Exception, match="broadcast_to"):
        relax_from_proto(model, [(2, 4)])  # what TVM's importer does with it as written
    backend = TvmBackend("cpu", database=tmp_path / "db")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out = backend.load(model, [(2, 4)]).run([x])[0]
    np.testing.assert_array_equal(out, x + np.float32(0.5))
    with pytest.raises(BackendError, match="static shapes"):
        backend.load(model)
    with pytest.raises(BackendError, match=r"takes 1 input\(s\) \['x'\], but 2 input shape"):
        backend.load(model, [(2, 4), (2, 4)])


class _ScalarArguments(nn.Module):
    """Ops whose scalar arguments TVM's importer dropped: alpha of add/sub/rsub, the scales of
    selu (elu with scale and input_scale), and div's rounding modes beside them."""

    def forward(self, x, y, unused):
        return (
            torch.add(x, y, alpha=2),
            torch.sub(x, y, alpha=3),
            torch.rsub(x, y, alpha=0.5),
            x.add(1.5, alpha=2),
            nn.functional.selu(x),
            torch.div(x, y, rounding_mode="floor") + torch.div(x, y, rounding_mode="trunc"),
        )


def test_lowering_keeps_alpha_of_add_and_sub_and_the_scales_of_selu(tmp_path):
    model = _ScalarArguments()
    gen = torch.Generator().manual_seed(0)
    x, y, unused = (torch.randn(2, 3, generator=gen) + 0.1 for _ in range(3))
    artifact = TvmBackend("cpu", database=tmp_path / "db").compile(model, (x, y, unused))
    got = artifact.run([x.numpy(), y.numpy(), unused.numpy()])
    want = model(x, y, unused)
    names = ["add", "sub", "rsub", "add scalar", "selu", "div"]
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_an_operator_tvm_cannot_lower_is_a_backend_error(tmp_path):
    class Interpolate(nn.Module):
        def forward(self, x):
            return nn.functional.interpolate(
                x[None], scale_factor=2.5, mode="linear", align_corners=True
            )

    # was: RuntimeError "Cannot convert infinity to BigInt" from TVM's legalization
    with pytest.raises(BackendError, match="backend='onnxruntime'"):
        TvmBackend("cpu", database=tmp_path / "db").compile(Interpolate(), (torch.randn(3, 4),))

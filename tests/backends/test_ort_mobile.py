"""ORT-format export for phones: converter outputs, numbers, session file, build line, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt.backends.export import export_onnx
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.onnxruntime.mobile import (
    MobilePackage,
    parse_operator_config,
    save_ort_format,
)
from graphopt.errors import BackendError
from graphopt.target import Target
from graphopt.testing import small_conv_net


def _model():
    return small_conv_net(0)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[MobilePackage, onnx.ModelProto]:
    m, x = _model()
    proto = export_onnx(m, (x,))
    return save_ort_format(proto, tmp_path_factory.mktemp("mobile") / "net.ort"), proto


def test_writes_ort_config_and_session_file_with_the_models_operators(package):
    pkg, _ = package
    assert pkg.ort_path.name == "net.ort" and pkg.ort_path.stat().st_size > 0
    assert pkg.config_path == pkg.ort_path.with_name(
        "net.required_operators.with_runtime_opt.config"
    )
    ops = {op for key, names in pkg.operators.items() for op in names}
    assert {"Conv", "Relu"} <= ops and ops & {"Gemm", "MatMul"}
    assert all(key.count(";") == 1 and key.split(";")[1].isdigit() for key in pkg.operators)
    assert pkg.operators == parse_operator_config(pkg.config_path)
    session = json.loads(pkg.session_config_path.read_text())
    assert session == pkg.execution_provider_config
    assert session["providers"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert session["provider_options"]["XnnpackExecutionProvider"]["intra_op_num_threads"] == "4"
    assert session["session_options"]["intra_op_num_threads"] == 1
    assert session["session_config_entries"]["session.intra_op.allow_spinning"] == "0"
    text = pkg.describe()
    assert str(pkg.ort_path) in text and "Conv" in text and "ai.onnx" in text


def test_ort_file_runs_here_and_matches_the_onnx_model(package):
    pkg, proto = package
    x = torch.randn(3, 3, 16, 16).numpy()  # the batch stays dynamic in ORT format
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = ref.run(None, {"input0": x})
    for replay in ("0", "1"):  # with and without the saved runtime optimizations
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.enable_saved_runtime_optimizations", replay)
        sess = ort.InferenceSession(str(pkg.ort_path), opts, providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {"input0": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_build_command_is_a_reduced_android_xnnpack_build(package):
    pkg, _ = package
    cmd = pkg.build_command(android_sdk_path="/opt/android sdk")
    assert cmd.startswith("./build.sh ") and "--android_abi arm64-v8a" in cmd
    assert f"--include_ops_by_config {pkg.config_path.resolve()}" in cmd
    for flag in ("--use_xnnpack", "--minimal_build extended", "--disable_ml_ops"):
        assert flag in cmd
    assert "'/opt/android sdk'" in cmd and '"$ANDROID_NDK_HOME"' in cmd


def test_fixed_style_and_type_reduction(tmp_path):
    m, x = _model()
    pkg = save_ort_format(
        export_onnx(m, (x,)), tmp_path / "f.ort", optimization_style="Fixed", type_reduction=True
    )
    assert pkg.config_path.name == "f.required_operators_and_types.config"
    assert "FusedConv" in pkg.operators.get("com.microsoft;1", [])  # this machine's fusion
    assert any("FusedConv" in note for note in pkg.notes)
    assert (
        "session.enable_saved_runtime_optimizations"
        not in (pkg.execution_provider_config["session_config_entries"])
    )
    assert "--enable_reduced_operator_type_support" in pkg.build_command()


def test_operator_config_parsing_handles_comments_and_type_specs(tmp_path):
    config = tmp_path / "ops.config"
    config.write_text(
        '# Generated from model/s:\n# - m.ort\n\nai.onnx;11;Conv{"inputs": {"0": '
        '["float", "int8"]}}, Relu  # trailing\ncom.microsoft;1;FusedConv\n'
    )
    assert parse_operator_config(config) == {
        "ai.onnx;11": ["Conv", "Relu"],
        "com.microsoft;1": ["FusedConv"],
    }
    config.write_text("ai.onnx;Conv\n")
    with pytest.raises(BackendError, match="expected 'domain;opset;Op1,Op2"):
        parse_operator_config(config)


def test_corrupt_model_and_bad_options_are_backend_errors(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf model")
    with pytest.raises(BackendError, match="converter failed: .*Protobuf parsing failed"):
        save_ort_format(corrupt, tmp_path / "c.ort")
    assert not list(tmp_path.glob("c.*"))
    with pytest.raises(BackendError, match="Did you mean 'Fixed'"):
        save_ort_format(corrupt, tmp_path / "c.ort", optimization_style="fixed")
    with pytest.raises(BackendError, match="'<name>.ort'"):
        save_ort_format(corrupt, tmp_path / "c.onnx")
    with pytest.raises(BackendError, match="no ONNX file"):
        save_ort_format(tmp_path / "missing.onnx", tmp_path / "c.ort")


def test_mobile_backend_saves_ort_or_onnx_and_refuses_to_measure(tmp_path):
    m, x = _model()
    backend = OnnxRuntimeBackend(Target.parse("android-arm64"))
    artifact = backend.compile(m, (x,))
    path = artifact.save(tmp_path / "m.ort")
    assert path == tmp_path / "m.ort"
    assert (tmp_path / "m.session.json").exists()
    assert list(tmp_path.glob("m.required_operators*.config"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input0": x.numpy()})
    np.testing.assert_allclose(got, artifact.run([x.numpy()])[0], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(onnx.load(str(artifact.save(tmp_path / "m.onnx"))))
    with pytest.raises(BackendError, match="can't be measured from here"):
        backend.measure(artifact, (x,))

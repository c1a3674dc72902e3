"""The OpenVINO backend: fp32 and int8 artifacts against the model, dynamic batch, IR and ONNX
files that plain OpenVINO reloads, the measurement API, targets, and the missing-package error.

The tests that need OpenVINO skip without it (``pip install "graphopt[openvino]"``); the
missing-package message is tested either way.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from graphopt import optimize
from graphopt.backends import Artifact, Backend, get_backend
from graphopt.backends.measure import LatencyCache
from graphopt.backends.openvino import INSTALL, missing_openvino
from graphopt.core.numerics import Numerics, compare
from graphopt.errors import BackendError, GraphoptError, InputError, TargetError
from graphopt.quant.onnx_passes import InsertQDQ
from graphopt.target import Target, int8_pairs_saturate
from graphopt.testing import randomize_bn
from graphopt.zoo import get as zoo_model


def int8_saturation():
    from graphopt.backends.openvino import int8_saturation as probe  # needs OpenVINO

    return probe()


needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason=f"the OpenVINO backend needs {INSTALL}",
)


def conv_net(seed: int = 0) -> nn.Module:
    """Two Conv-BN-ReLU (random BN statistics, one strided conv without bias), pooling and a
    classifier: every kind of layer OpenVINO's int8 path quantises."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, gen)
    return model.eval()


@pytest.fixture(scope="module")
def fp32():
    """The zoo's digits_cnn (conv-BN-ReLU twice, max pooling, a classifier) at batch 2,
    optimized for OpenVINO under inference mode."""
    zoo = zoo_model("digits_cnn")
    x = torch.cat([zoo.example_inputs[0], zoo.example_inputs[0].flip(-1)])
    with torch.inference_mode():
        result = optimize(zoo.model, "cpu", (x,), backend="openvino", measure=False)
    return zoo.model, x, result


@pytest.fixture(scope="module")
def int8():
    """The conv net quantised to int8 by graphopt's calibration, lowered to OpenVINO."""
    model = conv_net()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    calibration = [(torch.randn(8, 3, 16, 16, generator=gen),) for _ in range(4)]
    result = optimize(
        model,
        "cpu",
        (x,),
        backend="openvino",
        precision="int8",
        calibration_data=calibration,
        measure=False,
    )
    return model, x, result


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(x)]


def _equal_at_two_batch_sizes(model: nn.Module, x: torch.Tensor, result) -> None:
    """``result`` equals ``model`` within the exact contract at the example's batch and 5."""
    assert result.report.backend == "openvino" and result.report.artifact_error.ok
    assert result.inputs[0].shape[0] == "batch"
    for batch in (x, torch.cat([x, x.flip(0), x, x])[:5]):
        with torch.inference_mode():
            got = result(batch)
        want = _outputs(model, batch)
        assert got.shape == want[0].shape and got.shape[0] == batch.shape[0]
        cmp = compare(want, [got], Numerics.exact())
        assert cmp.ok, cmp.describe()


@needs_openvino
def test_fp32_zoo_model_equals_the_model_within_the_exact_contract_at_two_batch_sizes(fp32):
    _equal_at_two_batch_sizes(*fp32)


@needs_openvino
@pytest.mark.slow
def test_fp32_resnet18_equals_the_model_within_the_exact_contract_at_two_batch_sizes():
    zoo = zoo_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        result = optimize(zoo.model, "cpu", (x,), backend="openvino", measure=False)
    _equal_at_two_batch_sizes(zoo.model, x, result)


@needs_openvino
def test_int8_runs_on_openvinos_int8_kernels_within_insert_qdqs_contract(int8):
    model, x, result = int8
    report = result.report
    assert report.backend == "openvino" and report.artifact_error.ok
    assert result.quantization.int8 == 1.0  # every layer: both convs, pooling, classifier
    for batch in (x, torch.randn(3, 3, 16, 16)):
        cmp = compare(_outputs(model, batch), [result(batch)], InsertQDQ.numerics)
        assert cmp.ok, cmp.describe()
    precisions = result.artifact.layer_precisions()
    # the runtime graph OpenVINO executes: its convolutions and the classifier run in int8
    assert precisions[("Convolution", "u8")] + precisions[("Convolution", "i8")] == 2
    assert precisions[("FullyConnected", "u8")] + precisions[("FullyConnected", "i8")] == 1
    summary = "OpenVINO runs 2 Convolution, 1 FullyConnected on its int8 kernels"
    assert report.records[-1].decisions[-1] == summary
    # where this CPU's int8 kernels saturate (x86 without VNNI), the weights are 7-bit (auto),
    # so that no pair of products leaves int16: no warning, and the notes say why
    seven = report.quantization["weight_bits"] == 7
    assert seven == bool(int8_pairs_saturate(Target.parse("cpu")))
    assert seven or int8_saturation() is None  # the probe agrees with the CPU's flags
    assert not [w for w in report.warnings if "saturating int16" in w]
    assert any("7-bit weights" in n for n in report.notes) == seven


@needs_openvino
def test_8_bit_weights_on_a_cpu_whose_int8_kernels_saturate_are_warned_about(int8):
    model, x, _ = int8
    gen = torch.Generator().manual_seed(2)
    calibration = [(torch.randn(8, 3, 16, 16, generator=gen),) for _ in range(4)]
    result = optimize(
        model, "cpu", (x,), backend="openvino", precision="int8", calibration_data=calibration,
        measure=False, pipeline="fold-conv-bn,insert-qdq{weights=int8}",
    )  # fmt: skip
    assert result.report.quantization["weight_bits"] == 8
    warned = [w for w in result.report.warnings if "saturating int16" in w]
    assert len(warned) == (int8_saturation() is not None)


@needs_openvino
def test_the_saturation_probe_is_the_exact_value_or_the_int16_saturated_one():
    probe = int8_saturation()
    if probe is not None:  # pairs of 255 * 127 clamp to 32767: the sum is 32 * 32767
        assert probe == pytest.approx((32 * 32767 * 1e-4, 255 * 127 * 64 * 1e-4), rel=1e-5)


@needs_openvino
def test_saved_ir_and_onnx_reload_in_plain_openvino_with_the_same_outputs(fp32, tmp_path):
    import openvino as ov

    _, x, result = fp32
    want = result(x.numpy())
    assert result.save(tmp_path / "digits.xml") == tmp_path / "digits.xml"
    weights = sum(p.numel() for p in result.graph_module.parameters())
    assert (tmp_path / "digits.bin").stat().st_size >= 4 * weights  # f32, not compressed to f16
    result.save(tmp_path / "digits.onnx")
    core = ov.Core()
    for name in ("digits.xml", "digits.onnx"):
        model = core.read_model(tmp_path / name)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled([x.numpy()])[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    ir = core.read_model(tmp_path / "digits.xml")
    assert ir.get_rt_info(["graphopt", "graphopt_backend"]).astype(str) == "openvino"
    with pytest.raises(GraphoptError, match=r"saves \.xml or \.onnx"):
        result.save(tmp_path / "digits.so")


@needs_openvino
def test_saved_int8_ir_keeps_its_int8_kernels_in_plain_openvino(int8, tmp_path):
    import openvino as ov

    _, x, result = int8
    result.save(tmp_path / "int8.xml")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(tmp_path / "int8.xml"), "CPU")
    np.testing.assert_allclose(compiled([x.numpy()])[0], result(x.numpy()), atol=1e-5)
    kernels = {
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    }
    assert kernels <= {"u8", "i8"}, kernels


@needs_openvino
def test_backend_and_artifact_implement_the_protocols_and_measure_through_the_cache(tmp_path):
    cache = LatencyCache(tmp_path / "latency.json")
    backend = get_backend("openvino", "cpu", threads=1, cache=cache)
    assert isinstance(backend, Backend) and backend.without_tuning() is backend
    assert backend.settings() == {"threads": 1, "hint": "latency", "device": "CPU"}
    assert backend.with_settings(hint="throughput").settings()["hint"] == "throughput"
    model, x = conv_net(), torch.randn(1, 3, 16, 16)
    artifact = backend.compile(model, (x,))
    assert isinstance(artifact, Artifact) and artifact.static_shape_reason is None
    assert int(artifact.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    first = backend.measure(artifact, (x,), runs=5, warmup=1)
    assert first.runs == 5 and first.median_ms > 0 and len(cache) == 1
    assert backend.measure(artifact, (x,), runs=5, warmup=1) == first  # from the cache
    with pytest.raises(InputError, match="takes 1 input"):
        artifact.run([])
    with pytest.raises(BackendError, match="hint must be one of latency, throughput"):
        get_backend("openvino", "cpu", hint="latncy")


class _BatchFixedInCode(nn.Module):
    """Batch statistics in eval mode and a reshape to the example's batch: the exporter
    specializes the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).reshape(2, 4, 36)  # the batch is 2, in the code


@needs_openvino
def test_a_batch_the_model_fixes_is_static_and_said():
    model, x = _BatchFixedInCode().eval(), torch.randn(2, 3, 8, 8)
    artifact = get_backend("openvino", "cpu").compile(model, (x,))
    assert "input0 axis 0 fixed at the example's size" in artifact.static_shape_reason
    with torch.inference_mode():
        assert compare(
            [model(x)], [torch.from_numpy(artifact.run([x.numpy()])[0])], Numerics.exact()
        ).ok


@needs_openvino
def test_targets_openvino_cannot_serve_name_the_backends_that_can():
    phone = Target("android-arm64", "mobile", {"mtriple": "aarch64-linux-android"})
    for target in ("cuda", phone):
        with pytest.raises(TargetError, match=r"backend='onnxruntime'.*backend='tvm'"):
            get_backend("openvino", target)
    assert get_backend("openvino", "llvm -num-cores=2").device == "CPU"


def test_without_openvino_the_error_says_what_to_install():
    error = missing_openvino(ModuleNotFoundError("No module named 'openvino'"))
    assert 'pip install "graphopt[openvino]"' in str(error)
    code = (
        "import sys\n"
        "sys.modules['openvino'] = None  # as if openvino were not installed\n"
        "from graphopt.backends import get_backend\n"
        "from graphopt.errors import BackendError\n"
        "try:\n"
        "    get_backend('openvino', 'cpu')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'pip install "graphopt[openvino]"' in done.stdout

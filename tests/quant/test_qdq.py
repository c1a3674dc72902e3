"""QDQ insertion: ORT fuses integer kernels, outputs stay close to float, accuracy holds.

Fusion is checked on the graph ONNX Runtime writes to ``optimized_model_filepath``, not assumed.
The digits CNN (trained, real data) is compared with ``onnxruntime.quantization.quantize_static``
(QDQ, per-channel, the same calibration batches).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphopt import zoo
from graphopt.backends.onnxruntime import export_onnx
from graphopt.errors import InputError
from graphopt.quant.qdq import integer_op_counts, ort_optimized_model, quantize_onnx

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


class SmallCNN(nn.Module):
    """conv-relu-conv-pool-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_run(model, x.numpy()).argmax(1) == y.numpy()).mean() * 100)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    gen = torch.Generator().manual_seed(1)
    proto = export_onnx(model, (torch.randn(1, 3, 16, 16),))
    calib = [(torch.randn(8, 3, 16, 16, generator=gen),) for _ in range(8)]
    held_out = torch.randn(32, 3, 16, 16, generator=gen).numpy()
    return proto, calib, held_out


@pytest.fixture(scope="module")
def digits():
    zm = zoo.get("digits_cnn")
    proto = export_onnx(zm.model, zm.example_inputs)
    xtr, _ = zoo.digits_data("train")
    xte, yte = zoo.digits_data("test")
    calib = [(xtr[i : i + 32].numpy(),) for i in range(0, 320, 32)]
    return proto, calib, xte, yte


@pytest.mark.parametrize("method", METHODS)
def test_small_cnn_fuses_and_stays_close(small, method):
    proto, calib, held_out = small
    qmodel, report = quantize_onnx(proto, calib, method=method)
    assert report.batches == len(calib)
    assert len(report.quantized) == 4  # 2 Conv, GlobalAveragePool, Gemm
    optimized = ort_optimized_model(qmodel)
    ops = [n.op_type for n in optimized.graph.node]
    counts = integer_op_counts(optimized)
    assert counts["QLinearConv"] == 2, ops
    assert counts["QGemm"] == 1, ops
    assert "Conv" not in ops and "Gemm" not in ops, ops
    cos = _cosine(_run(qmodel, held_out), _run(proto, held_out))
    print(f"{method}: cosine {cos:.5f}, ORT ops {ops}")
    assert cos > 0.99


def test_symmetric_int8_activations_also_fuse(small):
    proto, calib, held_out = small
    qmodel, report = quantize_onnx(proto, calib, activations="int8")
    assert all(qp.symmetric for qp in report.activations.values())
    counts = integer_op_counts(ort_optimized_model(qmodel))
    assert counts["QLinearConv"] == 2
    assert _cosine(_run(qmodel, held_out), _run(proto, held_out)) > 0.99


def test_digits_accuracy_and_quantize_static(digits, tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    proto, calib, xte, yte = digits
    fp32 = _accuracy(proto, xte, yte)
    ours = {}
    for method in METHODS:
        qmodel, _ = quantize_onnx(proto, calib, method=method)
        ours[method] = (_accuracy(qmodel, xte, yte), integer_op_counts(ort_optimized_model(qmodel)))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{proto.graph.input[0].name: b[0]} for b in calib])

        def get_next(self):
            return next(self.it, None)

    import onnx

    onnx.save(proto, tmp_path / "fp32.onnx")
    quantize_static(
        str(tmp_path / "fp32.onnx"),
        str(tmp_path / "ort.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    ort_model = onnx.load(tmp_path / "ort.onnx")
    theirs = _accuracy(ort_model, xte, yte)
    theirs_ops = integer_op_counts(ort_optimized_model(ort_model))
    print(f"\ndigits fp32 accuracy {fp32:.2f}")
    for method, (acc, counts) in ours.items():
        print(f"graphopt {method}: accuracy {acc:.2f}, integer ops {dict(counts)}")
    print(f"quantize_static minmax: accuracy {theirs:.2f}, integer ops {dict(theirs_ops)}")
    for method, (acc, counts) in ours.items():
        assert acc >= fp32 - 1.0, method
        assert acc >= theirs - 0.5, method
        assert counts["QLinearConv"] == 2 and counts["QGemm"] == 1, (method, counts)


def test_nan_calibration_raises(small):
    proto, calib, _ = small
    bad = calib[0][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        quantize_onnx(proto, [calib[1], (bad,)])
    inf = calib[0][0].clone()
    inf[1, 1, 1, 1] = float("inf")
    with pytest.raises(InputError, match="inf"):
        quantize_onnx(proto, [(inf.numpy(),)])


def test_wrong_shape_calibration_raises(small):
    proto, _, _ = small
    with pytest.raises(InputError, match="shape"):
        quantize_onnx(proto, [(torch.randn(4, 3, 8, 8),)])
    with pytest.raises(InputError, match="inputs"):
        quantize_onnx(proto, [(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))])
    with pytest.raises(InputError, match="empty"):
        quantize_onnx(proto, [])


def test_skip_keeps_layer_float(small):
    proto, calib, held_out = small
    conv2 = [n.name for n in proto.graph.node if n.op_type == "Conv"][1]
    qmodel, report = quantize_onnx(proto, calib, skip={conv2})
    assert report.float_layers == {conv2: "in the skip list"}
    assert conv2 in str(report) and "skip list" in str(report)
    optimized = ort_optimized_model(qmodel)
    ops = [n.op_type for n in optimized.graph.node]
    assert integer_op_counts(optimized)["QLinearConv"] == 1, ops
    assert ops.count("Conv") + ops.count("FusedConv") == 1, ops
    assert _cosine(_run(qmodel, held_out), _run(proto, held_out)) > 0.99
    with pytest.raises(InputError, match="not in the graph"):
        quantize_onnx(proto, calib, skip={"no-such-node"})


def test_unquantisable_layer_reported(small):
    import onnx

    proto, calib, _ = small
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    kept = [a for a in gemm.attribute if a.name != "alpha"]
    del gemm.attribute[:]
    gemm.attribute.extend([*kept, onnx.helper.make_attribute("alpha", 2.0)])
    qmodel, report = quantize_onnx(model, calib)
    assert "alpha" in report.float_layers[gemm.name]
    ops = [n.op_type for n in ort_optimized_model(qmodel).graph.node]
    assert "Gemm" in ops and "QGemm" not in ops, ops  # stays float in ORT too

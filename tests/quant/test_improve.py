"""Int8 accuracy improvers on ONNX graphs: SmoothQuant, bias correction, mixed precision.

Each is checked by the number it promises: SmoothQuant leaves the float function unchanged and
shrinks the int8 error on outlier channels; bias correction removes the mean output shift of
int8 weights; the fallback keeps exactly the layer that breaks accuracy in float.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphopt.backends.export import export_onnx
from graphopt.core.numerics import default_rtol
from graphopt.errors import InputError
from graphopt.quant.improve import quantize_int8
from graphopt.quant.onnx_passes import bias_correction, smooth_quant
from graphopt.quant.qdq import integer_op_counts, ort_optimized_model, quantize_onnx
from graphopt.quant.qparams import weight_qparams
from graphopt.quant.runtime import predictor
from graphopt.testing import seeded


class LnMlp(nn.Module):
    """LayerNorm -> Linear -> Linear on tokens (exported as LayerNormalization, MatMul + Add)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.ln(x)))


class GemmMlp(nn.Module):
    """Linear -> Linear on vectors (exported as two Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def _init(model: nn.Module, seed: int) -> nn.Module:
    gen = seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _outlier_model(kind: str):
    """A model whose MatMul/Gemm input has 3 channels ~30x larger than the rest."""
    if kind == "layernorm":
        model = _init(LnMlp(), 0)
        with torch.no_grad():
            model.ln.weight[:3] = 30.0  # the outliers come from gamma
        shape = (4, 10, 16)
    else:
        model = _init(GemmMlp(), 0)
        with torch.no_grad():
            model.fc1.weight[:3] *= 30.0  # fc1's output channels 0..2 are the outliers
        shape = (16, 16)
    gen = seeded(1)
    proto = export_onnx(model, (torch.randn(shape, generator=gen),))
    calib = [(torch.randn(shape, generator=gen).numpy(),) for _ in range(6)]
    test = torch.randn((64, *shape[1:]), generator=gen).numpy()
    return proto, calib, test


@pytest.mark.parametrize("kind", ["layernorm", "gemm"])
def test_smoothquant_is_exact_in_float_and_shrinks_int8_error(kind):
    proto, calib, test = _outlier_model(kind)
    smoothed, decisions = smooth_quant(proto, calib, alpha=0.5)
    applied = [d for d in decisions if d.applied]
    # layernorm: LN -> fc1 and fc1 (MatMul + Add) -> fc2; gemm: fc1 (Gemm) -> fc2
    assert len(applied) == (2 if kind == "layernorm" else 1), [str(d) for d in decisions]
    assert applied[0].act_range_after < applied[0].act_range_before / 3
    y = predictor(proto)(test)
    y_smooth = predictor(smoothed)(test)
    bound = 4 * default_rtol(torch.float32) * float(np.abs(y).max())  # float32 rounding
    assert float(np.abs(y_smooth - y).max()) <= bound
    plain, _ = quantize_onnx(proto, calib)
    better, _ = quantize_onnx(smoothed, calib)
    err_plain = float(np.abs(predictor(plain)(test) - y).mean())
    err_smooth = float(np.abs(predictor(better)(test) - y).mean())
    assert err_smooth < 0.8 * err_plain, (err_smooth, err_plain)


def test_smoothquant_refuses_with_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = _init(model, 2)
    proto = export_onnx(model, (torch.randn(2, 8),))
    calib = [(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32),)]
    smoothed, decisions = smooth_quant(proto, calib)
    refused = [d for d in decisions if not d.applied]
    assert any("Relu cannot absorb" in d.reason for d in refused)
    assert any("graph input" in d.reason for d in refused)
    np.testing.assert_array_equal(predictor(smoothed)(calib[0][0]), predictor(proto)(calib[0][0]))
    with pytest.raises(InputError, match="alpha"):
        smooth_quant(proto, calib, alpha=1.5)


class ConvNet(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_removes_the_mean_shift_of_int8_weights(bias):
    model = _init(ConvNet(bias), 3)
    gen = seeded(4)
    # inputs with a non-zero mean, so that the weight error eps shifts outputs by eps E[x]
    calib = [((torch.rand(8, 3, 12, 12, generator=gen) + 0.5).numpy(),) for _ in range(6)]
    proto = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    corrected, decisions, shifts = bias_correction(proto, calib)
    assert [d.applied for d in decisions] == [True, True]
    assert all(d.max_abs_shift > 0 for d in decisions)
    # the corrected model with int8-rounded weights has the float model's per-channel means
    rounded = _round_weights(corrected)
    ref = _channel_means(proto, calib)
    before = np.abs(_channel_means(_round_weights(proto), calib) - ref).max()
    after = np.abs(_channel_means(rounded, calib) - ref).max()
    assert before > 0
    assert after < 0.05 * before, (after, before)
    # and the real int8 model's systematic output error shrinks on held-out data
    test = (torch.rand(32, 3, 12, 12, generator=gen) + 0.5).numpy()
    y = predictor(proto)(test)
    errs = []
    for m in (proto, corrected):
        q, _ = quantize_onnx(m, calib)
        errs.append(np.abs((predictor(q)(test) - y).mean(axis=(0, 2, 3))).max())
    assert errs[1] < 0.5 * errs[0], errs


def _round_weights(proto):
    from onnx import numpy_helper

    out = type(proto)()
    out.CopyFrom(proto)
    weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    for t in out.graph.initializer:
        if t.name in weights:
            w = torch.from_numpy(numpy_helper.to_array(t).copy())
            t.CopyFrom(numpy_helper.from_array(weight_qparams(w).fake_quantize(w).numpy(), t.name))
    return out


def _channel_means(proto, calib):
    predict = predictor(proto)
    return np.mean([predict(*b).mean(axis=(0, 2, 3)) for b in calib], axis=0)


def test_bias_correction_refuses_matmul_without_bias():
    model = nn.Linear(8, 4, bias=False).eval()
    proto = export_onnx(model, (torch.randn(2, 3, 8),))  # 3-D: a MatMul, no Add
    calib = [(np.ones((2, 3, 8), np.float32),)]
    _, decisions, shifts = bias_correction(proto, calib)
    assert not shifts
    assert "no bias to fold into" in decisions[0].reason


class OutlierHead(nn.Module):
    """fc1 -> (x * c, one channel 400x) -> fc2: int8 on fc2's input loses all but one channel.

    The Mul by a constant stays float in quantize_onnx, so only fc2's own quantisation reads the
    outlier tensor: keeping fc2 in float is what fixes the accuracy, and the search must find it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)
        scale = torch.ones(32)
        scale[0] = 400.0
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.scale)


@pytest.fixture(scope="module")
def outlier_head():
    model = _init(OutlierHead(), 5)
    with torch.no_grad():
        model.fc2.weight[:, 0] *= 1e-3  # the outlier channel hardly moves the logits
        model.fc2.bias.zero_()
    gen = seeded(6)
    calib = [(torch.randn(32, 16, generator=gen).numpy(),) for _ in range(4)]
    proto = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    return proto, calib


def test_fallback_keeps_the_sensitive_layer_in_float(outlier_head):
    proto, calib = outlier_head
    qmodel, report = quantize_int8(proto, calib, method="minmax", max_drop=0.02)
    gemms = [n.name for n in proto.graph.node if n.op_type == "Gemm"]
    assert report.drop_all > 0.2, report.drop_all  # every layer int8 breaks the classifier
    assert report.drop <= 0.02
    assert report.fallback == [gemms[1]]
    assert "mixed-precision fallback" in report.float_layers[gemms[1]]
    assert report.int8_layers == [gemms[0]]
    assert {s.node for s in report.sensitivity} == set(gemms)
    sens = {s.node: s.drop_without for s in report.sensitivity}
    assert sens[gemms[1]] < sens[gemms[0]]
    assert integer_op_counts(ort_optimized_model(qmodel))["QGemm"] == 1
    assert "kept float to bring the drop" in str(report)


def test_fallback_with_user_metric(outlier_head):
    proto, calib = outlier_head
    x = np.concatenate([b[0] for b in calib])
    labels = predictor(proto)(x).argmax(1)
    calls = []

    def accuracy(predict) -> float:
        calls.append(1)
        return float((predict(x).argmax(1) == labels).mean())

    _, report = quantize_int8(proto, calib, method="minmax", max_drop=0.02, metric=accuracy)
    assert report.metric == "accuracy"
    assert report.drop <= 0.02 < report.drop_all
    assert len(calls) >= 4  # float, all int8, one per layer, the fallback step


def test_no_max_drop_only_reports(outlier_head):
    proto, calib = outlier_head
    _, report = quantize_int8(proto, calib, method="minmax")
    assert report.fallback == [] and report.sensitivity == []
    assert report.drop == report.drop_all > 0.2


@pytest.mark.parametrize(
    "batch, match",
    [
        (np.full((4, 16), np.nan, np.float32), "NaN"),
        (np.zeros((4, 15), np.float32), "shape"),
    ],
)
def test_bad_calibration_data_raises(outlier_head, batch, match):
    proto, _ = outlier_head
    with pytest.raises(InputError, match=match):
        quantize_int8(proto, [(batch,)], method="minmax")


def test_fixed_batch_model_is_calibrated_sample_by_sample(outlier_head):
    """An ONNX file exported with batch 1 takes calibration batches of any size (each is cut
    into single samples), gives the same parameters as the dynamic-batch export, and the metric's
    predict runs it on many samples at once."""
    _, calib = outlier_head
    model = _init(OutlierHead(), 5)
    fixed = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),), dynamic_axes={})
    dynamic = export_onnx(model, (torch.from_numpy(calib[0][0][:1]),))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    _, a = quantize_int8(fixed, calib, method="minmax", correct_bias=False)
    _, b = quantize_int8(dynamic, calib, method="minmax", correct_bias=False)
    assert a.quant.batches == 4 * len(calib[0][0]) and b.quant.batches == len(calib)
    for name, qp in b.quant.activations.items():
        assert torch.equal(qp.scale, a.quant.activations[name].scale), name
    x = np.concatenate([c[0] for c in calib])
    np.testing.assert_array_equal(predictor(fixed)(x), predictor(dynamic)(x))


def test_fixed_batch_that_does_not_divide_the_calibration_batch_is_an_input_error():
    model = _init(GemmMlp(), 1)
    fixed = export_onnx(model, (torch.zeros(2, 16),), dynamic_axes={})
    with pytest.raises(InputError, match="fixed batch size of 2.*multiple of 2"):
        quantize_onnx(fixed, [(np.zeros((5, 16), np.float32),)])

"""QDQ insertion: ORT fuses integer kernels, outputs stay close to float, accuracy holds.

Fusion is checked on the graph ONNX Runtime writes to ``optimized_model_filepath``, not assumed.
The digits CNN (trained, real data) is compared with ``onnxruntime.quantization.quantize_static``
(QDQ, per-channel, the same calibration batches).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.errors import InputError
from graphopt.quant.ort_policy import INTEGER_OPS, count_layers
from graphopt.quant.qdq import integer_op_counts, ort_optimized_model, quantize_onnx
from graphopt.testing import random_bn, seeded

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


def _run_feed(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


def _run(model, x: np.ndarray) -> np.ndarray:
    return _run_feed(model, {model.graph.input[0].name: x})


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
    proto, calib, xte, yte = digits
    fp32 = _accuracy(proto, xte, yte)
    ours = {}
    for method in METHODS:
        qmodel, _ = quantize_onnx(proto, calib, method=method)
        ours[method] = (_accuracy(qmodel, xte, yte), integer_op_counts(ort_optimized_model(qmodel)))
    ort_model = _static(proto, calib, tmp_path)
    theirs = _accuracy(ort_model, xte, yte)
    theirs_ops = integer_op_counts(ort_optimized_model(ort_model))
    print(f"\ndigits fp32 accuracy {fp32:.2f}")
    for method, (acc, counts) in ours.items():
        print(f"graphopt {method}: accuracy {acc:.2f}, integer ops {dict(counts)}")
    print(f"quantize_static minmax: accuracy {theirs:.2f}, integer ops {dict(theirs_ops)}")
    for method, (acc, counts) in ours.items():
        assert acc >= fp32 - 1.0, method
        assert acc >= theirs, method
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
    assert report.float_layers[conv2] == "in the skip list"
    # the pool after it reads a float tensor: it stays float rather than add a Q of its own
    pool = next(n.name for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    assert "no Q/DQ pair" in report.float_layers[pool]
    assert len(report.float_layers) == 2
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


# ------------------------------------------------------------------------------------------------
# placement: what ORT runs (ort_optimized_model), for the residual / ReLU6 / transformer shapes

FLOAT_COMPUTE = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul", "Relu", "Clip")


def _conv_bn(cin: int, cout: int, k: int, stride: int, seed: int, groups: int = 1) -> nn.Module:
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, random_bn(nn.BatchNorm2d, cout, seed=seed))


class BasicBlock(nn.Module):
    """ResNet's: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), 1x1 downsample when needed."""

    def __init__(self, cin: int, cout: int, stride: int, seed: int) -> None:
        super().__init__()
        self.a = _conv_bn(cin, cout, 3, stride, seed)
        self.b = _conv_bn(cout, cout, 3, 1, seed + 1)
        self.down = _conv_bn(cin, cout, 1, stride, seed + 2) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))) + self.down(x))


class TinyResNet(nn.Module):
    """stem, max-pool, an identity block, a downsampling block, global pool, linear: 6 Conv,
    2 residual Add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 1, seed=0), nn.ReLU(), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1, seed=10), BasicBlock(16, 32, 2, seed=20))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyMobileNet(nn.Module):
    """MobileNetV2's inverted residual with ReLU6 (exported as Clip(0, 6)): 4 Conv, 1 Add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 2, seed=0), nn.ReLU6())
        self.expand = nn.Sequential(_conv_bn(16, 64, 1, 1, seed=1), nn.ReLU6())
        self.dw = nn.Sequential(_conv_bn(64, 64, 3, 1, seed=2, groups=64), nn.ReLU6())
        self.project = _conv_bn(64, 16, 1, 1, seed=3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyEncoder(nn.Module):
    """A post-norm (BERT-style) transformer layer with a padding mask (int64 input) turned into
    -inf: each LayerNorm output feeds a weight MatMul and a residual Add."""

    def __init__(self, d: int = 32, ff: int = 64) -> None:
        super().__init__()
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.d = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln0(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        bias = torch.where(mask[:, None, :] > 0, 0.0, float("-inf"))
        att = torch.softmax(q @ k.transpose(1, 2) / self.d**0.5 + bias, dim=-1)
        h = self.ln1(h + self.proj(att @ v))
        return self.ln2(h + self.ff2(nn.functional.gelu(self.ff1(h))))


def _ort_ops(model, level: str) -> Counter:
    return Counter(n.op_type for n in ort_optimized_model(model, level).graph.node)


def _images(cls: type[nn.Module], shape: tuple[int, ...], seed: int):
    """A seeded model of ``cls`` exported, 4 calibration batches and a held-out batch."""
    gen = seeded(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls().eval()
    proto = export_onnx(model, (torch.randn(1, *shape, generator=gen),))
    calib = [(torch.randn(4, *shape, generator=gen),) for _ in range(4)]
    return proto, calib, torch.randn(16, *shape, generator=gen).numpy()


def _static(proto, calib, tmp_path):
    """onnxruntime.quantization.quantize_static: QDQ, per-channel, U8S8, the same batches."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    names = [i.name for i in proto.graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(
                [{n: np.asarray(x) for n, x in zip(names, b, strict=True)} for b in calib]
            )

        def get_next(self):
            return next(self.it, None)

    onnx.save(proto, tmp_path / "fp32.onnx")
    quantize_static(
        str(tmp_path / "fp32.onnx"),
        str(tmp_path / "static.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(tmp_path / "static.onnx")


@pytest.mark.parametrize("level", ["extended", "all"])
def test_resnet_blocks_run_in_int8_end_to_end(level, tmp_path):
    proto, calib, held_out = _images(TinyResNet, (3, 16, 16), seed=3)
    qmodel, report = quantize_onnx(proto, calib)
    assert report.float_layers == {}
    ops = _ort_ops(qmodel, level)
    assert ops["QLinearConv"] == 6, ops
    assert ops["QLinearAdd"] == 2, ops  # both residuals, the Relu after each folded into Q
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1, ops
    assert ops["MaxPool"] + ops["NhwcMaxPool"] == 1, ops  # on uint8: no DQ before it
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0, ops  # the input only
    assert not {op: ops[op] for op in FLOAT_COMPUTE if ops[op]}, ops
    # at least as lean as what quantize_static makes ORT run
    static_ops = _ort_ops(_static(proto, calib, tmp_path), level)
    integer = sum(integer_op_counts(ort_optimized_model(qmodel, level)).values())
    assert sum(ops.values()) - integer <= sum(static_ops.values()) - sum(
        static_ops[op] for op in INTEGER_OPS
    ), (ops, static_ops)
    assert _cosine(_run(qmodel, held_out), _run(proto, held_out)) > 0.99


def test_relu6_folds_into_quantize(tmp_path):
    proto, calib, held_out = _images(TinyMobileNet, (3, 32, 32), seed=4)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == 3
    qmodel, report = quantize_onnx(proto, calib)
    for name in (n.output[0] for n in proto.graph.node if n.op_type == "Clip"):
        qp = report.activations[name]  # the range of Q lies inside [0, 6] in float32
        assert int(qp.zero_point) == 0, (name, qp)
        assert np.float32(qp.scale.item()) * np.float32(255) <= 6.0, (name, qp)
    ops = _ort_ops(qmodel, "all")
    assert ops["QLinearConv"] == 4 and ops["QLinearAdd"] == 1, ops
    assert ops["Clip"] == 0 and ops["DequantizeLinear"] == 0, ops
    assert ops["QuantizeLinear"] == 1, ops
    assert _cosine(_run(qmodel, held_out), _run(proto, held_out)) > 0.99


def test_clip_bounds_fitted_in_float32():
    from graphopt.quant.ort_policy import fit_bounds
    from graphopt.quant.qparams import asymmetric_qparams

    qp = asymmetric_qparams(0.0, 6.0)
    wide = replace(qp, scale=torch.tensor(np.nextafter(np.float32(6 / 255), np.float32(1))))
    assert np.float32(wide.scale.item()) * np.float32(255) > 6.0
    fitted = fit_bounds(wide, 0.0, 6.0)
    assert np.float32(fitted.scale.item()) * np.float32(255) <= 6.0
    assert fitted.scale.item() == pytest.approx(6 / 255, rel=1e-6)
    signed = asymmetric_qparams(-1.0, 1.0)  # z = 128: both ends must fit
    fitted = fit_bounds(replace(signed, scale=signed.scale * 1.01), -1.0, 1.0)
    s, z = np.float32(fitted.scale.item()), int(fitted.zero_point)
    assert s * np.float32(0 - z) >= -1.0 and s * np.float32(255 - z) <= 1.0
    assert fit_bounds(qp, 0.0, float("inf")) is qp


# quantize_static computes a zero point from the -inf mask (numpy warns); graphopt refuses it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_transformer_layer_keeps_float_glue_and_masks(tmp_path):
    gen = seeded(5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = TinyEncoder().eval()
    x = torch.randn(1, 8, 32, generator=gen)
    mask = torch.ones(1, 8, dtype=torch.int64)
    proto = export_onnx(model, (x, mask))

    def batch(n: int):
        lengths = torch.randint(1, 9, (n, 1), generator=gen)
        return torch.randn(n, 8, 32, generator=gen), (torch.arange(8) < lengths).long()

    calib = [batch(4) for _ in range(4)]
    qmodel, report = quantize_onnx(proto, calib)  # int64 mask accepted as calibration input
    floats = report.float_layers
    # only the 4 weight MatMuls are integer; the 2 residual Adds, scores + (-inf mask) and
    # GELU's x * (1 + erf) read float ops' outputs (bias Add, Div, Erf) and stay float
    assert [d.op_type for d in report.layers if d.quantized] == ["MatMul"] * 4, floats
    # the reports count the layers with weights apart (the scores' MatMuls have none)
    assert count_layers(report.layers) == (
        f"4 of {len(report.layers)} layers",
        "4 of 4 with weights, ",
    )
    assert sum("no Q/DQ pair" in r for r in floats.values()) == 4, floats
    ops = _ort_ops(qmodel, "all")
    # weight MatMuls read a Q/DQ input and give float; the residual Adds read the LayerNorm
    # outputs exactly, not through a DQ: no DQ, no Q/DQ round trip left
    assert ops["MatMulIntegerToFloat"] == 4, ops
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 0, ops
    xs, ms = batch(16)
    feed = {"input0": xs.numpy(), "input1": ms.numpy()}
    got = _run_feed(qmodel, feed)
    want = _run_feed(proto, feed)
    assert np.isfinite(got).all()
    assert _cosine(got, want) > 0.99
    static = _run_feed(_static(proto, calib, tmp_path), feed)
    static_cos = _cosine(static, want) if np.isfinite(static).all() else -1.0
    assert _cosine(got, want) >= static_cos


class MaskedHeads(nn.Module):
    """Two linear heads: one reads a -inf-masked copy of the input, one the input."""

    def __init__(self) -> None:
        super().__init__()
        self.masked, self.plain = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return self.masked(x.masked_fill(mask == 0, float("-inf"))), self.plain(x)


def test_nonfinite_calibration_tensor_keeps_layer_float():
    gen = seeded(6)
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = MaskedHeads().eval()
    proto = export_onnx(model, (torch.randn(1, 16), torch.ones(1, 16, dtype=torch.int64)))
    calib = [
        (torch.randn(4, 16, generator=gen), (torch.rand(4, 16, generator=gen) > 0.2).long())
        for _ in range(3)
    ]
    qmodel, report = quantize_onnx(proto, calib)
    gemms = {n.name: n for n in proto.graph.node if n.op_type == "Gemm"}
    masked = next(k for k, n in gemms.items() if n.output[0] == proto.graph.output[0].name)
    assert "holds inf or NaN" in report.float_layers[masked], report.float_layers
    assert len(report.quantized) == 1
    ops = _ort_ops(qmodel, "all")
    assert ops["QGemm"] == 1 and ops["Gemm"] + ops["FusedGemm"] == 1, ops


def test_replaced_float_weights_are_removed(small):
    proto, calib, _ = small
    qmodel, _ = quantize_onnx(proto, calib)
    weights = {i for n in proto.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:]}
    assert not weights & {t.name for t in qmodel.graph.initializer}
    assert qmodel.ByteSize() < 0.5 * proto.ByteSize()

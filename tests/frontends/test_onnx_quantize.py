"""ONNX QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear converters against ONNX Runtime,
and a QDQ model as onnxruntime.quantization.quantize_static writes it."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphopt import optimize
from graphopt.backends.onnxruntime.session import session_options
from graphopt.core.numerics import exact_tolerance
from graphopt.frontends.onnx import import_onnx

RNG = np.random.default_rng(0)


def _ort(model: onnx.ModelProto, feeds: Sequence[np.ndarray], **kwargs) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), session_options("all", 1), **kwargs)
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})


def _model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _quantize_model(x_shape, scale, zp, opset: int, **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(scale, "s")]
    names = ["x", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        names.append("z")
    elem = helper.np_dtype_to_tensor_dtype(zp.dtype) if zp is not None else TensorProto.UINT8
    return _model(
        [helper.make_node("QuantizeLinear", names, ["y"], **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", elem, ["N", *x_shape[1:]])],
        inits,
        opset,
    )


def _import_run(model: onnx.ModelProto, *feeds: np.ndarray) -> list[np.ndarray]:
    gm = import_onnx(model)
    assert not gm.meta.get("onnx_opaque"), gm.meta.get("onnx_opaque")
    with torch.no_grad():
        out = gm(*[torch.from_numpy(f) for f in feeds])
    return [o.numpy() for o in (out if isinstance(out, tuple | list) else [out])]


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0, 3.49, np.float32(1e10)]])
    x = x.astype(np.float32)
    for zp in (np.array(0, np.int8), np.array(3, np.uint8), np.array(-5, np.int16)):
        model = _quantize_model(x.shape, np.array(1.0, np.float32), zp, 21)
        (got,) = _import_run(model, x)
        (ref,) = _ort(model, [x])
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "qtype, per_axis", [(np.int8, False), (np.uint8, True), (np.int16, False), (np.int8, True)]
)
def test_quantize_dequantize_pair_both_paths(qtype, per_axis: bool) -> None:
    x = RNG.standard_normal((2, 4, 5)).astype(np.float32) * 3
    scale = (RNG.uniform(0.01, 0.05, 4) if per_axis else np.array(0.02)).astype(np.float32)
    info = np.iinfo(qtype)
    zp = RNG.integers(info.min // 4, info.max // 4, scale.shape).astype(qtype)
    opset = 21 if qtype == np.int16 else 13
    model = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
        opset,
    )
    (ref,) = _ort(model, [x])
    (got,) = _import_run(model, x)
    np.testing.assert_array_equal(got, ref)  # x / s rounded: the same integers, the same floats
    result = optimize(model, example_inputs=[x], measure=False)
    np.testing.assert_array_equal(result(x), ref)
    ops = [n.op_type for n in result.artifact.proto.graph.node]
    if qtype != np.int16:  # opset 17's QuantizeLinear says int8/uint8 only
        assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops


def test_blocked_quantize_and_dequantize() -> None:
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    scale = RNG.uniform(0.01, 0.05, (3, 3)).astype(np.float32)  # blocks of 3 along axis 1
    zp = RNG.integers(-10, 10, (3, 3)).astype(np.int8)
    model = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, block_size=3),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=3),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7])],
        [
            helper.make_tensor_value_info("q", TensorProto.INT8, ["N", 7]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7]),
        ],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
        21,
    )
    for got, ref in zip(_import_run(model, x), _ort(model, [x]), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_dequantize_int32_bias_and_refused_int4() -> None:
    x = RNG.integers(-(2**20), 2**20, (2, 6)).astype(np.int32)
    model = _model(
        [helper.make_node("DequantizeLinear", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.array(1.7e-4, np.float32), "s")],
        13,
    )
    np.testing.assert_array_equal(_import_run(model, x)[0], _ort(model, [x])[0])
    w4 = helper.make_tensor("w", TensorProto.INT4, [4], [1, -2, 3, 7])
    refused = _model(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"])],
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w4, numpy_helper.from_array(np.array(0.5, np.float32), "s")],
        21,
    )
    with pytest.raises(Exception, match="INT4|int4"):  # no torch dtype: a clear refusal
        import_onnx(refused)


@pytest.mark.parametrize("shift", [0.0, 2.0, -2.0])
def test_dynamic_quantize_linear(shift: float) -> None:
    x = (RNG.standard_normal((3, 8)) + shift).astype(np.float32)
    model = _model(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 8]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.UINT8, []),
        ],
        [],
        11,
    )
    ref = _ort(model, [x])
    for got, r in zip(_import_run(model, x), ref, strict=True):
        assert got.dtype == r.dtype and got.shape == r.shape
        np.testing.assert_array_equal(got, r)
    if shift == 0.0:
        result = optimize(model, example_inputs=[x], measure=False)
        for got, r in zip(result(x), ref, strict=True):
            np.testing.assert_array_equal(got, r)


# --------------------------------------------------------------------------------------------
# a QDQ model as onnxruntime.quantization.quantize_static writes it


@pytest.fixture(scope="module")
def qdq_cnn(tmp_path_factory) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():  # random BN statistics, never identity BN
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    folder = tmp_path_factory.mktemp("qdq")
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, 16, 16),), f, dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}},
        )  # fmt: skip
    (folder / "float.onnx").write_bytes(f.getvalue())

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            batches = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(3)]
            self._it = iter({"x": b} for b in batches)

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        str(folder / "float.onnx"), str(folder / "qdq.onnx"), Reader(),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip
    return onnx.load(str(folder / "qdq.onnx"))


def _assert_exact(got: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(got.astype(np.float64) - ref).max())
    allowed = exact_tolerance(torch.from_numpy(ref))
    assert err <= allowed, f"max abs error {err:.3g} > {allowed:.3g}"


def test_quantize_static_model_imports_exactly(qdq_cnn: onnx.ModelProto) -> None:
    ops = [n.op_type for n in qdq_cnn.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    gm = import_onnx(qdq_cnn)
    assert not gm.meta.get("onnx_opaque")
    for n in (1, 3):
        x = RNG.standard_normal((n, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            got = gm(torch.from_numpy(x)).numpy()
        _assert_exact(got, _ort(qdq_cnn, [x])[0])


def test_quantize_static_model_optimize_is_exact_and_keeps_qdq(qdq_cnn: onnx.ModelProto) -> None:
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    result = optimize(qdq_cnn, example_inputs=[x], measure=False)
    artifact = result.artifact.proto
    ops = [n.op_type for n in artifact.graph.node]
    original = [n.op_type for n in qdq_cnn.graph.node]
    # every pair is kept, weights' DequantizeLinear included (ONNX Runtime's integer kernels
    # read them; a folded float weight it would quantize again, per tensor)
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert ops.count(op) == original.count(op), ops
    for n in (2, 1, 3):
        x = RNG.standard_normal((n, 3, 16, 16)).astype(np.float32)
        ref = _ort(qdq_cnn, [x])[0]
        _assert_exact(result(x), ref)
        # and in plain ONNX Runtime (default session options), as a user runs the file
        plain = ort.InferenceSession(artifact.SerializeToString()).run(None, {"x": x})[0]
        original_plain = ort.InferenceSession(qdq_cnn.SerializeToString()).run(None, {"x": x})[0]
        _assert_exact(plain, original_plain)

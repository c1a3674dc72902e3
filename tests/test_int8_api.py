"""optimize(..., precision="int8"): the int8 artifact, its report, errors, and the order of
re-parameterisation and quantisation measured on the train-time RepVGG."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.core.pass_infra import PassContext
from graphopt.errors import GraphoptError, InputError, VerificationError
from graphopt.frontends.torch import capture
from graphopt.lowering.int8 import int8_pipeline
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.quant.improve import quantize_int8
from graphopt.quant.qdq import integer_op_counts, ort_optimized_model
from graphopt.quant.qparams import weight_qparams
from graphopt.quant.runtime import predictor as _predictor
from graphopt.target import Target
from graphopt.testing import seeded


@pytest.fixture(scope="module")
def digits():
    zm = zoo.get("digits_cnn")
    xtr, _ = zoo.digits_data("train")
    calib = [(xtr[i : i + 32],) for i in range(0, 256, 32)]
    return zm, calib


def test_digits_int8_end_to_end(digits, tmp_path):
    zm, calib = digits
    before = {k: v.clone() for k, v in zm.model.state_dict().items()}
    with torch.inference_mode():  # as inference code calls it
        result = graphopt.optimize(
            zm.model,
            "cpu",
            example_inputs=zm.example_inputs,
            calibration_data=calib,
            precision="int8",
            measure=False,
        )
    xte, yte = zoo.digits_data("test")
    with torch.no_grad():
        acc_fp32 = float((zm.model(xte).argmax(1) == yte).float().mean()) * 100
    acc_int8 = float((result(xte).argmax(1) == yte).float().mean()) * 100
    assert acc_fp32 - acc_int8 <= 0.5, (acc_fp32, acc_int8)
    # the artifact is the int8 QDQ model, and ONNX Runtime runs integer kernels
    ops = integer_op_counts(ort_optimized_model(result.artifact.proto))
    assert ops["QLinearConv"] == 2, ops
    saved = onnx.load(str(result.save(tmp_path / "digits.int8.onnx")))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in saved.graph.node}
    q = result.quantization
    assert len(q.int8_layers) == 3 and not q.float_layers
    assert q.quant.method == "auto" and q.quant.choices  # per-tensor method choice by default
    assert all(b.applied for b in q.bias)
    text = str(result.report)
    assert "insert-qdq" in text and "int8: 3 of 3 layers int8" in text
    assert "Conv features.0: int8" in text  # the module path, as every report names layers
    # the summary states the metric in fp32 and int8, and the JSON has them as numbers
    assert "top-1 agreement with fp32: fp32 1 -> int8 " in text.split("details")[0]
    quantization = json.loads(result.report.to_json())["quantization"]
    assert quantization["fp32"] == 1.0
    assert quantization["int8"] == pytest.approx(1.0 - quantization["drop"])
    assert {d["layer"] for d in quantization["layers"]} == {
        "features.0",
        "features.3",
        "classifier",
    }
    record = result.report.records[-1]
    assert record.name == "insert-qdq" and record.modified and record.stats["int8"] == 3
    assert result.report.artifact_error.ok
    assert all(torch.equal(v, zm.model.state_dict()[k]) for k, v in before.items())


def test_int8_needs_calibration_data(digits):
    zm, _ = digits
    with pytest.raises(InputError, match="calibration_data"):
        graphopt.optimize(zm.model, "cpu", zm.example_inputs, precision="int8", measure=False)


@pytest.mark.parametrize(
    "batch, match",
    [
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(4, 1, 7, 8), "shape"),
        ((torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)), "2 inputs"),
    ],
)
def test_bad_calibration_data_raises_input_error(digits, batch, match):
    zm, _ = digits
    batches = [batch if isinstance(batch, tuple) else (batch,)]
    with pytest.raises(InputError, match=match):
        graphopt.optimize(
            zm.model,
            "cpu",
            zm.example_inputs,
            calibration_data=batches,
            precision="int8",
            measure=False,
        )


def test_precision_and_backend_errors(digits):
    zm, calib = digits
    with pytest.raises(GraphoptError, match="'int8'"):
        graphopt.optimize(zm.model, "cpu", zm.example_inputs, precision="int4")
    with pytest.raises(GraphoptError, match="precision='int8'"):
        graphopt.optimize(zm.model, "cpu", zm.example_inputs, max_drop=0.01)


def test_int8_on_tvm_runs_the_qdq_graph_and_says_what_it_made_of_it(digits):
    """backend='tvm' compiles the same QDQ model; TVM 0.27 imports it as fake quantisation
    (float conv between quantize/dequantize), which the report says."""
    pytest.importorskip("tvm", reason="the TVM backend needs pip install 'graphopt[tvm]'")
    zm, calib = digits
    kwargs = dict(calibration_data=calib, precision="int8", measure=False)
    on_tvm = graphopt.optimize(zm.model, "cpu", zm.example_inputs, backend="tvm", **kwargs)
    on_ort = graphopt.optimize(zm.model, "cpu", zm.example_inputs, **kwargs)
    assert on_tvm.report.backend == "tvm" and on_tvm.report.artifact_error.ok
    ops = on_tvm.artifact.imported_ops
    # one quantize per activation pair (input, 2 conv outputs, pool, flatten), float compute
    assert ops["relax.quantize"] == 5 and ops["relax.nn.conv2d"] == 2, ops
    text = str(on_tvm.report)
    assert "TVM imports the QDQ graph as fake quantisation: 5 quantize" in text
    assert "(2 conv2d, 1 matmul)" in text and "TVM tasks:" in text
    # the same int8 model: the same test-set accuracy, within fp32's - 0.5 points
    xte, yte = zoo.digits_data("test")
    fixed = zm.example_inputs[0].shape[0]  # TVM compiled the example's static batch

    def accuracy(run) -> float:
        hits = [int((run(xte[i : i + fixed]).argmax(1) == yte[i : i + fixed]).sum())
                for i in range(0, len(xte) - len(xte) % fixed, fixed)]  # fmt: skip
        return 100.0 * sum(hits) / (len(xte) - len(xte) % fixed)

    with torch.no_grad():
        acc_fp32 = accuracy(zm.model)
    acc_tvm, acc_ort = accuracy(on_tvm), accuracy(on_ort)
    assert acc_fp32 - acc_tvm <= 0.5 and abs(acc_tvm - acc_ort) <= 0.5, (acc_tvm, acc_ort)


def test_int8_pipeline_order():
    default = [s.name for s in int8_pipeline(parse_pipeline(Target.parse("cpu").default_pipeline))]
    assert default[-2:] == ["equalize-layers", "insert-qdq"]
    assert default.index("fold-conv-bn") < default.index("reparameterize") < len(default) - 2
    custom = int8_pipeline(parse_pipeline("insert-qdq{method=minmax},remove-identity"), 0.01)
    assert [s.name for s in custom] == [
        "remove-identity",
        "fold-conv-bn",
        "reparameterize",
        "equalize-layers",
        "insert-qdq",
    ]
    assert str(custom).endswith("insert-qdq{method=minmax,max_drop=0.01}")


class InputOutlierMlp(nn.Module):
    """fc1 -> relu -> fc2 whose input feature 0 is ~400x the others (a raw, unnormalised
    feature): per-tensor int8 on the model input flattens every other feature. No float pass
    can fix it (equalisation and SmoothQuant need a producer; the input has none), so the only
    way to meet max_drop is keeping fc1 in float."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_max_drop_fallback_through_optimize():
    gen = seeded(3)
    model = InputOutlierMlp().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.fc1.weight[:, 0] *= 1e-3  # the big feature moves the logits as much as the others
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = torch.ones(16)
    scale[0] = 400.0
    calib = [(torch.randn(32, 16, generator=gen) * scale,) for _ in range(4)]

    def run(max_drop, **kwargs):
        return graphopt.optimize(
            model, "cpu", (calib[0][0][:1],), calibration_data=calib, precision="int8",
            max_drop=max_drop, measure=False, **kwargs,
        )  # fmt: skip

    # no budget: every layer int8; the artifact breaks insert-qdq's contract, which raises...
    with pytest.raises(VerificationError, match="int8 artifact") as info:
        run(None)
    assert info.value.stage == "insert-qdq"
    # ...unless the mismatch is accepted: then it is a warning and the drop is only reported
    everything_int8 = run(None, accept_mismatch=True)
    assert any("int8 artifact" in w for w in everything_int8.report.warnings)
    reported = everything_int8.quantization
    assert reported.drop_all > 0.2 and not reported.fallback, reported.drop_all
    result = run(0.02)
    q = result.quantization
    assert q.drop_all == reported.drop_all and q.drop <= 0.02
    assert q.fallback == ["/fc1/Gemm"] and q.int8_layers == ["/fc2/Gemm"]
    assert result.report.pipeline.endswith("insert-qdq{max_drop=0.02}")
    assert "Gemm fc1: float (mixed-precision fallback" in str(result.report)
    assert integer_op_counts(ort_optimized_model(result.artifact.proto))["QGemm"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------------
# re-parameterisation and quantisation: which order


def _cosine(y: np.ndarray, ref: np.ndarray) -> float:
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return float(
        np.mean((y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1)))
    )


def test_repvgg_reparameterize_then_quantize_beats_quantize_then_reparameterize():
    """Quantise RepVGG-A0 (train-time, 64x64 inputs) in both orders; keep optimize's order.

    reparam-then-quantize: the int8 pipeline optimize() runs (fold, reparameterize, equalize)
    and then the int8 quantiser. quantize-then-reparam: every branch's folded weights rounded to
    per-channel int8 first, the branches merged, and the merged convs quantised as deployed
    (they are no longer on an int8 grid, so they are rounded a second time). Same quantiser
    settings (minmax, SmoothQuant, bias correction), same data.
    """
    zm = zoo.get("repvgg_a0")
    gen = seeded(0)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    calib = [(torch.randn(8, 3, 64, 64, generator=gen),) for _ in range(4)]
    test = torch.randn(32, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = zm.model(test).numpy()
    ctx = PassContext(sample_inputs=(x,))

    def int8_cosine(gm) -> float:
        q, _ = quantize_int8(export_onnx(gm, (x,)), calib, method="minmax")
        return _cosine(_predictor(q)(test.numpy()), ref)

    chosen = [s for s in int8_pipeline(parse_pipeline(Target.parse("cpu").default_pipeline))]
    fx_part = ",".join(str(s) for s in chosen if s.name != "insert-qdq")
    gm = PassManager(fx_part, strict=True).run(capture(zm.model, (x,)).graph, ctx).graph
    reparam_first = int8_cosine(gm)

    gm = PassManager("fold-conv-bn", strict=True).run(capture(zm.model, (x,)).graph, ctx).graph
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(weight_qparams(m.weight).fake_quantize(m.weight))
    gm = PassManager("reparameterize,eliminate-dead-code").run(gm, PassContext()).graph
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())  # fully merged
    quantize_first = int8_cosine(gm)
    print(f"repvgg_a0 int8 output cosine: reparam->quantize {reparam_first:.5f}, "
          f"quantize->reparam {quantize_first:.5f}")  # fmt: skip
    assert reparam_first > quantize_first

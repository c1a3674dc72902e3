"""The reference's own precision: for an ONNX model ONNX Runtime computes the reference, so the
exact contract's rounding allowance takes ONNX Runtime's spread between its optimization levels
as well as the imported graph's float32-vs-float64 rounding (PP-OCRv4 det needs it; see
tests/conformance/test_real_onnx.py)."""

from __future__ import annotations

import io

import torch
from torch import nn

from graphopt.backends import get_backend
from graphopt.core.numerics import rounding_error, run_module
from graphopt.frontends.torch import capture
from graphopt.lowering.baseline import Baseline, load_original_onnx
from graphopt.target import Target


def _onnx() -> tuple[bytes, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.Sigmoid())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(1, 3, 12, 12)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return buffer.getvalue(), model, x


def test_an_onnx_references_rounding_includes_onnx_runtimes_spread(monkeypatch) -> None:
    data, _, x = _onnx()
    ort = get_backend("onnxruntime", Target.parse("cpu"))
    captured = capture(data, (x,))
    baseline = Baseline(onnx=load_original_onnx(ort, data))
    (reference,) = baseline.reference_outputs([(x,)])
    spread = baseline._onnx_spread((x,), [reference])
    assert spread is not None and len(spread) == 1 and spread[0] >= 0.0
    own = rounding_error(captured.graph, (x,), [reference])
    got = baseline.rounding(captured.graph, (x,), [reference])
    assert got == [max(own[0], spread[0])]
    # the larger of the two wins, whichever it is
    monkeypatch.setattr(baseline, "_onnx_spread", lambda sample, outputs: [1.0])
    assert baseline.rounding(captured.graph, (x,), [reference]) == [1.0]


def test_a_modules_rounding_is_its_float64_distance() -> None:
    _, model, x = _onnx()
    baseline = Baseline(module=model)
    outputs = run_module(model, (x,))
    assert baseline.rounding(model, (x,), outputs) == rounding_error(model, (x,), outputs)

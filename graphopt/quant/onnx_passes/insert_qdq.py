"""insert-qdq: calibrated int8 QDQ pairs on the exported ONNX graph, where ONNX Runtime fuses them.

The last pass of the int8 stage. It calibrates the float model on the calibration data
(``method``; ``auto`` picks the observer per tensor by measured error) and inserts the pairs the
ONNX Runtime policy asks for (:mod:`graphopt.quant.ort_policy`, through
:func:`graphopt.quant.qdq.quantize_onnx`)::

    activation t:   t -> QuantizeLinear(s, z) -> DequantizeLinear(s, z)     (per tensor)
    weight W:       DequantizeLinear(round(W / s_w), s_w, axis)              (int8, per channel)
    bias b:         DequantizeLinear(round(b / (s_x s_w)), s_x s_w)          (int32)

Layers marked to stay in float (the user's skip list, fallback-to-float's choice) stay float
with that reason; every layer left in float gets its bias from before correct-bias back. The
decisions are one line for the whole (layers int8, calibration, the metric drop against the
float model) and one per layer: int8, or float and why. Numerics: lossy, output cosine >= 0.95
against the float model: a guard against a broken quantisation; ``max_drop`` (fallback-to-float)
is the accuracy control.

Why the pairs go on the ONNX graph and not into FX: whether ONNX Runtime fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` depends on the graph it sees after export (Relu
removal, Flatten/Reshape sharing scales, Gemm vs MatMul), so placement is decided there; and a
fake-quant node in FX would export as whatever the exporter emits, not what ORT fuses.

**In a pipeline string** ``insert-qdq{...}`` stands for the whole int8 stage, which the lowering
runs on the export after the FX passes: :func:`graphopt.quant.onnx_passes.int8_passes` expands
its options into ``smooth-quant{alpha}`` (``smoothquant``), ``correct-bias``
(``bias_correction``), ``fallback-to-float{max_drop}`` (``max_drop`` set) and this pass, which
itself reads only ``method`` and ``activations``. Order (``optimize(precision="int8")``):
``fold-conv-bn`` and ``reparameterize`` first, then ``equalize-layers``, then this stage.

Not handled: TVM lowering of the QDQ model (TVM imports it as fake quantisation), int4 / int16,
per-channel activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import onnx

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.quant.annotations import original_biases, restore_biases, strip
from graphopt.quant.onnx_passes.common import OnnxPass, quantize_marked, stage_batches, stage_run
from graphopt.quant.ort_policy import count_layers
from graphopt.quant.qdq import QuantReport
from graphopt.quant.scoring import Scorer

__all__ = ["InsertQDQ", "QdqSummary"]

Method = Literal["minmax", "percentile", "entropy", "mse", "auto"]


@dataclass
class QdqSummary:
    """insert-qdq's first decision: the quantisation as a whole and its metric drop."""

    quant: QuantReport
    metric: str
    drop: float
    fp32: float = 1.0  # the metric's value on the float model (1 for agreement with fp32)

    def __str__(self) -> str:
        q = self.quant
        count, weighted = count_layers(q.layers)
        return (
            f"int8: {count} int8 ({weighted}{q.method} calibration, "
            f"{q.activation_dtype} activations, {q.batches} batches); {self.metric}: fp32 "
            f"{self.fp32:.4g}, int8 {self.fp32 - self.drop:.4g} (drop {self.drop:.4g})"
        )


@register_pass
class InsertQDQ(OnnxPass):
    """Calibrate and insert the int8 QDQ pairs ONNX Runtime fuses (see the module docstring)."""

    name = "insert-qdq"
    numerics = Numerics.lossy("cosine", 0.95)

    @dataclass(frozen=True)
    class Options:
        method: Method = "auto"  # minmax | percentile | entropy | mse | auto (per tensor)
        activations: Literal["uint8", "int8"] = "uint8"  # asymmetric | symmetric
        weights: Literal["auto", "int8", "int7"] = field(
            default="auto",
            metadata={
                "doc": "int7: weights in [-63, 63], exact on x86 int8 kernels without VNNI; "
                "auto: int7 where the target is this CPU and it has no VNNI, else int8"
            },
        )
        # the rest configures the stage int8_passes builds around this pass
        smoothquant: bool = True  # the stage runs smooth-quant{alpha} first
        alpha: float = field(
            default=0.5,
            metadata={
                "min": 0.0,
                "max": 1.0,
                "doc": "smooth-quant's a: how much of the activation range moves to weights",
            },
        )
        bias_correction: bool = True  # the stage runs correct-bias
        max_drop: float | None = None  # metric drop allowed; None: no float fallback

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o, run = self.options, stage_run(ctx)
        batches = stage_batches(ctx, model)
        qmodel, report, _ = quantize_marked(
            model, batches, run, method=o.method, activations=o.activations, bar="calibrating"
        )
        # the float reference: the model before bias correction (its shifts are for int8)
        scorer = Scorer(restore_biases(model, original_biases(model)), batches, ctx.metric)
        summary = QdqSummary(report, scorer.name, scorer.drop(qmodel), scorer.base)
        run.say(str(summary))
        strip(qmodel)
        stats = {"int8": len(report.quantized), "float": len(report.float_layers)}
        return PassResult(qmodel, bool(report.activations), stats, [summary, *report.layers])

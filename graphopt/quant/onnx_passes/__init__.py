"""The int8 stage's passes, over the exported ``onnx.ModelProto``; importing this package
registers them (graphopt declares it in the ``graphopt.passes`` entry-point group).

They run under ``PassManager(passes, ir=ONNX)`` (:mod:`graphopt.quant.onnx_ir`) with the same
contract as the FX passes (a numeric check after each pass, rollback, reproducers), in this
order (:func:`int8_passes`):

    smooth-quant{alpha}        activation outliers into the weights          exact
    correct-bias               int8 weights' mean output shift into biases   lossy(cosine >= 0.99)
    fallback-to-float{max_drop} layers kept float until the drop <= max_drop exact (marks only)
    insert-qdq{method,...}     calibration and the QDQ pairs ORT fuses       lossy(cosine >= 0.95)

Every pass sets ``ir = "onnx"``: the FX pipeline refuses them. They hand each other nothing but
the model (:mod:`graphopt.quant.annotations`); the context gives them the calibration data,
the user's metric and, through :class:`StageRun`, progress lines and the last quantisation
(computed once when fallback-to-float's last trial is what insert-qdq quantises).
"""

from __future__ import annotations

from graphopt.core.pass_infra import Pass
from graphopt.quant.onnx_passes.common import OnnxPass, StageRun
from graphopt.quant.onnx_passes.correct_bias import (
    BiasCorrection,
    CorrectBias,
    apply_bias_shifts,
    bias_correction,
)
from graphopt.quant.onnx_passes.fallback_to_float import (
    FallbackSummary,
    FallbackToFloat,
    LayerSensitivity,
)
from graphopt.quant.onnx_passes.insert_qdq import InsertQDQ, QdqSummary
from graphopt.quant.onnx_passes.smooth_quant import SmoothQuant, SmoothQuantDecision, smooth_quant

__all__ = [
    "BiasCorrection",
    "CorrectBias",
    "FallbackSummary",
    "FallbackToFloat",
    "InsertQDQ",
    "LayerSensitivity",
    "OnnxPass",
    "StageRun",
    "QdqSummary",
    "SmoothQuant",
    "SmoothQuantDecision",
    "apply_bias_shifts",
    "bias_correction",
    "int8_passes",
    "smooth_quant",
]


def int8_passes(options: InsertQDQ.Options | None = None) -> list[Pass]:
    """The int8 stage ``insert-qdq{...}`` stands for in a pipeline string: the improvers its
    options ask for, then insert-qdq itself.

    >>> [str(p) for p in int8_passes(InsertQDQ.Options(max_drop=0.01))]
    ['smooth-quant', 'correct-bias', 'fallback-to-float', 'insert-qdq{max_drop=0.01}']
    """
    o = options or InsertQDQ.Options()
    passes: list[Pass] = []
    if o.smoothquant:
        passes.append(SmoothQuant(alpha=o.alpha))
    if o.bias_correction:
        passes.append(CorrectBias())
    if o.max_drop is not None:
        passes.append(
            FallbackToFloat(max_drop=o.max_drop, method=o.method, activations=o.activations)
        )
    passes.append(InsertQDQ(o))
    return passes

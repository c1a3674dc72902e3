"""Int8 quantisation on the exported ONNX graph (issue 6).

Layers, bottom up: ``qparams`` (scales and zero points), ``observers`` (minmax, percentile,
entropy, mse statistics), ``calibration`` (batches checked against a model, the per-tensor method
choice), ``graph`` / ``runtime`` (an ONNX graph index, ONNX Runtime sessions), ``ort_policy``
(which tensors get a Q/DQ pair so that ONNX Runtime fuses integer kernels), ``qdq`` (the
mechanism: calibrate and insert the pairs, :func:`quantize_onnx`), ``scoring`` (the metric drop),
``annotations`` (what the stage's passes leave in the model for each other), ``onnx_ir`` (the
stage's IR for the pass manager), ``onnx_passes`` (smooth-quant, correct-bias,
fallback-to-float, insert-qdq) and ``improve`` (:func:`quantize_int8`, the whole calibrated flow
that ``optimize(precision="int8")`` runs, as a pipeline of those passes).
"""

from graphopt.quant.calibration import (
    MethodChoice,
    calibration_batches,
    choose_observer,
    fake_quant_error,
    validate_calibration_batches,
)
from graphopt.quant.improve import Int8Report, int8_report, quantize_int8
from graphopt.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from graphopt.quant.onnx_ir import ONNX
from graphopt.quant.onnx_passes import (
    BiasCorrection,
    CorrectBias,
    FallbackToFloat,
    InsertQDQ,
    LayerSensitivity,
    SmoothQuant,
    SmoothQuantDecision,
    apply_bias_shifts,
    bias_correction,
    int8_passes,
    smooth_quant,
)
from graphopt.quant.ort_policy import INTEGER_OPS, LayerDecision
from graphopt.quant.qdq import QuantReport, integer_op_counts, ort_optimized_model, quantize_onnx
from graphopt.quant.qparams import QParams, bias_qparams, quantize_bias, weight_qparams
from graphopt.quant.scoring import default_metric

__all__ = [
    "INTEGER_OPS",
    "OBSERVERS",
    "ONNX",
    "BiasCorrection",
    "CorrectBias",
    "EntropyObserver",
    "FallbackToFloat",
    "HistogramObserver",
    "InsertQDQ",
    "Int8Report",
    "LayerDecision",
    "LayerSensitivity",
    "MSEObserver",
    "MethodChoice",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "QuantReport",
    "SmoothQuant",
    "SmoothQuantDecision",
    "apply_bias_shifts",
    "bias_correction",
    "bias_qparams",
    "calibration_batches",
    "choose_observer",
    "default_metric",
    "fake_quant_error",
    "int8_passes",
    "int8_report",
    "integer_op_counts",
    "make_observer",
    "ort_optimized_model",
    "quantize_bias",
    "quantize_int8",
    "quantize_onnx",
    "smooth_quant",
    "validate_calibration_batches",
    "weight_qparams",
]

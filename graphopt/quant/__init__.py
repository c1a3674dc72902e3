"""Quantisation building blocks: calibration observers and int8 parameters (issue 6).

``graphopt.quant.calibration`` turns statistics gathered over calibration batches into the
scales and zero points of symmetric int8 / asymmetric uint8 tensors, per-channel int8 weights
and int32 biases, and picks the calibration method per layer by measured error.
``graphopt.quant.qdq`` calibrates an ONNX model and inserts QuantizeLinear/DequantizeLinear
pairs that ONNX Runtime fuses into integer kernels. ``graphopt.quant.improve`` adds the accuracy
improvers (SmoothQuant, bias correction, the mixed-precision fallback under ``max_drop``) and
:func:`quantize_int8`, the whole calibrated flow that ``optimize(precision="int8")`` runs.
"""

from graphopt.quant.calibration import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MethodChoice,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    QParams,
    bias_qparams,
    choose_observer,
    fake_quant_error,
    make_observer,
    quantize_bias,
    validate_calibration_batches,
    weight_qparams,
)
from graphopt.quant.improve import (
    BiasCorrection,
    Int8Report,
    LayerSensitivity,
    SmoothQuantDecision,
    apply_bias_shifts,
    bias_correction,
    calibration_batches,
    default_metric,
    quantize_int8,
    smooth_quant,
)
from graphopt.quant.qdq import (
    LayerDecision,
    QuantReport,
    integer_op_counts,
    ort_optimized_model,
    quantize_onnx,
)

__all__ = [
    "OBSERVERS",
    "BiasCorrection",
    "EntropyObserver",
    "HistogramObserver",
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
    "SmoothQuantDecision",
    "apply_bias_shifts",
    "bias_correction",
    "bias_qparams",
    "calibration_batches",
    "choose_observer",
    "default_metric",
    "fake_quant_error",
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

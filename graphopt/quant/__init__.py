"""Quantisation building blocks: calibration observers and int8 parameters (issue 6).

``graphopt.quant.calibration`` turns statistics gathered over calibration batches into the
scales and zero points of symmetric int8 / asymmetric uint8 tensors, per-channel int8 weights
and int32 biases, and picks the calibration method per layer by measured error.
``graphopt.quant.qdq`` calibrates an ONNX model and inserts QuantizeLinear/DequantizeLinear
pairs that ONNX Runtime fuses into integer kernels.
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
from graphopt.quant.qdq import (
    LayerDecision,
    QuantReport,
    integer_op_counts,
    ort_optimized_model,
    quantize_onnx,
)

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "HistogramObserver",
    "LayerDecision",
    "MSEObserver",
    "MethodChoice",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "QuantReport",
    "bias_qparams",
    "choose_observer",
    "fake_quant_error",
    "integer_op_counts",
    "make_observer",
    "ort_optimized_model",
    "quantize_bias",
    "quantize_onnx",
    "validate_calibration_batches",
    "weight_qparams",
]

"""ONNX Runtime backend: FX -> ONNX -> ``InferenceSession``; run, save, measure.

``backend``: :class:`OnnxRuntimeBackend` (compile, load, measure, select session settings);
``artifact``: :class:`OrtArtifact` (the model with its session); ``session``: the session
settings every session shares (:data:`EXACT_INT8_CONFIG`) and :func:`ort_optimized_model`;
``mobile``: the ORT format, its operator config and XNNPACK session file for phones.
The torch -> ONNX export itself is :mod:`graphopt.backends.export`.
"""

from __future__ import annotations

from graphopt.backends.arrays import to_numpy
from graphopt.backends.onnxruntime.artifact import OrtArtifact
from graphopt.backends.onnxruntime.backend import (
    OnnxRuntimeBackend,
    SettingsChoice,
    settings_label,
)
from graphopt.backends.onnxruntime.mobile import MobilePackage, save_ort_format
from graphopt.backends.onnxruntime.session import (
    EXACT_INT8_CONFIG,
    SETTING_NAMES,
    ort_optimized_model,
)

__all__ = [
    "EXACT_INT8_CONFIG",
    "SETTING_NAMES",
    "MobilePackage",
    "OnnxRuntimeBackend",
    "OrtArtifact",
    "SettingsChoice",
    "ort_optimized_model",
    "save_ort_format",
    "settings_label",
    "to_numpy",
]

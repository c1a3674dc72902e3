"""The com.microsoft ops that ONNX Runtime's own tools (transformer optimizer, quantization) emit."""

from __future__ import annotations

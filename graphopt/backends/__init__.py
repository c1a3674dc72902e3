"""Backends lower a rewritten graph to a runtime and measure it.

``onnxruntime``: FX -> ONNX -> ``InferenceSession`` (this package's default).
``tvm``: FX -> Relax -> MetaSchedule-tuned library on the Relax VM (extra ``graphopt[tvm]``).
``openvino``: FX -> ONNX -> OpenVINO's compiled model (extra ``graphopt[openvino]``).
What every backend and artifact offers is :mod:`graphopt.backends.base` (the ``Backend`` and
``Artifact`` protocols); what they share: the torch -> ONNX export
(:mod:`graphopt.backends.export`) and timing with the on-disk latency cache
(:mod:`graphopt.backends.measure`). A backend's module is imported when :func:`get_backend`
first asks for it, so ``import graphopt.backends`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from graphopt._util import close_matches
from graphopt.backends.base import Artifact, Backend
from graphopt.errors import BackendError

# backend name -> "module:class", imported on first use
BACKENDS: dict[str, str] = {
    "onnxruntime": "graphopt.backends.onnxruntime:OnnxRuntimeBackend",
    "tvm": "graphopt.backends.tvm:TvmBackend",
    "openvino": "graphopt.backends.openvino:OpenVinoBackend",
}

__all__ = ["BACKENDS", "Artifact", "Backend", "get_backend"]


def get_backend(name: str, target: Any, **options: Any) -> Backend:
    """Instantiate the backend called ``name`` for ``target`` (``options``: the backend's own
    keyword arguments, e.g. ``trials=`` for TVM)."""
    if name not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}."
            + close_matches(name, BACKENDS)
            + f" Available: {', '.join(BACKENDS)}."
        )
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(target, **options)

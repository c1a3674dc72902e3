"""OpenVINO backend: FX -> ONNX -> ``openvino.Core().compile_model``; run, save, measure.

``backend``: :class:`OpenVinoBackend` (compile, load, measure); ``artifact``:
:class:`OpenVinoArtifact` (the ONNX model with OpenVINO's compiled model; saves IR ``.xml`` +
``.bin`` or ``.onnx``; reads which layers run on int8 kernels); ``config``: the device for a
target, the compile properties and the performance hints (:data:`HINTS`).

OpenVINO is an extra (``pip install "graphopt[openvino]"``): the names that need it are
imported on first use (PEP 562), so ``import graphopt.backends.openvino`` does not import
OpenVINO; without it, those names raise a ``BackendError`` that says what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphopt.backends.openvino.config import (
    HINTS,
    INSTALL,
    SETTING_NAMES,
    compile_config,
    device_for,
    missing_openvino,
)

# public name -> the module of this package that defines it (each imports OpenVINO)
_LAZY: dict[str, str] = {
    "OpenVinoBackend": "backend",
    "OpenVinoArtifact": "artifact",
    "COMPUTE_LAYERS": "artifact",
    "int8_saturation": "artifact",
}

__all__ = [
    "COMPUTE_LAYERS",
    "HINTS",
    "INSTALL",
    "OpenVinoArtifact",
    "OpenVinoBackend",
    "SETTING_NAMES",
    "compile_config",
    "device_for",
    "int8_saturation",
    "missing_openvino",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt.backends.openvino' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"graphopt.backends.openvino.{_LAZY[name]}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "openvino":
            raise
        raise missing_openvino(exc) from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from graphopt.backends.openvino.artifact import (
        COMPUTE_LAYERS,
        OpenVinoArtifact,
        int8_saturation,
    )
    from graphopt.backends.openvino.backend import OpenVinoBackend

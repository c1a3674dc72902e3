"""graphopt: make a trained network faster on a target, with proof that its outputs did not move.

    >>> import graphopt
    >>> result = graphopt.optimize(model, target="cpu", example_inputs=(x,))
    >>> y = result(x)
    >>> result.save("model.onnx")
    >>> print(result.report)

``import graphopt`` is cheap: torch, ONNX Runtime and TVM are imported on first use of the
attribute that needs them (PEP 562 lazy attributes), so a CLI or a process that only parses a
pipeline string does not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphopt._util import VERSION
from graphopt.errors import (
    BackendError,
    CaptureError,
    GraphoptError,
    InputError,
    PassError,
    PipelineError,
    TargetError,
    VerificationError,
)

__version__ = VERSION

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "optimize": "graphopt.api",
    "OptimizedModel": "graphopt.api",
    "Optimizer": "graphopt.api",
    "capture": "graphopt.frontends.torch",
    "Pass": "graphopt.core",
    "PassResult": "graphopt.core",
    "PassContext": "graphopt.core",
    "PassManager": "graphopt.pipeline",
    "Numerics": "graphopt.core",
    "register_pass": "graphopt.core",
    "parse_pipeline": "graphopt.pipeline",
    "Target": "graphopt.target",
    "Report": "graphopt.report",
    "tune_mode": "graphopt.tune",
    "MonarchLinear": "graphopt.nn",
}
_SUBMODULES = {
    "zoo",
    "testing",
    "passes",
    "backends",
    "core",
    "pipeline",
    "frontends",
    "api",
    "target",
    "report",
    "tune",
    "nn",
    "fx",
    "algebra",
    "lowering",
    "quant",
    "bench",
}

__all__ = [
    "BackendError",
    "CaptureError",
    "GraphoptError",
    "InputError",
    "Numerics",
    "OptimizedModel",
    "Optimizer",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "Report",
    "Target",
    "TargetError",
    "VerificationError",
    "capture",
    "optimize",
    "parse_pipeline",
    "register_pass",
    "tune_mode",
    "MonarchLinear",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"graphopt.{name}")
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover
    from graphopt.api import OptimizedModel, Optimizer, optimize
    from graphopt.core.numerics import Numerics
    from graphopt.core.pass_infra import Pass, PassContext, PassResult
    from graphopt.core.registry import register_pass
    from graphopt.frontends.torch import capture
    from graphopt.nn import MonarchLinear
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.report import Report
    from graphopt.target import Target
    from graphopt.tune import tune_mode

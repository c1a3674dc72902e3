"""Backends lower a rewritten graph to a runtime and measure it.

``onnxruntime``: FX -> ONNX -> ``InferenceSession`` (this package's default).
``tvm``: FX -> Relax -> MetaSchedule-tuned library on the Relax VM (extra ``graphopt[tvm]``).
What backends share (timing, the on-disk latency cache) lives in :mod:`graphopt.backends.measure`.
Backend modules import their runtime lazily, so ``import graphopt.backends`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from graphopt._util import close_matches
from graphopt.errors import BackendError

BACKENDS = ("onnxruntime", "tvm")


def get_backend(name: str, target: Any, **options: Any) -> Any:
    """Instantiate the backend called ``name`` for ``target``."""
    if name == "onnxruntime":
        from graphopt.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(target, **options)
    if name == "tvm":
        from graphopt.backends.tvm import TvmBackend

        return TvmBackend(target, **options)
    raise BackendError(
        f"unknown backend {name!r}."
        + close_matches(name, BACKENDS)
        + f" Available: {', '.join(BACKENDS)}."
    )

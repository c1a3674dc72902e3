"""ONNX Runtime session settings every graphopt session shares, and the optimized graph ORT runs.

Sessions use full graph optimization, sequential execution and one intra-op thread per
available core by default (``OnnxRuntimeBackend``); :data:`SETTING_NAMES` are the settings a
backend may change (``with_settings``) and the latency cache keys on. Every session sets
:data:`EXACT_INT8_CONFIG`. :func:`ort_optimized_model` reads back the graph ONNX Runtime runs
after its optimizations (which integer kernels it fused, which shapes it folded).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import TypeVar

import onnx
import onnxruntime as ort

from graphopt._util import close_matches
from graphopt.backends.quiet import quiet
from graphopt.errors import BackendError

OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
EXEC_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
SETTING_NAMES = (
    "threads",
    "optimization_level",
    "execution_mode",
    "inter_op_threads",
    "spinning",
)

# ORT's uint8 x int8 kernels on x86 without VNNI (SSE4.1, AVX2, AVX-512F) sum each pair of
# products in saturating int16 (PMADDUBSW: 255 * 127 * 2 = 64770 is clamped to 32767), so the
# fused int8 model is far from its QDQ function on such CPUs. This session entry makes ORT
# shift the int8 weights to uint8 and run its exact uint8 x uint8 kernels there; elsewhere
# (VNNI, AMX, ARM) it does nothing. Set on every session (float models have no such kernel).
EXACT_INT8_CONFIG = ("session.x64quantprecision", "1")

Choice = TypeVar("Choice", bound=str)


def choose(name: str, value: Choice, choices: Iterable[str]) -> Choice:
    """``value`` when it is one of ``choices``, else a BackendError that lists them."""
    choices = list(choices)
    if value not in choices:
        raise BackendError(
            f"{name} must be one of {', '.join(choices)}, not {value!r}."
            + close_matches(str(value), choices)
        )
    return value


def session_options(optimization_level: str, threads: int) -> ort.SessionOptions:
    """Options with the graph optimization ``optimization_level`` (:data:`OPT_LEVELS`),
    ``threads`` intra-op threads, errors-only logging and :data:`EXACT_INT8_CONFIG`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[optimization_level]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry(*EXACT_INT8_CONFIG)  # int8 artifacts compute their QDQ
    return opts


def ort_optimized_model(model: onnx.ModelProto, level: str = "extended") -> onnx.ModelProto:
    """The graph ONNX Runtime (CPU) runs after its optimisations, read back from the file
    ``SessionOptions.optimized_model_filepath`` writes. ``level``: ``basic`` (constant folding
    and semantics-preserving rewrites only), ``extended`` or ``all``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = session_options(level, threads=1)
        opts.optimized_model_filepath = path
        try:
            with quiet():
                ort.InferenceSession(
                    model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime could not load the model: {type(exc).__name__}: {exc}"
            ) from exc
        return onnx.load(path)

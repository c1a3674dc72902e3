"""What an OpenVINO compile is configured with, and what needs no OpenVINO to say.

:func:`device_for` maps graphopt's target to OpenVINO's device (``cpu`` -> ``"CPU"``; a target
OpenVINO cannot serve is a :class:`TargetError` naming the backends that can).
:func:`compile_config` is the property map of every ``compile_model``: the performance hint
(:data:`HINTS`, a setting a search can vary), the inference threads, and f32 inference
precision (a CPU with bf16 would otherwise run a float model in bf16, outside the exact
contract). :func:`missing_openvino` is the error where the package is not installed.
"""

from __future__ import annotations

from typing import Any

from graphopt._util import close_matches
from graphopt.errors import BackendError, TargetError
from graphopt.target import Target

INSTALL = 'pip install "graphopt[openvino]"'
# graphopt's name -> OpenVINO's PERFORMANCE_HINT; "latency" is one request as fast as possible
HINTS = {
    "latency": "LATENCY",
    "throughput": "THROUGHPUT",
    "cumulative_throughput": "CUMULATIVE_THROUGHPUT",
}
SETTING_NAMES = ("threads", "hint")


def device_for(target: Target) -> str:
    """OpenVINO's device for ``target``: this machine's CPU for a ``cpu`` target (``llvm``
    strings for a CPU included: their ``-mcpu`` is TVM's, OpenVINO picks its kernels for the
    CPU it runs on)."""
    if target.device == "cpu":
        return "CPU"
    if target.device == "cuda":
        raise TargetError(
            f"the openvino backend has no {target} device: OpenVINO runs on Intel CPUs, GPUs "
            "and NPUs, not NVIDIA's. For cuda use backend='onnxruntime' (with onnxruntime-gpu) "
            "or backend='tvm'."
        )
    raise TargetError(
        f"the openvino backend compiles for this machine's CPU, not for {target} (a phone or "
        "board). Use backend='onnxruntime' (checks the numbers here and saves .ort for the "
        "device) or backend='tvm' (cross-compiles, runs through an RPC device)."
    )


def check_hint(hint: str) -> str:
    """``hint`` when it is one of :data:`HINTS`, else a BackendError that lists them."""
    if hint not in HINTS:
        raise BackendError(
            f"hint must be one of {', '.join(HINTS)}, not {hint!r}."
            + close_matches(str(hint), HINTS)
        )
    return hint


def compile_config(threads: int, hint: str) -> dict[str, Any]:
    """The properties every ``compile_model`` of the backend gets."""
    return {
        "PERFORMANCE_HINT": HINTS[hint],
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",
    }


def missing_openvino(exc: ImportError) -> BackendError:
    """The error where ``import openvino`` failed with ``exc``."""
    return BackendError(
        f"the openvino backend needs the openvino package: {INSTALL} (or pip install openvino). "
        f"({exc})"
    )

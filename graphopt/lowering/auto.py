"""``backend="auto"``: the backend chosen by measurement.

ONNX Runtime with the session settings that measured fastest on this model, against TVM where
TVM is tuned for the model (or ``trials`` / ``tune_minutes`` ask to tune it); both artifacts are
timed interleaved in the same run and the faster is kept. The report says why the winner won.
"""

from __future__ import annotations

from typing import Any

from graphopt.backends import Artifact, Backend, get_backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.measure import time_interleaved
from graphopt.backends.onnxruntime import OnnxRuntimeBackend, OrtArtifact
from graphopt.errors import BackendError
from graphopt.lowering.context import Lowering, report_tvm
from graphopt.lowering.fp32 import lower


def choose_backend(
    lowering: Lowering,
    ort: OnnxRuntimeBackend,
    ort_artifact: OrtArtifact,
    tvm_options: dict[str, Any],
    measure: bool,
) -> tuple[Backend, Artifact]:
    """backend='auto': ORT with measured session settings against TVM when TVM is tuned."""
    report, say = lowering.report, lowering.say
    arrays = [to_numpy(x) for x in lowering.inputs]
    mobile = lowering.target.device == "mobile"
    if measure and not mobile:
        ort, ort_artifact = _select_settings(lowering, ort, ort_artifact, arrays)
    try:
        tvm = get_backend("tvm", lowering.target, **tvm_options)
    except BackendError as exc:
        report.warnings.append(f"TVM not considered: {exc}")
        return ort, ort_artifact
    say("lowering to tvm")
    tvm_artifact = lower(lowering, tvm)
    if tvm_artifact.tuning is not None:
        report.tvm_tuning = {
            **tvm_artifact.tuning.to_dict(),
            "summary": tvm_artifact.tuning.describe(),
        }
    tvm_error = lowering.errors.get("tvm")
    if tvm_error is not None and not tvm_error.ok:
        report.backend_choice = "onnxruntime: the TVM artifact disagrees with the model"
        return ort, ort_artifact
    if heavy := tvm_artifact.heavy_untuned:
        report.backend_choice = (
            f"onnxruntime: TVM is not tuned for this model ({len(heavy)} compute-heavy tasks "
            "untuned); pass trials=N or tune_minutes=M to tune and compare"
        )
        if tvm_artifact.tuning is not None:
            report.warnings += tvm_artifact.tuning.warnings
        return ort, ort_artifact
    if not measure or mobile and tvm.rpc is None:
        report.backend_choice = "onnxruntime: not measured, so TVM could not be compared"
        return ort, ort_artifact
    say("measuring onnxruntime against tvm")
    timings = time_interleaved(
        {
            "onnxruntime": lambda: ort_artifact.run(arrays),
            "tvm": lambda: tvm_artifact.run(arrays),
        },
        warmup=5,
        runs=30,
        max_time_s=20.0,
    )
    report.backend_latencies = timings
    winner = min(timings, key=lambda k: timings[k].median_ms)
    report.backend_choice = f"{winner} (faster in the same run)"
    if winner == "tvm":
        report.backend, report.backend_version = "tvm", tvm.version
        report.artifact_error = tvm_error or report.artifact_error
        report_tvm(report, tvm_artifact)
        return tvm, tvm_artifact
    return ort, ort_artifact


def _select_settings(
    lowering: Lowering, ort: OnnxRuntimeBackend, artifact: OrtArtifact, arrays: list
) -> tuple[OnnxRuntimeBackend, OrtArtifact]:
    """ONNX Runtime with the session settings that ran this model fastest."""
    report = lowering.report
    lowering.say("picking ONNX Runtime session settings by measurement")
    choice = ort.select_settings(artifact, arrays)
    report.ort_settings = {**choice.best, "label": choice.label}
    report.ort_settings_latencies = dict(choice.timings)
    ort = ort.with_settings(**choice.best)
    report.threads = ort.threads
    return ort, ort.load(artifact.proto)

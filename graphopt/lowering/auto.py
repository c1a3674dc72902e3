"""``backend="auto"``: the backend chosen by measurement.

The candidates, each an artifact of the same ONNX model (fp32: graphopt's export; int8: its
QDQ model): ONNX Runtime under each of its candidate session settings (threads, optimization
level, spinning or blocking workers, parallel execution: ``candidate_settings``), OpenVINO under
each of its performance hints and thread counts (where ``graphopt[openvino]`` is installed), and
TVM where TVM is tuned for the model (fp32 only; or ``trials`` / ``tune_minutes`` ask to tune
it). Every candidate is checked against the model first (the check samples and the second size
of every dynamic axis, under the artifact's contract): one that disagrees is out, and the
report says so. The rest are timed interleaved in one run (``time_interleaved``: the same load
drift hits them all), and the lowest median wins. ``report.backend_latencies`` holds every
candidate's median and p10-p90, ``report.backend_choice`` says why the winner won.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from graphopt._util import first_line
from graphopt.backends import Artifact, Backend, get_backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.measure import Latency, available_cores, time_interleaved
from graphopt.backends.onnxruntime import OnnxRuntimeBackend, OrtArtifact, settings_label
from graphopt.core.numerics import Comparison, Numerics
from graphopt.errors import BackendError, TargetError
from graphopt.frontends.onnx import from_numpy
from graphopt.lowering.check import artifact_numerics
from graphopt.lowering.context import Lowering, report_tvm
from graphopt.lowering.fp32 import lower
from graphopt.quant.onnx_passes import InsertQDQ

# the interleaved run: every candidate is called 1 + REWARM times per round (see
# time_interleaved), at least 5 rounds and at most ROUNDS, stopping after MAX_TIME_S
WARMUP, ROUNDS, REWARM, MAX_TIME_S = 3, 12, 2, 8.0
# where the fastest is within the default's noise, the two alone: up to RUNOFF_ROUNDS rounds
# (MAX_TIME_S), and the fastest must be RUNOFF_MARGIN faster by the medians to be chosen
RUNOFF_ROUNDS, RUNOFF_MARGIN = 40, 0.01


@dataclass
class Candidate:
    """One artifact ``auto`` may return: ``label`` names the backend and its settings."""

    label: str  # "onnxruntime threads=2 sequential all", "openvino latency threads=2", "tvm"
    backend: Backend
    artifact: Artifact
    error: Comparison | None = None  # against the model, once checked
    checked: bool = False


def choose_backend(
    lowering: Lowering,
    ort: OnnxRuntimeBackend,
    ort_artifact: OrtArtifact,
    tvm_options: dict[str, Any],
    measure: bool,
) -> tuple[Backend, Artifact]:
    """backend='auto' for fp32: ONNX Runtime's settings, OpenVINO's hints and a tuned TVM."""
    excluded: list[str] = []
    mobile = lowering.target.device == "mobile"
    tvm = _tvm_candidate(lowering, tvm_options, excluded)  # lowers to TVM to see if it is tuned
    start = time.perf_counter()  # the time auto adds to lowering: its candidates, timed
    candidates = local_candidates(lowering, ort, ort_artifact, measure and not mobile, excluded)
    if tvm is not None:
        candidates.append(tvm)
    if not measure or mobile and (tvm is None or tvm.backend.rpc is None):
        lowering.report.backend_choice = "onnxruntime: not measured, so nothing was compared"
        return ort, ort_artifact
    return pick(lowering, candidates, artifact_numerics(lowering.result), excluded, start)


def choose_int8_backend(
    lowering: Lowering, ort: OnnxRuntimeBackend, ort_artifact: OrtArtifact, measure: bool
) -> tuple[Backend, Artifact]:
    """backend='auto' for int8: the QDQ model in ONNX Runtime (its settings) and in OpenVINO
    (its hints), held to insert-qdq's contract. TVM has no integer kernels for it."""
    excluded, start = ["tvm: no integer kernels for the QDQ model"], time.perf_counter()
    if not measure or lowering.target.device == "mobile":
        lowering.report.backend_choice = "onnxruntime: not measured, so nothing was compared"
        return ort, ort_artifact
    candidates = local_candidates(lowering, ort, ort_artifact, True, excluded)
    runtime, artifact = pick(lowering, candidates, InsertQDQ.numerics, excluded, start)
    if runtime.name == "openvino":  # which layers reach OpenVINO's own int8 kernels
        record = lowering.report.records[-1]  # insert-qdq's
        record.decisions = [*record.decisions, artifact.int8_summary()]
        lowering.report.warnings += artifact.int8_warnings()
    return runtime, artifact


def pick(
    lowering: Lowering,
    candidates: list[Candidate],
    numerics: Numerics,
    excluded: list[str] | None = None,
    start: float | None = None,
) -> tuple[Backend, Artifact]:
    """Check every candidate against the model, time those that agree interleaved in one run,
    and return the fastest median's backend and artifact; the report gets every figure (and
    the seconds since ``start``, when the candidates began to compile). ``candidates[0]`` is
    the default (ONNX Runtime with the asked settings): where the fastest does not beat it
    beyond noise (:func:`_beyond_noise`), the two are timed again alone (:func:`_runoff`)."""
    report, excluded = lowering.report, list(excluded or [])
    start = time.perf_counter() if start is None else start
    agreeing = []
    for c in candidates:
        if reason := _disagreement(lowering, c, numerics):
            excluded.append(f"{c.label}: {reason}")
            report.warnings.append(f"backend auto: {c.label} is out: {reason}")
        else:
            agreeing.append(c)
    if not agreeing:  # the default ONNX Runtime artifact was checked by lower(): never here
        raise BackendError("backend auto: no candidate artifact agrees with the model.")
    lowering.say(f"measuring {len(agreeing)} backend candidates interleaved")
    arrays = [to_numpy(x) for x in lowering.inputs]
    timings = time_interleaved(
        {c.label: (lambda c=c: c.artifact.run(arrays)) for c in agreeing},
        warmup=WARMUP,
        runs=ROUNDS,
        max_time_s=MAX_TIME_S,
        rewarm=REWARM,
    )
    ranked = sorted(agreeing, key=lambda c: timings[c.label].median_ms)
    winner, default = ranked[0], candidates[0]
    report.backend_latencies = {c.label: timings[c.label] for c in ranked}
    _report_ort_settings(report, ranked, timings)
    report.backend_choice = _why(winner, ranked[1:], timings, excluded)
    if (
        default in agreeing
        and winner is not default
        and not _beyond_noise(timings[winner.label], timings[default.label])
    ):
        winner = _runoff(lowering, winner, default, arrays)
    report.backend, report.backend_version = winner.backend.name, winner.backend.version
    report.threads = winner.backend.threads
    if winner.error is not None:
        lowering.errors[winner.backend.name] = report.artifact_error = winner.error
    if winner.backend.name == "tvm":
        report_tvm(report, winner.artifact)
    report.notes.append(
        f"backend auto: {len(candidates)} candidates compiled and checked, {len(agreeing)} timed "
        f"({min(timings[c.label].runs for c in agreeing)} rounds) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return winner.backend, winner.artifact


def local_candidates(
    lowering: Lowering,
    ort: OnnxRuntimeBackend,
    ort_artifact: OrtArtifact,
    settings: bool,
    excluded: list[str],
) -> list[Candidate]:
    """ONNX Runtime under each candidate session setting (only ``ort``'s own without
    ``settings``) and OpenVINO under each hint, all loading ``ort_artifact``'s ONNX model."""
    current = ort.settings()
    error = lowering.errors.get(ort.name)  # lower() / lower_int8() checked it already
    own = Candidate(f"onnxruntime {settings_label(current)}", ort, ort_artifact, error)
    own.checked = error is not None
    if not settings:
        return [own]
    proto, out = ort_artifact.proto, {own.label: own}
    for overrides in ort.candidate_settings():
        backend = ort.with_settings(**overrides)
        label = f"onnxruntime {settings_label(backend.settings())}"
        if label not in out:
            out[label] = Candidate(label, backend, backend.load(proto))
    try:
        openvino = get_backend("openvino", lowering.target)
    except (BackendError, TargetError) as exc:  # not installed, or no device for the target
        excluded.append(f"openvino: {first_line(exc)}")
        return list(out.values())
    for overrides in _openvino_settings():
        backend = openvino.with_settings(**overrides)
        label = f"openvino {backend.hint} threads={backend.threads}"
        try:
            artifact = backend.load(proto)
        except BackendError as exc:
            excluded.append(f"{label}: {first_line(exc)}")
            continue
        artifact.static_shape_reason = ort_artifact.static_shape_reason  # the same model
        out[label] = Candidate(label, backend, artifact)
    return list(out.values())


def _openvino_settings() -> list[dict[str, Any]]:
    """OpenVINO's candidates: the LATENCY and THROUGHPUT hints on every core, and LATENCY on
    one thread (as ONNX Runtime's candidates: where other work wants the cores)."""
    cores = available_cores()
    settings = [{"hint": "latency", "threads": cores}, {"hint": "throughput", "threads": cores}]
    if cores > 1:
        settings.append({"hint": "latency", "threads": 1})
    return settings


def _tvm_candidate(
    lowering: Lowering, tvm_options: dict[str, Any], excluded: list[str]
) -> Candidate | None:
    """TVM's artifact where TVM is tuned for the model and agrees with it; else None, with
    the reason in ``excluded``."""
    report = lowering.report
    try:
        tvm = get_backend("tvm", lowering.target, **tvm_options)
    except BackendError as exc:
        excluded.append(f"tvm: {first_line(exc)}")
        return None
    lowering.say("lowering to tvm")
    artifact = lower(lowering, tvm)
    if artifact.tuning is not None:
        report.tvm_tuning = {**artifact.tuning.to_dict(), "summary": artifact.tuning.describe()}
    error = lowering.errors.get("tvm")
    if error is not None and not error.ok:
        excluded.append("tvm: its artifact disagrees with the model")
        return None
    if heavy := artifact.heavy_untuned:
        excluded.append(
            f"tvm: not tuned for this model ({len(heavy)} compute-heavy tasks untuned); pass "
            "trials=N or tune_minutes=M to tune and compare"
        )
        if artifact.tuning is not None:
            report.warnings += artifact.tuning.warnings
        return None
    return Candidate("tvm", tvm, artifact, error, checked=True)


def _disagreement(lowering: Lowering, c: Candidate, numerics: Numerics) -> str | None:
    """Why ``c``'s artifact is not the model's function (None: it agrees, or nothing to check
    against): its outputs on the check samples and at the second size of each dynamic axis."""
    if c.checked or lowering.reference is None:
        return None
    c.checked = True
    try:
        got = lowering.run(c.artifact)
    except Exception as exc:  # noqa: BLE001 - a runtime's own error types: it cannot run it
        return f"fails on the check samples: {first_line(exc)}"
    c.error = lowering.check.compare(got, numerics)
    if not c.error.ok:
        return f"differs from the model: {c.error.describe()}"
    if c.artifact.static_shape_reason:
        return None
    for other in lowering.other_sizes:
        try:
            outs = c.artifact.run([to_numpy(x) for x in other.inputs])
        except Exception as exc:  # noqa: BLE001
            return f"fails with {other.dim!r} at another size: {first_line(exc)}"
        error = other.rounding.compare(other.reference, [from_numpy(o) for o in outs], numerics)
        if not error.ok:
            return f"differs from the model with {other.dim!r} at another size: {error.describe()}"
    return None


def _report_ort_settings(report: Any, ranked: list[Candidate], timings: dict[str, Latency]) -> None:
    """ONNX Runtime's settings in the report: each one timed, and the fastest of them."""
    prefix = "onnxruntime "
    ort = [c for c in ranked if c.label.startswith(prefix)]
    report.ort_settings_latencies = {c.label[len(prefix) :]: timings[c.label] for c in ort}
    if ort:
        best = ort[0].backend.settings()
        best.pop("providers", None)
        report.ort_settings = {**best, "label": ort[0].label[len(prefix) :]}


def _runoff(
    lowering: Lowering, fastest: Candidate, default: Candidate, arrays: list[Any]
) -> Candidate:
    """The fastest candidate and the default, timed again alone together, with up to
    :data:`RUNOFF_ROUNDS` rounds (stopping once both medians are known within 2%): the
    fastest wins only with the lower median by more than :data:`RUNOFF_MARGIN`, else the
    default stays. The report says what the runoff measured."""
    lowering.say(f"measuring {fastest.label} against the default again")
    timings = time_interleaved(
        {c.label: (lambda c=c: c.artifact.run(arrays)) for c in (default, fastest)},
        warmup=WARMUP,
        runs=RUNOFF_ROUNDS,
        max_time_s=MAX_TIME_S,
        rewarm=REWARM,
        precision=0.02,
    )
    fast, base = timings[fastest.label], timings[default.label]
    won = fast.median_ms < base.median_ms * (1 - RUNOFF_MARGIN)
    report = lowering.report
    report.backend_choice = (
        f"{(fastest if won else default).label}: in the first run {report.backend_choice}; "
        f"timed again against the default over {fast.runs} rounds: {fastest.label} "
        f"{fast.median_ms:.3f} ms [{fast.p10_ms:.3f}-{fast.p90_ms:.3f}], {default.label} "
        f"{base.median_ms:.3f} ms [{base.p10_ms:.3f}-{base.p90_ms:.3f}]"
        + ("" if won else f": not {RUNOFF_MARGIN:.0%} faster, the default is kept")
    )
    return fastest if won else default


def _beyond_noise(fast: Latency, default: Latency) -> bool:
    """Whether ``fast`` beats ``default`` by more than ``default``'s own spread: its median
    below the default's 10th percentile. A few rounds on a noisy machine rank candidates whose
    speed is the same at random; only a gain beyond that leaves the default settings."""
    return fast.median_ms < default.p10_ms


def _why(
    winner: Candidate,
    others: list[Candidate],
    timings: dict[str, Latency],
    excluded: list[str],
) -> str:
    """Why ``winner`` won, in one line: its median against the runner-up's, in the same run,
    and whether their p10-p90 ranges overlap; what was not a candidate, and why."""
    won = timings[winner.label]
    text = f"{winner.label}: the lowest median in the same run ({won.median_ms:.3f} ms"
    if others:
        second = timings[others[0].label]
        ratio = second.median_ms / won.median_ms if won.median_ms > 0 else float("inf")
        overlap = second.p10_ms <= won.p90_ms
        text += f", {ratio:.2f}x the next, {others[0].label} at {second.median_ms:.3f} ms" + (
            "; their p10-p90 ranges overlap: within the machine's noise" if overlap else ""
        )
    text += f"; {len(others) + 1} candidates agreed with the model)"
    if excluded:
        text += "; not candidates: " + "; ".join(excluded)
    return text

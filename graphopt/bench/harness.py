"""The benchmark of zoo models: build every runner, check its output against eager's, time them
interleaved (again while other processes were busy, given ``wait_idle_s``), and report medians
and the ratios between runners."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphopt import zoo
from graphopt.backends.measure import Latency, time_interleaved
from graphopt.bench.machine import BUSY, CpuProbe, wait_idle
from graphopt.bench.runners import (
    EAGER,
    GRAPHOPT,
    ORT,
    RUNNERS,
    Build,
    build_all,
    inductor_freezing,
)
from graphopt.core.progress import Progress

#: untimed calls of a runner before each of its timed calls (see the package doc)
REWARM = 2


def run_benchmark(
    names: Sequence[str],
    *,
    runs: int,
    warmup: int,
    compile: bool = True,
    openvino: bool = True,
    max_time_s: float = 60.0,
    rewarm: int = REWARM,
    wait_idle_s: float = 0.0,
    progress: bool = True,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark zoo models ``names``; one dict per model (see :func:`bench_model`).

    ``on_result`` is called with the results so far after each model (to save partial runs).
    """
    results: list[dict[str, Any]] = []
    say = Progress(progress, prefix="bench ")
    for name in names:
        results.append(
            bench_model(
                name,
                runs=runs,
                warmup=warmup,
                compile=compile,
                openvino=openvino,
                max_time_s=max_time_s,
                rewarm=rewarm,
                wait_idle_s=wait_idle_s,
                say=say,
            )
        )
        if on_result is not None:
            on_result(list(results))
    return results


def bench_model(
    name: str,
    *,
    runs: int,
    warmup: int,
    compile: bool = True,
    openvino: bool = True,
    max_time_s: float = 60.0,
    rewarm: int = REWARM,
    wait_idle_s: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build every runner for zoo model ``name``, check its output, time them interleaved.

    Returns ``{"model", "description", "batch", "input_shapes", "threads", "runners":
    {runner: {median_ms, p10_ms, p90_ms, runs, rel_error, speedup_vs_eager}}, "ratios",
    "compile_s", "graphopt_artifact_error", "skipped": {runner: reason},
    "other_cpu_while_timing", "timing_attempts", "wall_s"}``. ``wait_idle_s``: wait up to that
    long for other processes to go quiet before timing, and time again if they were busy.
    """
    say = say or Progress(False)
    start = time.perf_counter()
    say(f"{name}: building the model")
    entry = zoo.get(name)
    b = Build(name, entry.model, tuple(entry.example_inputs), say, compile, openvino)
    with inductor_freezing(compile):  # the flag stays on while this model is timed
        build_all(b)
        timings, other_cpu, attempts = time_runners(
            b,
            runs=runs,
            warmup=warmup,
            max_time_s=max_time_s,
            rewarm=rewarm,
            wait_idle_s=wait_idle_s,
        )
    result = summarize(b, entry.description, timings)
    result.update(
        # cores' worth of CPU time that other processes used while this model was timed:
        # well above 0, they competed with the runners and absolute latencies are noisy
        other_cpu_while_timing=other_cpu,
        timing_attempts=attempts,
        wall_s=time.perf_counter() - start,
    )
    summary = ", ".join(f"{k} {v['median_ms']:.3g} ms" for k, v in result["runners"].items())
    say(f"{name}: done in {result['wall_s']:.0f} s: {summary}")
    return result


def time_runners(
    b: Build, *, runs: int, warmup: int, max_time_s: float, rewarm: int, wait_idle_s: float
) -> tuple[dict[str, Latency], float | None, int]:
    """Time ``b``'s runners interleaved (:func:`time_interleaved`), after waiting up to
    ``wait_idle_s`` for a quiet machine, and again while other processes used more than ``BUSY``
    cores and that time is not up.

    Returns (latencies, other processes' CPU use in cores during the last timing, attempts).
    """
    deadline = time.perf_counter() + wait_idle_s
    attempts = 0
    while True:
        attempts += 1
        waited = wait_idle(deadline, b.say, b.name)
        b.say_for(
            f"timing {', '.join(b.runners)} interleaved "
            f"(warmup {warmup}, up to {runs} runs or {max_time_s:g} s, "
            f"{rewarm} untimed calls before each)"
            + (f" after waiting {waited:.0f} s for an idle machine" if waited > 0 else "")
        )
        probe = CpuProbe()
        timings = time_interleaved(
            b.runners, warmup=warmup, runs=runs, max_time_s=max_time_s, rewarm=rewarm
        )
        other_cpu = probe.others()
        if other_cpu is None or other_cpu <= BUSY or time.perf_counter() >= deadline:
            return timings, other_cpu, attempts
        b.say_for(f"other processes used {other_cpu:.1f} cores while timing; timing again")


def summarize(b: Build, description: str, timings: dict[str, Latency]) -> dict[str, Any]:
    """A model's result from its build and timings (without the timing's bookkeeping)."""
    per_runner = _per_runner(b.outputs, timings)
    inputs = b.inputs
    return {
        "model": b.name,
        "description": description,
        "batch": int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1,
        "input_shapes": [list(x.shape) for x in inputs],
        "threads": b.threads,
        "runners": per_runner,
        "ratios": _ratios(per_runner),
        "compile_s": b.compile_s,
        "graphopt_artifact_error": b.artifact_error,
        "skipped": b.skipped,
        "onnx_ops": b.onnx_ops,
        # False: graphopt's ONNX graph has the operators of the plain export (the exporter and
        # ONNX Runtime already did what the pipeline does), so "graphopt vs ORT" is noise
        "graphopt_changed_graph": (
            b.onnx_ops[GRAPHOPT] != b.onnx_ops[ORT]
            if ORT in b.onnx_ops and GRAPHOPT in b.onnx_ops
            else None
        ),
    }


def _per_runner(
    outputs: dict[str, list[np.ndarray]], timings: dict[str, Latency]
) -> dict[str, dict[str, Any]]:
    eager_ms = timings[EAGER].median_ms
    return {
        key: {
            "median_ms": lat.median_ms,
            "p10_ms": lat.p10_ms,
            "p90_ms": lat.p90_ms,
            "runs": lat.runs,
            "rel_error": rel_error(outputs[EAGER], outputs[key]),
            "speedup_vs_eager": eager_ms / lat.median_ms,
        }
        for key, lat in timings.items()
    }


def _ratios(per_runner: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each runner's speedup over eager, and graphopt's over ONNX Runtime (None: not run)."""
    ratios: dict[str, float | None] = {
        f"{key} vs eager": per_runner[key]["speedup_vs_eager"] if key in per_runner else None
        for key in RUNNERS
        if key != EAGER
    }
    ratios["graphopt vs onnxruntime"] = (
        per_runner[ORT]["median_ms"] / per_runner[GRAPHOPT]["median_ms"]
        if ORT in per_runner and GRAPHOPT in per_runner
        else None
    )
    return ratios


def rel_error(reference: list[np.ndarray], got: Sequence[Any]) -> float:
    """Worst over outputs of max |got - ref| / max |ref| (inf when the outputs do not match)."""
    if len(reference) != len(got):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, got, strict=True):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return float("inf")
        if ref.size == 0:
            continue
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(out - ref)))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst

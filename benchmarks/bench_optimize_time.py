"""How long ``optimize()`` takes end to end on ResNet-50 (issue 19, item 4): fp32 with the
default pipeline (latency measurement on and off) and int8 (8 calibration batches of 8 images),
median of 3 runs, each in a fresh process, with where the time goes.

    python benchmarks/bench_optimize_time.py [--runs 3] [--configs fp32 fp32-no-measure int8]
        -> benchmarks/results/optimize_time.md

A run is the ``graphopt.optimize(...)`` call alone, timed in a new Python process after the
imports and the model's construction (what a user waits for once graphopt is imported). The
phase breakdown comes from the report's pass times and from timers around graphopt's own
functions (each wraps and calls the real one): capture, the FX passes with their checks, the
ONNX exports, the int8 stage's passes, ONNX Runtime session builds, the latency measurement;
``other`` is the rest (reference outputs, the artifact's checks at two input sizes, report).

Calibration data: smooth random images (standard-normal noise at 14x14 upsampled bilinearly to
224x224 plus a little pixel noise, per channel), a structure closer to photographs than white
noise; the zoo's ResNet-50 has random weights, so no real image distribution applies.

The machine may be shared: each run records the 1-minute load average before and after; compare
figures only with their load beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("fp32", "fp32-no-measure", "int8")
MODEL = "resnet50"


def calibration(batches: int = 8, size: int = 8, seed: int = 0) -> list[tuple[Any, ...]]:
    """``batches`` batches of ``size`` smooth random 3x224x224 images."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        coarse = torch.randn(size, 3, 14, 14, generator=gen)
        x = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear")
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        out.append((x / x.std(),))
    return out


class Timers:
    """Wall time and calls of wrapped functions, by phase name (nested phases overlap)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        real = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        setattr(owner, attr, timed)


def install(timers: Timers) -> None:
    """Timers around graphopt's phases, at the names the callers look up."""
    import onnxruntime

    import graphopt.api
    import graphopt.backends.exported
    import graphopt.lowering.check
    import graphopt.lowering.dynamic
    import graphopt.lowering.int8
    from graphopt.lowering.baseline import Baseline
    from graphopt.pipeline.manager import PassManager

    timers.wrap(graphopt.api, "capture", "capture")
    timers.wrap(PassManager, "run", "pass managers (passes + their checks)")
    timers.wrap(Baseline, "reference_outputs", "reference outputs")
    timers.wrap(Baseline, "rounding", "float64 rounding reference")
    timers.wrap(graphopt.lowering.dynamic, "check", "artifact at a second size")
    for module in (graphopt.backends.exported, graphopt.lowering.int8, graphopt.lowering.check):
        timers.wrap(module, "export_onnx", "ONNX export")
    timers.wrap(graphopt.lowering.int8, "quantize_int8", "int8 stage")
    timers.wrap(Baseline, "measure", "latency measurement")
    timers.wrap(onnxruntime.InferenceSession, "__init__", "ORT session builds")


def child(config: str) -> dict[str, Any]:
    """One timed ``optimize`` call of ``config`` (in this process)."""
    import torch

    import graphopt
    from graphopt import zoo

    z = zoo.get(MODEL)
    kwargs: dict[str, Any] = {"measure": config != "fp32-no-measure"}
    if config == "int8":
        kwargs.update(precision="int8", calibration_data=calibration())
    timers = Timers()
    install(timers)
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    start = time.perf_counter()
    result = graphopt.optimize(z.model, "cpu", example_inputs=z.example_inputs, **kwargs)
    total = time.perf_counter() - start
    records = result.report.records
    phases = dict(timers.seconds)
    managers = phases.pop("pass managers (passes + their checks)", 0.0)
    phases["FX passes + their checks"] = managers - _stage_managers(phases, records)
    phases["  FX passes alone"] = sum(r.time_s for r in records if r.name not in _INT8_PASSES)
    for r in records:
        if r.name in _INT8_PASSES:
            phases[f"  {r.name}"] = r.time_s
    top = ("capture", "FX passes + their checks", "ONNX export", "int8 stage")
    top += ("latency measurement", "reference outputs", "float64 rounding reference")
    top += ("artifact at a second size",)
    phases["other"] = total - sum(phases.get(p, 0.0) for p in top)
    out = {
        "config": config,
        "total_s": total,
        "phases_s": phases,
        "calls": dict(timers.calls),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "torch_threads": threads,
        "notes": [n for n in result.report.notes if "torch ran" in n],
    }
    if config == "int8":
        out["int8"] = result.quantization.summary()
    return out


_INT8_PASSES = ("smooth-quant", "correct-bias", "fallback-to-float", "insert-qdq")


def _stage_managers(phases: dict[str, float], records: list[Any]) -> float:
    """The int8 stage's own pass manager time (inside "int8 stage"): its passes and checks,
    bounded by the stage."""
    stage = phases.get("int8 stage", 0.0)
    return stage if any(r.name in _INT8_PASSES for r in records) else 0.0


def run_config(config: str) -> dict[str, Any]:
    """``child(config)`` in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", config],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown: per config, the runs and their median, then the phases' medians."""
    rows = ["| config | runs (s) | median (s) | load avg (before-after) |", "|---|---|---:|---|"]
    for config, runs in results.items():
        times = ", ".join(f"{r['total_s']:.1f}" for r in runs)
        loads = ", ".join(f"{r['load_before']:.1f}-{r['load_after']:.1f}" for r in runs)
        median = statistics.median(r["total_s"] for r in runs)
        rows.append(f"| {config} | {times} | **{median:.1f}** | {loads} |")
    out = ["\n".join(rows), ""]
    for config, runs in results.items():
        names = sorted({p for r in runs for p in r["phases_s"]}, key=_order)
        out.append(f"{config}, median seconds per phase (nested phases indented or marked):\n")
        out.append("| phase | s |\n|---|---:|")
        for name in names:
            value = statistics.median(r["phases_s"].get(name, 0.0) for r in runs)
            out.append(f"| {name} | {value:.1f} |")
        if runs[0].get("int8"):
            out.append(f"\n{runs[0]['int8']}")
        notes = {n for r in runs for n in r["notes"]}
        out += [f"\nnote: {n}" for n in sorted(notes)]
        out.append("")
    return "\n".join(out)


def _order(name: str) -> tuple[int, str]:
    order = ["capture", "FX passes + their checks", "  FX passes alone", "ONNX export"]
    order += ["int8 stage", "  smooth-quant", "  correct-bias", "  fallback-to-float"]
    order += ["  insert-qdq", "reference outputs", "float64 rounding reference"]
    order += ["artifact at a second size", "latency measurement", "ORT session builds", "other"]
    return (order.index(name) if name in order else len(order), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "optimize_time.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from graphopt.bench import machine_info

    results: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    for i in range(args.runs):  # configs alternate, so that load changes hit each alike
        for config in args.configs:
            r = run_config(config)
            results[config].append(r)
            print(f"run {i + 1} {config}: {r['total_s']:.1f} s (load {r['load_before']:.1f})")
    info = machine_info()
    head = (
        f"optimize() wall time, {MODEL} (graphopt.zoo, random weights), batch-1 example input; "
        f"{info.get('cpu')}, {os.cpu_count()} cores, shared with other work (load averages "
        f"beside each run); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        "    python benchmarks/bench_optimize_time.py --runs 3\n\n"
        "fp32: default pipeline (measure=True times the artifact against ONNX Runtime on the "
        "plain export); int8: precision='int8', 8 calibration batches of 8 smooth random "
        "images, default options (auto calibration, bias correction, SmoothQuant).\n"
    )
    text = head + "\n" + table(results)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()

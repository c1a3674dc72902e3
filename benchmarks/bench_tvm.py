"""Tune a zoo model with TVM's MetaSchedule through graphopt, then time it against the alternatives.

    python benchmarks/bench_tvm.py                       resnet18, 20 minutes of tuning
    python benchmarks/bench_tvm.py resnet18 --minutes 2  a quick look

1. ``optimize(model, "cpu", backend="tvm", tune_minutes=M)`` on a fresh database: tuning time,
   the latency-vs-trials curve (MetaSchedule's estimate after every batch: the weighted sum of
   each task's best measured time).
2. The same call again on the same database: it must apply the records without tuning (the time
   it takes, as a fraction of the first) and give the same latency.
3. One interleaved timing run (``time_interleaved``, medians): torch eager, ONNX Runtime on the
   unrewritten export, graphopt -> ONNX Runtime, TVM untuned (default schedules), TVM tuned
   (first run's artifact) and TVM from the reused database. Ratios against ONNX Runtime.

Writes benchmarks/results/tvm_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from graphopt import optimize, zoo
from graphopt.backends.measure import time_interleaved
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18", choices=zoo.names())
    parser.add_argument("--minutes", type=float, default=20.0, help="tuning budget (minutes)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--database", help="database directory (default: a fresh temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the results")
    args = parser.parse_args(argv)

    entry = zoo.get(args.model)
    model, inputs = entry.model.eval(), tuple(entry.example_inputs)
    arrays = [x.numpy() for x in inputs]
    tmp = tempfile.TemporaryDirectory()
    database = args.database or str(Path(tmp.name) / "db")

    def tvm_run(**options):
        t0 = time.perf_counter()
        result = optimize(
            model, "cpu", inputs, backend="tvm", database=database, measure=False,
            progress=True, **options,
        )  # fmt: skip
        return result, time.perf_counter() - t0

    print("[1/4] TVM untuned (default schedules)", file=sys.stderr)
    untuned, untuned_s = tvm_run()
    print(f"[2/4] tuning for {args.minutes} min on a fresh database", file=sys.stderr)
    tuned, first_s = tvm_run(tune_minutes=args.minutes)
    print("[3/4] the same call again: the database must be reused", file=sys.stderr)
    again, second_s = tvm_run(tune_minutes=args.minutes)
    print("[4/4] timing everything in one interleaved run", file=sys.stderr)
    ort = OnnxRuntimeBackend("cpu")
    plain = ort.compile(copy.deepcopy(model), inputs)
    graphopt_ort = optimize(model, "cpu", inputs, measure=False)

    def eager():
        with torch.inference_mode():
            return model(*inputs)

    timings = time_interleaved(
        {
            "torch eager": eager,
            "onnxruntime (plain export)": lambda: plain.run(arrays),
            "graphopt -> onnxruntime": lambda: graphopt_ort.artifact.run(arrays),
            "tvm untuned": lambda: untuned.artifact.run(arrays),
            "graphopt -> tvm tuned": lambda: tuned.artifact.run(arrays),
            "graphopt -> tvm, database reused": lambda: again.artifact.run(arrays),
        },
        warmup=3,
        runs=args.runs,
        max_time_s=180.0,
    )
    ort_ms = timings["onnxruntime (plain export)"].median_ms
    tuning = tuned.report.tvm_tuning
    result = {
        "model": args.model,
        "minutes": args.minutes,
        "machine": machine_info(),
        "first_run_s": round(first_s, 1),
        "second_run_s": round(second_s, 1),
        "second_over_first": round(second_s / first_s, 4),
        "second_reused": again.report.tvm_tuning.get("reused", False),
        "untuned_compile_s": round(untuned_s, 1),
        "trials": tuning.get("trials_run"),
        "failed_trials": tuning.get("failed_trials"),
        "tuning_s": tuning.get("seconds"),
        "curve": tuning.get("curve"),
        "tasks": tuned.report.tvm_tasks,
        "untuned_tasks_after_tuning": tuned.report.untuned_tasks,
        "latency_ms": {k: v.median_ms for k, v in timings.items()},
        "p10_p90_ms": {k: (v.p10_ms, v.p90_ms) for k, v in timings.items()},
        "vs_onnxruntime": {k: round(v.median_ms / ort_ms, 3) for k, v in timings.items()},
        "artifact_error_tuned": str(tuned.report.artifact_error.describe()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tvm_{args.model}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"tvm_{args.model}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"### TVM on {r['model']}: {r['minutes']} min of MetaSchedule tuning, 2-core CPU, batch 1",
        "",
        "| runner | median ms | / ONNX Runtime |",
        "|---|---:|---:|",
    ]
    for k, ms in r["latency_ms"].items():
        lines.append(f"| {k} | {ms:.2f} | {r['vs_onnxruntime'][k]:.2f}x |")
    lines += [
        "",
        f"Tuning: {r['trials']} trials ({r['failed_trials']} failed) in {r['tuning_s']:.0f} s; "
        f"first optimize() {r['first_run_s']} s, second (database reused: "
        f"{r['second_reused']}) {r['second_run_s']} s = {100 * r['second_over_first']:.1f}% "
        "of the first.",
        f"Tasks left untuned after tuning: {', '.join(r['untuned_tasks_after_tuning']) or 'none'}.",
        "",
        "Latency against trials (MetaSchedule's estimate: weighted sum of each task's best):",
        "",
        "| trials | seconds | estimated ms |",
        "|---:|---:|---:|",
    ]
    curve = [p for p in r["curve"] if "est_ms" in p]
    step = max(1, len(curve) // 15)
    for p in curve[::step] + ([curve[-1]] if curve and len(curve) % step != 1 else []):
        lines.append(f"| {int(p['trials'])} | {p['seconds']:.0f} | {p['est_ms']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Depth compression (``merge-convs{budget=...}``) of the zoo's MobileNetV2 at 224x224 on ONNX
Runtime: the network graphopt plans against ONNX Runtime on the original network, in one process,
timed interleaved (medians, p10/p90), batch 1.

The issue's bar: at a budget of 0.7x the model's latency, a measured speed-up of at least 1.3x
over ONNX Runtime on the original network (Kim et al. report 1.41x on TensorRT). The zoo's
weights are random, so accuracy has no meaning here: the plan's importance is the output error
of random images, verification is off, and the accuracy side is shown on a trained network by
``examples/merge_convs_digits.py``.

Columns: torch eager; ONNX Runtime on the unrewritten export; graphopt's default cpu pipeline
(exact passes only); graphopt with ``merge-convs{budget=B}`` after it. The run also records the
time spent measuring the tables (first run, empty cache) and planning, and re-runs the pass to
check that a second run on the same target measures nothing.

    python benchmarks/bench_merge_convs.py [--budget 0.7] [--runs 50]
        -> benchmarks/results/merge_convs.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import available_cores, time_interleaved, write_json_atomic
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.bench import machine_info
from graphopt.target import Target

RESULTS = Path(__file__).resolve().parent / "results"
BAR = 1.3


def _depth(record_list: list) -> tuple[dict, object]:
    for rec in record_list:
        if rec.name == "merge-convs":
            return rec.stats, rec.decisions[0] if rec.decisions else None
    raise RuntimeError("merge-convs did not run")


def run(args: argparse.Namespace) -> dict:
    entry = zoo.get(args.model)
    model = entry.model.eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    calibration = [(torch.randn(2, 3, args.size, args.size, generator=gen),) for _ in range(2)]
    default = Target.parse("cpu").default_pipeline
    pipeline = f"{default},merge-convs{{budget={args.budget},progress=true,runs={args.unit_runs}}}"
    common = dict(verify=False, measure=False, calibration_data=calibration, progress=False)
    with tempfile.TemporaryDirectory() as cache:  # the first run measures every table
        os.environ["GRAPHOPT_CACHE_DIR"] = cache
        start = time.perf_counter()
        compressed = graphopt.optimize(model, "cpu", (x,), pipeline, **common)
        first_s = time.perf_counter() - start
        stats, plan = _depth(compressed.report.records)
        start = time.perf_counter()
        again = graphopt.optimize(model, "cpu", (x,), pipeline, **common)
        second_s = time.perf_counter() - start
        stats2, plan2 = _depth(again.report.records)
        exact = graphopt.optimize(model, "cpu", (x,), **common)
    backend = OnnxRuntimeBackend("cpu", threads=args.threads)
    original = backend.load(export_onnx(model, (x,)))
    arrays = [x.numpy()]
    calls = {
        "torch eager": lambda: model(x),
        "onnxruntime (original)": lambda: original.run(arrays),
        "graphopt default pipeline": lambda: exact.artifact.run(arrays),
        f"graphopt merge-convs budget={args.budget}": lambda: compressed.artifact.run(arrays),
    }
    with torch.no_grad():
        timed = time_interleaved(calls, warmup=5, runs=args.runs, max_time_s=args.max_time_s)
    base = timed["onnxruntime (original)"].median_ms
    rows = [
        {
            "runtime": name,
            "median_ms": lat.median_ms,
            "p10_ms": lat.p10_ms,
            "p90_ms": lat.p90_ms,
            "speedup_vs_ort": base / lat.median_ms,
        }
        for name, lat in timed.items()
    ]
    convs = sum(1 for n in compressed.graph_module.graph.nodes if n.op == "call_module")
    return {
        "model": args.model,
        "input": list(x.shape),
        "budget": args.budget,
        "bar": BAR,
        "threads": args.threads,
        "machine": machine_info(),
        "rows": rows,
        "speedup": rows[-1]["speedup_vs_ort"],
        "first_run_s": first_s,
        "second_run_s": second_s,
        "timed_units_first": stats.get("timed-units", 0),
        "timed_units_second": stats2.get("timed-units", 0),
        "same_plan_second_run": plan2.removed == plan.removed and plan2.spans == plan.spans,
        "planning_s": plan.planning_s,
        "importance_sets": plan.evaluated_sets,
        "activations_removed": len(plan.removed),
        "activations_kept": len(plan.kept),
        "merged_spans": stats.get("merged-spans", 0),
        "convs_removed": stats.get("convs-removed", 0),
        "modules_after": convs,
        "predicted_ms": plan.scale * plan.predicted_ms,
        "measured_in_pass_ms": [plan.measured_before_ms, plan.measured_after_ms],
        "plan": str(plan),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# merge-convs depth compression: {result['model']} {result['input']}, budget "
        f"{result['budget']}",
        "",
        f"ONNX Runtime {result['threads']} threads, batch 1, one process, interleaved; medians. "
        f"Bar: >= {result['bar']}x over ONNX Runtime on the original network.",
        "",
        "| runtime | median ms | p10-p90 ms | vs ORT original |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['runtime']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | "
            f"{r['speedup_vs_ort']:.2f}x |"
        )
    lines += [
        "",
        f"- activations removed {result['activations_removed']}, kept "
        f"{result['activations_kept']}; merged spans {result['merged_spans']} (convs removed "
        f"{result['convs_removed']})",
        f"- first run (tables measured, empty cache) {result['first_run_s']:.1f} s, "
        f"{result['timed_units_first']} units timed; second run {result['second_run_s']:.1f} s, "
        f"{result['timed_units_second']} timed; same plan: {result['same_plan_second_run']}",
        f"- planning (DP) {result['planning_s']:.2f} s; importance: "
        f"{result['importance_sets']} sets of removed activations evaluated",
        "",
        "```",
        result["plan"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--unit-runs", type=int, default=20)
    parser.add_argument("--max-time-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--json", type=Path, default=RESULTS / "merge_convs.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "merge_convs.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_json_atomic(args.json, result, indent=2)
    args.markdown.write_text(markdown(result))
    print(markdown(result))
    print(json.dumps({"speedup": result["speedup"], "bar": BAR}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

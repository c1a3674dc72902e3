"""graphopt on ONNX files: each zoo model exported with torch.onnx.export, then
``graphopt.optimize("model.onnx", "cpu")``; ONNX Runtime on the original file against
graphopt's artifact, timed in alternation in one process (the report's own measurement).

    python benchmarks/bench_onnx_input.py [MODELS...]   ->  benchmarks/results/onnx_input.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

import graphopt
from graphopt import zoo
from graphopt.backends.export import export_onnx

RESULTS = Path(__file__).resolve().parent / "results"


def run(names: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            entry = zoo.get(name)
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(export_onnx(copy.deepcopy(entry.model), entry.example_inputs), str(path))
            start = time.perf_counter()
            result = graphopt.optimize(str(path), "cpu", name=f"{name}.onnx")
            report = result.report
            rows.append(
                {
                    "model": name,
                    "optimize_s": round(time.perf_counter() - start, 2),
                    "ort_original_ms": report.latency_baseline.median_ms,
                    "graphopt_ms": report.latency_optimized.median_ms,
                    "speedup": report.speedup,
                    "artifact_error": report.artifact_error.measured,
                    "allowed": report.artifact_error.allowed,
                    "ok": report.artifact_error.ok,
                    "folded": sum(r.stats.get("folded", 0) for r in report.records),
                }
            )
            print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model (.onnx in) | ORT on the file, ms | graphopt, ms | ratio | BN folded | "
        "max error (allowed) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ort_original_ms']:.3g} | {r['graphopt_ms']:.3g} | "
            f"{r['speedup']:.2f}x | {r['folded']} | "
            f"{r['artifact_error']:.2g} ({r['allowed']:.2g}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=zoo.names())
    args = parser.parse_args()
    rows = run(args.models)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_input.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "onnx_input.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where ONNX Runtime spends an int8 model's time, per operator type: ``quantize_static``'s
model against graphopt's, from ONNX Runtime's own profiler (one session at a time, 2 threads).

    python benchmarks/profile_int8.py [--model resnet50] [--runs 50]
        -> benchmarks/results/int8_profile.md
    python benchmarks/profile_int8.py --model vit_s --fp32-only --markdown benchmarks/results/vit_s_profile.md

``--fp32-only`` profiles the plain fp32 export alone: where ONNX Runtime spends vit_s's time
(issue 19's 1.15x: what is left outside its matrix products).

It explains the ResNet-50 figures of bench_int8.py: both int8 models spend ~93% of the time in
the same QLinearConv kernels (MLAS's symmetric-weight indirect convolution), so no placement of
Q/DQ pairs can make one much faster than the other on this runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_int8  # noqa: E402

from graphopt.bench import machine_info  # noqa: E402
from graphopt.quant.qdq import quantize_onnx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile(model: onnx.ModelProto, feed: dict, runs: int, threads: int, tmp: Path) -> dict:
    """Mean kernel time per run by operator type (ms), and node counts."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "profile")
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    for _ in range(10):  # warm-up, profiled too: counted out below by run index
        session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_run: list[dict] = []
    for e in events:
        if e.get("cat") == "Session" and e["name"] == "model_run":
            per_run.append(defaultdict(float))
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and per_run:
            per_run[-1][e["args"]["op_name"]] += e["dur"] / 1000
    # a run's node events come before its model_run event: shift by one
    kept = per_run[-runs - 1 : -1] if len(per_run) > runs else per_run
    ops = sorted({op for run in kept for op in run})
    return {op: float(np.median([run.get(op, 0.0) for run in kept])) for op in ops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="resnet50", choices=("resnet18", "resnet50", "mobilenetv2", "vit_s")
    )
    parser.add_argument("--fp32-only", action="store_true", help="the plain fp32 export alone")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=str(RESULTS / "int8_profile.md"))
    args = parser.parse_args(argv)
    case = bench_int8.build_case(
        args.model, argparse.Namespace(calibration=8, held_out=8, seed=0, method="minmax")
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        models = {"ORT fp32": case.proto}
        if not args.fp32_only:
            models["ORT quantize_static"] = bench_int8._quantize_static(case, tmp)
            models["graphopt quantize_onnx"] = quantize_onnx(
                case.proto, [tuple(f.values()) for f in case.calibration]
            )[0]
        times = {
            k: profile(m, case.timing_feed, args.runs, args.threads, tmp) for k, m in models.items()
        }
    m = machine_info()
    lines = [
        f"ONNX Runtime {ort.__version__} profiler, {args.model}, batch 1, {args.threads} "
        f"threads, {m['cpu']}; median over {args.runs} runs of each operator type's kernel "
        f"time per run (the profiler's overhead included); {m['date']}.",
        "",
        "| variant | op type | ms per run | share |",
        "|---|---|---:|---:|",
    ]
    for label, ops in times.items():
        total = sum(ops.values())
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
            if ms / total >= 0.002:
                lines.append(f"| {label} | {op} | {ms:.3f} | {100 * ms / total:.1f}% |")
        lines.append(f"| {label} | **all kernels** | **{total:.2f}** | |")
    text = "\n".join(lines) + "\n"
    Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

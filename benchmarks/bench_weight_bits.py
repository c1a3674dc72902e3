"""8-bit against 7-bit int8 weights on this CPU (issue 19): graphopt's QDQ model of mobilenetv2
(zoo, random weights) and MiniLM (trained), with 8-bit and with 7-bit weights, each in ONNX
Runtime with graphopt's session setting (``session.x64quantprecision=1``: exact uint8 x uint8
kernels on x86 without VNNI), in ONNX Runtime's default (fast uint8 x int8 kernels, which add
pairs of products in saturating int16 there) and in OpenVINO; one process, timed interleaved
against ONNX Runtime fp32 (medians, p10-p90), with the output cosine against fp32 on held-out
inputs.

    python benchmarks/bench_weight_bits.py [--models mobilenetv2 minilm] [--runs 60]
        -> benchmarks/results/weight_bits.{md,json}

What it shows: where 8-bit weights are exact only on the slow kernels, 7-bit weights are exact
on the fast ones too (the "fast" and "exact" rows of 7 bits agree), which is why
``optimize(precision="int8")`` quantises weights to 7 bits on such a CPU
(``insert-qdq{weights=auto}``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import _pybind_state

from graphopt.backends.measure import Latency, time_interleaved, write_json_atomic
from graphopt.backends.onnxruntime import EXACT_INT8_CONFIG
from graphopt.bench import CpuProbe, machine_info
from graphopt.quant.qdq import quantize_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import Case, _openvino_runner, _session_options, build_case, cosines  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Feed = dict[str, np.ndarray]


def build(name: str, args: argparse.Namespace) -> tuple[Case, dict[int, onnx.ModelProto]]:
    """bench_int8's case of ``name`` (export, calibration, held-out feeds) and its QDQ models
    by weight bits (quantised before any session of the timing's global thread pool exists:
    the quantiser's sessions have their own)."""
    case = build_case(name, args)
    calibration = [tuple(feed.values()) for feed in case.calibration]
    qmodels = {
        bits: quantize_onnx(case.proto, calibration, method="minmax", weight_bits=bits)[0]
        for bits in (8, 7)
    }
    return case, qmodels


def ort_runner(
    model: onnx.ModelProto, exact: bool, args: argparse.Namespace
) -> Callable[[Feed], np.ndarray]:
    """bench_int8's ONNX Runtime session (one global pool), with graphopt's exact int8
    setting or without it."""
    opts = _session_options(args)
    if exact:
        opts.add_session_config_entry(*EXACT_INT8_CONFIG)
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda feed: s.run(None, feed)[0]


def bench(built: tuple[Case, dict[int, onnx.ModelProto]], args: argparse.Namespace) -> dict:
    case, qmodels = built
    names = [i.name for i in case.proto.graph.input]
    runners = {"ORT fp32": ort_runner(case.proto, False, args)}
    for bits, qmodel in qmodels.items():
        runners[f"{bits}-bit, ORT exact (graphopt's setting)"] = ort_runner(qmodel, True, args)
        runners[f"{bits}-bit, ORT fast (its default)"] = ort_runner(qmodel, False, args)
        openvino = _openvino_runner(qmodel, names, args)
        runners[f"{bits}-bit, OpenVINO"] = lambda feed, run=openvino: run(feed)[0]
    reference = [runners["ORT fp32"](feed) for feed in case.held_out]
    cosine = {  # the mean over held-out samples (rows of the outputs)
        label: float(cosines([run(feed) for feed in case.held_out], reference).mean())
        for label, run in runners.items()
    }
    probe = CpuProbe()
    timings = time_interleaved(
        {k: (lambda r=r: r(case.timing_feed)) for k, r in runners.items()},
        warmup=5, runs=args.runs, max_time_s=args.max_time_s,
    )  # fmt: skip
    return {
        "timings": {k: vars(v) for k, v in timings.items()},
        "cosine": cosine,
        "other_cpu_while_timing": probe.others(),
        "notes": case.notes,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# 8-bit against 7-bit int8 weights",
        "",
        f"`python benchmarks/bench_weight_bits.py {' '.join(results['argv'])}` ({m['date']}; "
        f"{m['cpu']}, {m['cores']} cores, isa {' '.join(m.get('isa', []))}; onnxruntime "
        f"{m['onnxruntime']}, openvino {m.get('openvino')}). graphopt's QDQ model (minmax "
        "calibration), batch 1, every row of a model timed interleaved in one process; cosine "
        "of the outputs against fp32 on held-out inputs (mean).",
        "",
    ]
    for name, info in results["models"].items():
        t = {k: Latency(**v) for k, v in info["timings"].items()}
        base = t["ORT fp32"].median_ms
        lines += [
            f"## {name}",
            "",
            f"Other processes used {info['other_cpu_while_timing']} cores while timing.",
            "",
            "| variant | median ms [p10-p90] | vs ORT fp32 | cosine |",
            "|---|---|---|---|",
        ]
        for label, lat in t.items():
            lines.append(
                f"| {label} | {lat.median_ms:.2f} [{lat.p10_ms:.2f}-{lat.p90_ms:.2f}] | "
                f"{base / lat.median_ms:.2f}x | {info['cosine'][label]:.5f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2", "minilm"])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--max-time-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    # bench_int8's cases: its calibration and held-out data, its global ONNX Runtime pool
    args.calibration, args.held_out, args.seed, args.thread_pool = 8, 16, 0, "global"
    built = {name: build(name, args) for name in args.models}
    _pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    results: dict[str, Any] = {"machine": machine_info(), "models": {}}
    results["argv"] = argv if argv is not None else sys.argv[1:]
    for name in args.models:
        results["models"][name] = bench(built[name], args)
        write_json_atomic(RESULTS / "weight_bits.json", results, indent=1)
        (RESULTS / "weight_bits.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

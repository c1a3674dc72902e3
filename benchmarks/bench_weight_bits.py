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
import torch
from onnxruntime.capi import _pybind_state

from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import Latency, time_interleaved, write_json_atomic
from graphopt.backends.onnxruntime import EXACT_INT8_CONFIG
from graphopt.bench import CpuProbe, machine_info
from graphopt.quant.qdq import quantize_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import CALIBRATION_SENTENCES, HELD_OUT_SENTENCES, load_minilm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Batch = tuple[np.ndarray, ...]


def case(name: str) -> tuple[onnx.ModelProto, list[Batch], list[Batch]]:
    """The fp32 export, calibration batches and held-out inputs of ``name``."""
    if name == "minilm":
        model, tokenizer = load_minilm()

        def feeds(sentences: list[str]) -> list[Batch]:
            t = tokenizer(
                sentences, padding="max_length", max_length=64, truncation=True,
                return_tensors="np",
            )  # fmt: skip
            ids, mask = t["input_ids"].astype(np.int64), t["attention_mask"].astype(np.int64)
            return [(ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))]

        calibration, held_out = feeds(CALIBRATION_SENTENCES), feeds(HELD_OUT_SENTENCES)
        proto = export_onnx(model, tuple(torch.from_numpy(a) for a in calibration[0]))
        return proto, calibration, held_out
    entry = zoo.get(name)
    gen = torch.Generator().manual_seed(0)
    shape = entry.example_inputs[0].shape[1:]
    calibration = [(torch.randn(1, *shape, generator=gen).numpy(),) for _ in range(8)]
    held_out = [(torch.randn(1, *shape, generator=gen).numpy(),) for _ in range(16)]
    return export_onnx(entry.model.eval(), entry.example_inputs), calibration, held_out


def ort_runner(model: onnx.ModelProto, exact: bool) -> Callable[[Batch], np.ndarray]:
    opts = ort.SessionOptions()
    opts.use_per_session_threads = False  # one global pool (see bench_int8's docstring)
    opts.log_severity_level = 3
    if exact:
        opts.add_session_config_entry(*EXACT_INT8_CONFIG)
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return lambda batch: s.run(None, dict(zip(names, batch, strict=True)))[0]


def openvino_runner(model: onnx.ModelProto, threads: int) -> Callable[[Batch], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model.SerializeToString(), b""),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    return lambda batch: np.asarray(request.infer(list(batch))[compiled.outputs[0]])


def build(name: str) -> tuple[onnx.ModelProto, dict[int, onnx.ModelProto], list[Batch]]:
    """The fp32 export, its QDQ models by weight bits, and the held-out inputs (quantised
    before any session of the timing's global thread pool exists: the quantiser's sessions
    have their own)."""
    proto, calibration, held_out = case(name)
    qmodels = {
        bits: quantize_onnx(proto, calibration, method="minmax", weight_bits=bits)[0]
        for bits in (8, 7)
    }
    return proto, qmodels, held_out


def bench(built: tuple, args: argparse.Namespace) -> dict[str, Any]:
    proto, qmodels, held_out = built
    runners = {"ORT fp32": ort_runner(proto, exact=False)}
    for bits, qmodel in qmodels.items():
        runners[f"{bits}-bit, ORT exact (graphopt's setting)"] = ort_runner(qmodel, exact=True)
        runners[f"{bits}-bit, ORT fast (its default)"] = ort_runner(qmodel, exact=False)
        runners[f"{bits}-bit, OpenVINO"] = openvino_runner(qmodel, args.threads)
    reference = [runners["ORT fp32"](b).ravel().astype(np.float64) for b in held_out]
    cosine = {}
    for label, run in runners.items():
        outs = [run(b).ravel().astype(np.float64) for b in held_out]
        cosine[label] = float(
            np.mean(
                [
                    a @ r / (np.linalg.norm(a) * np.linalg.norm(r))
                    for a, r in zip(outs, reference, strict=True)
                ]
            )
        )
    x = held_out[0]
    probe = CpuProbe()
    timings = time_interleaved(
        {k: (lambda r=r: r(x)) for k, r in runners.items()},
        warmup=5, runs=args.runs, max_time_s=args.max_time_s,
    )  # fmt: skip
    return {
        "timings": {k: vars(v) for k, v in timings.items()},
        "cosine": cosine,
        "other_cpu_while_timing": probe.others(),
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
    built = {name: build(name) for name in args.models}
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

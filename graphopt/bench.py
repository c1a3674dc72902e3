"""``graphopt bench``: graphopt against the tools a user would reach for, on the zoo models.

Per model, in one process, five runners each do one batch-1 inference on the model's example
inputs:

``torch eager``
    ``model(*inputs)`` under ``torch.inference_mode()``.
``torch.compile``
    ``torch.compile(model)`` with inductor freezing (``torch._inductor.config.freezing``), the
    best setting a user would find for inference; compiled by a first call, which is timed.
``onnxruntime``
    ``torch.onnx.export`` of the user's model, unrewritten, in an ONNX Runtime session with its
    own full graph optimizations (what graphopt's ``report.latency_baseline`` measures too).
``openvino``
    that same ONNX export compiled by OpenVINO for ``CPU`` in f32 (``INFERENCE_PRECISION_HINT``;
    CPUs with bf16 support would otherwise run in bf16, which is neither comparable nor faster
    at batch 1) with the latency hint. Needs ``pip install graphopt[bench]``.
``graphopt``
    ``graphopt.optimize(model, "cpu", inputs)`` with the target's default pipeline, run through
    its ONNX Runtime artifact.

All runners of a model are timed in alternation, so a change in machine load hits them alike
and the ratios stay meaningful on a busy machine; but each timed call follows ``rewarm``
(default 2) untimed calls of the same runner. Back to back (:func:`graphopt.backends.measure.time_interleaved`) the
runtimes disturb each other: each keeps its worker threads spinning for a while after a call,
taking the cores from the next runner, and threads that went to sleep must be woken. Medians on
2 idle cores here, each runner timed alone -> back to back -> after 2 untimed calls: resnet18
ORT 17.6 -> 24.3 -> 17.8 ms, OpenVINO 16.8 -> 31.0 -> 17.5 ms, torch.compile 17.9 -> 17.9 ->
18.6 ms; digits_cnn eager 0.093 -> 0.197 -> 0.100 ms. (A 50 ms pause before each call instead
was worse: waking the idle threads took digits_cnn eager to 12.5 ms.)

Each runner's output is compared with eager's (max abs difference over max abs eager output),
so a runner that is fast but wrong shows. A runner that cannot be built (no C compiler for
inductor, OpenVINO not installed, an export failure) is recorded with its reason and left out;
it never stops the benchmark. The CPU time other processes used while a model was timed is
recorded (``other_cpu_while_timing``, in cores) and the table notes when it was high;
``wait_idle_s`` waits for a quiet machine instead.

    graphopt bench                       all zoo models
    graphopt bench resnet18 --runs 20 --json r.json --markdown r.md
    python benchmarks/bench_zoo.py       the same, writing benchmarks/results/zoo.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt._util import first_line
from graphopt.backends.measure import time_interleaved
from graphopt.report import Progress

EAGER = "torch eager"
COMPILE = "torch.compile"
ORT = "onnxruntime"
OPENVINO = "openvino"
GRAPHOPT = "graphopt"
RUNNERS = (EAGER, COMPILE, ORT, OPENVINO, GRAPHOPT)

#: column titles of the Markdown table
TITLES = {
    EAGER: "torch eager",
    COMPILE: "torch.compile",
    ORT: "ORT (plain export)",
    OPENVINO: "OpenVINO",
    GRAPHOPT: "graphopt",
}

#: a runner whose output differs from eager's by more than this (relative) is flagged
MISMATCH = 1e-3

#: untimed calls of a runner before each of its timed calls (see the module doc)
REWARM = 2

#: other processes using more than this many cores while a model is timed: noted as noisy
BUSY = 0.25

OPENVINO_MISSING = "not installed: pip install graphopt[bench]"


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``graphopt bench`` and ``benchmarks/bench_zoo.py``."""
    parser.add_argument(
        "models",
        nargs="*",
        default=[],
        help="zoo models to benchmark (default: all, see `graphopt zoo`)",
    )
    parser.add_argument("--runs", type=int, default=30, help="timed calls per runner (default 30)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed calls per runner before timing (default 5)"
    )
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="write results and machine info as JSON"
    )
    parser.add_argument(
        "--markdown", default=None, metavar="PATH", help="write the results table as Markdown"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO")
    parser.add_argument(
        "--max-time-s",
        type=float,
        default=60.0,
        help="timing budget per model in seconds (default 60; at least 5 rounds are always timed)",
    )
    parser.add_argument(
        "--rewarm",
        type=int,
        default=REWARM,
        metavar="N",
        help="untimed calls of a runner before each of its timed calls, so "
        "the previous runner's threads do not disturb it (default "
        f"{REWARM}; 0: back to back)",
    )
    parser.add_argument(
        "--wait-idle-s",
        type=float,
        default=0.0,
        metavar="S",
        help="on a shared machine: per model, wait up to S seconds for other "
        "processes to go quiet before timing, and time again if they "
        "were busy meanwhile (default 0: time at once)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark for ``args`` (from :func:`add_arguments`); print and write results."""
    from graphopt import zoo

    names = list(args.models) or zoo.names()
    for name in names:  # an unknown name fails now, not after an hour of timing
        if name not in zoo.names():
            zoo.get(name)  # raises GraphoptError with the close matches
    start = time.perf_counter()
    machine = machine_info()
    settings = {
        "runs": args.runs,
        "warmup": args.warmup,
        "max_time_s": args.max_time_s,
        "rewarm": args.rewarm,
        "wait_idle_s": args.wait_idle_s,
        "compile": not args.no_compile,
        "openvino": not args.no_openvino,
    }

    def write(results: list[dict[str, Any]], done: bool) -> None:
        if args.json:
            payload = {
                "machine": machine,
                "settings": settings,
                "complete": done,
                "wall_s": round(time.perf_counter() - start, 1),
                "results": results,
            }
            _write(args.json, json.dumps(payload, indent=2, default=str) + "\n")
        if args.markdown:
            _write(args.markdown, markdown_table(results, machine=machine) + "\n")

    results = run_benchmark(
        names,
        runs=args.runs,
        warmup=args.warmup,
        compile=not args.no_compile,
        openvino=not args.no_openvino,
        max_time_s=args.max_time_s,
        rewarm=args.rewarm,
        wait_idle_s=args.wait_idle_s,
        progress=True,
        on_result=lambda done: write(done, False),
    )
    write(results, True)
    print(markdown_table(results, machine=machine))
    print(
        f"\n{len(results)} model(s) in {time.perf_counter() - start:.0f} s"
        + (f"; JSON: {args.json}" if args.json else "")
        + (f"; Markdown: {args.markdown}" if args.markdown else "")
    )
    return 0


def _write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the benchmark


def run_benchmark(
    names: Sequence[str],
    *,
    runs: int,
    warmup: int,
    compile: bool = True,
    openvino: bool = True,
    max_time_s: float = 60.0,
    rewarm: int = REWARM,
    wait_idle_s: float = 0.0,
    progress: bool = True,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark zoo models ``names``; one dict per model (see :func:`bench_model`).

    ``on_result`` is called with the results so far after each model (to save partial runs).
    """
    results: list[dict[str, Any]] = []
    say = Progress(progress, prefix="bench ")
    for name in names:
        results.append(
            bench_model(
                name,
                runs=runs,
                warmup=warmup,
                compile=compile,
                openvino=openvino,
                max_time_s=max_time_s,
                rewarm=rewarm,
                wait_idle_s=wait_idle_s,
                say=say,
            )
        )
        if on_result is not None:
            on_result(list(results))
    return results


def bench_model(
    name: str,
    *,
    runs: int,
    warmup: int,
    compile: bool = True,
    openvino: bool = True,
    max_time_s: float = 60.0,
    rewarm: int = REWARM,
    wait_idle_s: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build every runner for zoo model ``name``, check its output, time them interleaved.

    Returns ``{"model", "description", "batch", "input_shapes", "threads", "runners":
    {runner: {median_ms, p10_ms, p90_ms, runs, rel_error, speedup_vs_eager}}, "ratios",
    "compile_s", "graphopt_artifact_error", "skipped": {runner: reason},
    "other_cpu_while_timing", "timing_attempts", "wall_s"}``. ``wait_idle_s``: wait up to that
    long for other processes to go quiet before timing, and time again if they were busy.
    """
    from graphopt import zoo

    say = say or Progress(False)
    start = time.perf_counter()
    say(f"{name}: building the model")
    entry = zoo.get(name)
    model, inputs = entry.model, tuple(entry.example_inputs)
    arrays = [x.detach().cpu().numpy() for x in inputs]
    runners: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    compile_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    threads: dict[str, int | None] = {"torch": torch.get_num_threads()}
    artifact_error: dict[str, Any] | None = None
    onnx_ops: dict[str, dict[str, int]] = {}  # ONNX operators: plain export, graphopt's

    def eager() -> Any:
        with torch.inference_mode():
            return model(*inputs)

    say(f"{name}: torch eager")
    runners[EAGER] = eager
    outputs[EAGER] = _numpy_outputs(eager())

    freezing_before = None
    try:
        # torch.compile with inductor freezing; the flag stays on while this model is timed
        if compile:
            import torch._inductor.config as inductor_config

            freezing_before = inductor_config.freezing
            inductor_config.freezing = True
            say(f"{name}: torch.compile (inductor, freezing) - compiling...")
            try:
                compiled = torch.compile(model)

                def compiled_run() -> Any:
                    with torch.inference_mode():
                        return compiled(*inputs)

                t0 = time.perf_counter()
                out = compiled_run()
                compile_s[COMPILE] = time.perf_counter() - t0
                outputs[COMPILE] = _numpy_outputs(out)
                runners[COMPILE] = compiled_run
                say(f"{name}: torch.compile compiled in {compile_s[COMPILE]:.1f} s")
            except Exception as exc:  # noqa: BLE001 - a missing compiler must not stop the run
                skipped[COMPILE] = _error(exc)
                say(f"{name}: torch.compile failed: {skipped[COMPILE]}")
        else:
            skipped[COMPILE] = "disabled (--no-compile)"

        # ONNX Runtime on the plain export of the user's model
        say(f"{name}: onnxruntime on the unrewritten export")
        ort_artifact = None
        try:
            from graphopt.backends.onnxruntime import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend("cpu")
            threads["onnxruntime"] = backend.threads
            t0 = time.perf_counter()
            ort_artifact = backend.compile(copy.deepcopy(model), inputs)
            compile_s[ORT] = time.perf_counter() - t0
            onnx_ops[ORT] = _op_counts(ort_artifact.proto)
            ort_run = _bind(ort_artifact.run, arrays)
            outputs[ORT] = [np.array(o) for o in ort_run()]
            runners[ORT] = ort_run
        except Exception as exc:  # noqa: BLE001
            skipped[ORT] = _error(exc)
            say(f"{name}: onnxruntime failed: {skipped[ORT]}")

        # OpenVINO on that same export
        if not openvino:
            skipped[OPENVINO] = "disabled (--no-openvino)"
        elif ort_artifact is None:
            skipped[OPENVINO] = "no ONNX export (see onnxruntime)"
        else:
            say(f"{name}: openvino on the unrewritten export")
            try:
                t0 = time.perf_counter()
                ov_run, threads["openvino"] = _openvino_runner(ort_artifact.proto, arrays)
                compile_s[OPENVINO] = time.perf_counter() - t0
                outputs[OPENVINO] = [np.array(o) for o in ov_run()]
                runners[OPENVINO] = ov_run
            except ImportError:
                skipped[OPENVINO] = OPENVINO_MISSING
                say(f"{name}: openvino {OPENVINO_MISSING}")
            except Exception as exc:  # noqa: BLE001
                skipped[OPENVINO] = _error(exc)
                say(f"{name}: openvino failed: {skipped[OPENVINO]}")

        # graphopt
        say(f"{name}: graphopt.optimize")
        try:
            import graphopt

            t0 = time.perf_counter()
            opt = graphopt.optimize(model, "cpu", inputs, measure=False, name=name)
            compile_s[GRAPHOPT] = time.perf_counter() - t0
            err = opt.report.artifact_error
            if err is not None:
                artifact_error = {
                    "metric": err.metric,
                    "measured": err.measured,
                    "allowed": err.allowed,
                    "ok": err.ok,
                }
            onnx_ops[GRAPHOPT] = _op_counts(opt.artifact.proto)
            go_run = _bind(opt.artifact.run, arrays)
            outputs[GRAPHOPT] = [np.array(o) for o in go_run()]
            runners[GRAPHOPT] = go_run
            say(f"{name}: graphopt optimized in {compile_s[GRAPHOPT]:.1f} s")
        except Exception as exc:  # noqa: BLE001
            skipped[GRAPHOPT] = _error(exc)
            say(f"{name}: graphopt failed: {skipped[GRAPHOPT]}")

        deadline = time.perf_counter() + wait_idle_s
        attempts = 0
        while True:
            attempts += 1
            waited = _wait_idle(deadline, say, name)
            say(
                f"{name}: timing {', '.join(runners)} interleaved "
                f"(warmup {warmup}, up to {runs} runs or {max_time_s:g} s, "
                f"{rewarm} untimed calls before each)"
                + (f" after waiting {waited:.0f} s for an idle machine" if waited > 0 else "")
            )
            probe = _CpuProbe()
            timings = time_interleaved(
                runners, warmup=warmup, runs=runs, max_time_s=max_time_s, rewarm=rewarm
            )
            other_cpu = probe.others()
            if other_cpu is None or other_cpu <= BUSY or time.perf_counter() >= deadline:
                break
            say(f"{name}: other processes used {other_cpu:.1f} cores while timing; timing again")
    finally:
        if freezing_before is not None:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = freezing_before
        if compile:
            torch._dynamo.reset()  # free compiled code; the next model starts clean

    eager_ms = timings[EAGER].median_ms
    per_runner: dict[str, dict[str, Any]] = {}
    for key, lat in timings.items():
        per_runner[key] = {
            "median_ms": lat.median_ms,
            "p10_ms": lat.p10_ms,
            "p90_ms": lat.p90_ms,
            "runs": lat.runs,
            "rel_error": _rel_error(outputs[EAGER], outputs[key]),
            "speedup_vs_eager": eager_ms / lat.median_ms,
        }
    ratios: dict[str, float | None] = {
        f"{key} vs eager": per_runner[key]["speedup_vs_eager"] if key in per_runner else None
        for key in RUNNERS
        if key != EAGER
    }
    ratios["graphopt vs onnxruntime"] = (
        per_runner[ORT]["median_ms"] / per_runner[GRAPHOPT]["median_ms"]
        if ORT in per_runner and GRAPHOPT in per_runner
        else None
    )
    result = {
        "model": name,
        "description": entry.description,
        "batch": int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1,
        "input_shapes": [list(x.shape) for x in inputs],
        "threads": threads,
        "runners": per_runner,
        "ratios": ratios,
        "compile_s": compile_s,
        "graphopt_artifact_error": artifact_error,
        "skipped": skipped,
        "onnx_ops": onnx_ops,
        # False: graphopt's ONNX graph has the operators of the plain export (the exporter and
        # ONNX Runtime already did what the pipeline does), so "graphopt vs ORT" is noise
        "graphopt_changed_graph": (
            onnx_ops[GRAPHOPT] != onnx_ops[ORT]
            if ORT in onnx_ops and GRAPHOPT in onnx_ops
            else None
        ),
        # cores' worth of CPU time that other processes used while this model was timed:
        # well above 0, they competed with the runners and absolute latencies are noisy
        "other_cpu_while_timing": other_cpu,
        "timing_attempts": attempts,
        "wall_s": time.perf_counter() - start,
    }
    summary = ", ".join(f"{k} {v['median_ms']:.3g} ms" for k, v in per_runner.items())
    say(f"{name}: done in {result['wall_s']:.0f} s: {summary}")
    return result


def _bind(run: Callable[[list[np.ndarray]], Any], arrays: list[np.ndarray]) -> Callable[[], Any]:
    return lambda: run(arrays)


def _openvino_runner(
    proto: Any, arrays: list[np.ndarray]
) -> tuple[Callable[[], list[np.ndarray]], int | None]:
    """Compile an ONNX model with OpenVINO for CPU in f32 with the latency hint."""
    import onnx
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(path))
        ov_model = core.read_model(str(path))
        compiled = core.compile_model(
            ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        )
    try:
        threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    except Exception:  # noqa: BLE001 - informational only
        threads = None
    request = compiled.create_infer_request()
    outs = list(compiled.outputs)
    feeds = {i: a for i, a in enumerate(arrays)}

    def run() -> list[np.ndarray]:
        # share_inputs: no copy of the inputs (ORT does not copy contiguous arrays either);
        # the outputs are copied out of the request, as ORT returns fresh arrays
        result = request.infer(feeds, share_inputs=True)
        return [result[o] for o in outs]

    return run, threads


def _op_counts(proto: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _numpy_outputs(out: Any) -> list[np.ndarray]:
    from graphopt.verify import flatten_outputs

    return [t.detach().cpu().numpy().copy() for t in flatten_outputs(out)]


def _rel_error(reference: list[np.ndarray], got: Sequence[Any]) -> float:
    """Worst over outputs of max |got - ref| / max |ref| (inf when the outputs do not match)."""
    if len(reference) != len(got):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, got, strict=True):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return float("inf")
        if ref.size == 0:
            continue
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(out - ref)))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _wait_idle(deadline: float, say: Callable[[str], None], name: str) -> float:
    """Wait (until ``deadline``) for 2 s in a row with other processes under ``BUSY`` cores.

    Returns the seconds spent waiting for busy periods to end (0 when the first 2 s were quiet).
    """
    start = time.perf_counter()
    busy = False
    while time.perf_counter() < deadline:
        probe = _CpuProbe()
        time.sleep(min(2.0, max(0.0, deadline - time.perf_counter())))
        other = probe.others()
        if other is None or other <= BUSY:
            break
        if not busy:
            say(f"{name}: other processes use {other:.1f} cores; waiting for them")
            busy = True
    return time.perf_counter() - start if busy else 0.0


class _CpuProbe:
    """CPU used by other processes over an interval, in cores (from /proc/stat, Linux only)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.busy = self._busy()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        except (OSError, ValueError, IndexError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def others(self) -> float | None:
        busy = self._busy()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        own = time.process_time() - self.own
        return round(max(0.0, (busy - self.busy - own) / wall), 2)


def _error(exc: BaseException) -> str:
    return first_line(exc, with_type=True)[:300]


# --------------------------------------------------------------------------------------------
# machine info and the table


def machine_info() -> dict[str, Any]:
    """CPU model and flags of note, cores, library versions, date."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in (
                "",
                platform.machine(),
                platform.processor(),
            ):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        import openvino

        ov_version: str | None = openvino.__version__
    except ImportError:
        ov_version = None
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "isa": sorted(
            f
            for f in flags
            if f
            in {
                "avx2",
                "fma",
                "avx512f",
                "avx512_vnni",
                "avx512_bf16",
                "amx_bf16",
                "amx_tile",
                "avx_vnni",
            }
        ),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": ov_version,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _ms(x: float) -> str:
    """A latency at 3 significant digits, without exponent notation."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def markdown_table(
    results: Sequence[dict[str, Any]], *, machine: dict[str, Any] | None = None
) -> str:
    """Median latency per runner and model, with the ratios that matter, as Markdown.

    A runner whose output differs from eager's by more than 1e-3 (relative) is marked with
    ``!``; skipped runners and failures are listed under the table.
    """
    columns = [r for r in RUNNERS if any(r in res["runners"] for res in results)]
    header = (
        ["model"]
        + [f"{TITLES[r]} ms" for r in columns]
        + ["graphopt vs eager", "graphopt vs ORT", "torch.compile vs eager"]
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    notes: list[str] = []
    for res in results:
        cells = [res["model"]]
        for r in columns:
            entry = res["runners"].get(r)
            if entry is None:
                cells.append("–")
                continue
            cell = _ms(entry["median_ms"])
            if entry.get("rel_error", 0.0) > MISMATCH:
                cell += " !"
                notes.append(
                    f"{res['model']}, {r}: output differs from eager by "
                    f"{entry['rel_error']:.2g} (relative to max |eager output|)"
                )
            cells.append(cell)
        ratios = res["ratios"]
        cells += [
            _ratio(ratios.get("graphopt vs eager")),
            _ratio(ratios.get("graphopt vs onnxruntime")),
            _ratio(ratios.get("torch.compile vs eager")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for r, reason in res.get("skipped", {}).items():
            if not reason.startswith("disabled"):
                notes.append(f"{res['model']}, {r}: {reason}")
    text = "\n".join(lines)
    intro = (
        "Batch 1, median of interleaved runs (all runners of a model timed in alternation "
        "in one process); ratios are speedups (>1 = faster)."
    )
    if machine:
        intro += (
            f" {machine.get('cpu')}, {machine.get('cores')} cores; torch "
            f"{machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}"
            + (f", openvino {machine['openvino']}" if machine.get("openvino") else "")
            + f"; {machine.get('date')}."
        )
    same = [res["model"] for res in results if res.get("graphopt_changed_graph") is False]
    if same:
        notes.append(
            f"{', '.join(same)}: graphopt's ONNX graph has the same operators as the "
            "plain export (torch.onnx.export already folds BatchNorm into convolutions "
            'in eval mode), so "graphopt vs ORT" there measures noise'
        )
    busy = [res for res in results if (res.get("other_cpu_while_timing") or 0.0) > BUSY]
    if busy:
        worst = max(res["other_cpu_while_timing"] for res in busy)
        notes.append(
            f"other processes used up to {worst:.1f} cores while timing "
            f"{', '.join(r['model'] for r in busy)}: absolute latencies are noisy; "
            "the ratios, timed interleaved, less so"
        )
    text = intro + "\n\n" + text
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text

"""The competitors of ``graphopt bench``: how each is built for one model (see the package doc).

Every runner is a callable that does one batch-1 inference on the model's example inputs. Its
builder makes it, calls it once for the output that is checked against eager's, and records on
the :class:`Build` what else the results report (compile time, threads, ONNX operators). A
builder raises :class:`Skipped` for a runner left out on purpose; any other exception leaves the
runner out with the exception's text as the reason (it never stops the benchmark).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import graphopt
from graphopt._util import first_line
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.core.numerics import flatten_outputs

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

OPENVINO_MISSING = "not installed: pip install graphopt[bench]"

Run = Callable[[], Any]


class Skipped(Exception):
    """A runner left out on purpose (disabled, or what it needs is missing); the reason."""


@dataclass
class Build:
    """One model's runners as they are built, and what building them recorded."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    say: Callable[[str], None]
    compile: bool = True
    openvino: bool = True
    runners: dict[str, Run] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    threads: dict[str, int | None] = field(default_factory=dict)
    onnx_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # plain export, graphopt's
    artifact_error: dict[str, Any] | None = None
    plain_export: Any = None  # the ONNX model of the unrewritten export (OpenVINO reuses it)

    def __post_init__(self) -> None:
        self.arrays = [x.detach().cpu().numpy() for x in self.inputs]
        self.threads.setdefault("torch", torch.get_num_threads())

    def say_for(self, text: str) -> None:
        """A progress line about this model."""
        self.say(f"{self.name}: {text}")


def build_eager(b: Build) -> tuple[Run, list[np.ndarray]]:
    """``model(*inputs)`` under ``torch.inference_mode()``: the reference every output is
    compared with."""
    model, inputs = b.model, b.inputs

    def eager() -> Any:
        with torch.inference_mode():
            return model(*inputs)

    b.say_for("torch eager")
    return eager, numpy_outputs(eager())


def build_compile(b: Build) -> tuple[Run, list[np.ndarray]]:
    """``torch.compile(model)`` (inductor freezing is on, see :func:`inductor_freezing`),
    compiled by a first call, which is timed."""
    if not b.compile:
        raise Skipped("disabled (--no-compile)")
    b.say_for("torch.compile (inductor, freezing) - compiling...")
    compiled = torch.compile(b.model)
    inputs = b.inputs

    def compiled_run() -> Any:
        with torch.inference_mode():
            return compiled(*inputs)

    t0 = time.perf_counter()
    out = compiled_run()
    b.compile_s[COMPILE] = time.perf_counter() - t0
    outputs = numpy_outputs(out)
    b.say_for(f"torch.compile compiled in {b.compile_s[COMPILE]:.1f} s")
    return compiled_run, outputs


def build_onnxruntime(b: Build) -> tuple[Run, list[np.ndarray]]:
    """ONNX Runtime on the plain export of the user's model, with its own graph optimizations."""
    b.say_for("onnxruntime on the unrewritten export")

    backend = OnnxRuntimeBackend("cpu")
    b.threads["onnxruntime"] = backend.threads
    t0 = time.perf_counter()
    artifact = backend.compile(copy.deepcopy(b.model), b.inputs)
    b.plain_export = artifact.proto
    b.compile_s[ORT] = time.perf_counter() - t0
    b.onnx_ops[ORT] = op_counts(artifact.proto)
    run = bind(artifact.run, b.arrays)
    return run, [np.array(o) for o in run()]


def build_openvino(b: Build) -> tuple[Run, list[np.ndarray]]:
    """OpenVINO on that same export, for CPU in f32 with the latency hint."""
    if not b.openvino:
        raise Skipped("disabled (--no-openvino)")
    if b.plain_export is None:
        raise Skipped("no ONNX export (see onnxruntime)")
    b.say_for("openvino on the unrewritten export")
    try:
        t0 = time.perf_counter()
        run, b.threads["openvino"] = openvino_runner(b.plain_export, b.arrays)
        b.compile_s[OPENVINO] = time.perf_counter() - t0
        return run, [np.array(o) for o in run()]
    except ImportError:
        b.say_for(f"openvino {OPENVINO_MISSING}")
        raise Skipped(OPENVINO_MISSING) from None


def build_graphopt(b: Build) -> tuple[Run, list[np.ndarray]]:
    """``graphopt.optimize(model, "cpu", inputs)`` with the target's default pipeline, run
    through its ONNX Runtime artifact."""
    b.say_for("graphopt.optimize")
    t0 = time.perf_counter()
    opt = graphopt.optimize(b.model, "cpu", b.inputs, measure=False, name=b.name)
    b.compile_s[GRAPHOPT] = time.perf_counter() - t0
    err = opt.report.artifact_error
    if err is not None:
        b.artifact_error = {
            "metric": err.metric,
            "measured": err.measured,
            "allowed": err.allowed,
            "ok": err.ok,
        }
    b.onnx_ops[GRAPHOPT] = op_counts(opt.artifact.proto)
    run = bind(opt.artifact.run, b.arrays)
    outputs = [np.array(o) for o in run()]
    b.say_for(f"graphopt optimized in {b.compile_s[GRAPHOPT]:.1f} s")
    return run, outputs


#: the competitors of eager, built in this order (OpenVINO needs ONNX Runtime's export)
COMPETITORS: dict[str, Callable[[Build], tuple[Run, list[np.ndarray]]]] = {
    COMPILE: build_compile,
    ORT: build_onnxruntime,
    OPENVINO: build_openvino,
    GRAPHOPT: build_graphopt,
}


def build_all(b: Build) -> None:
    """Eager (which must work), then every competitor; a failing competitor is left out with
    its reason."""
    b.runners[EAGER], b.outputs[EAGER] = build_eager(b)
    for key, build in COMPETITORS.items():
        try:
            b.runners[key], b.outputs[key] = build(b)
        except Skipped as why:
            b.skipped[key] = str(why)
        except Exception as exc:  # noqa: BLE001 - a missing compiler must not stop the run
            b.skipped[key] = error_text(exc)
            b.say_for(f"{key} failed: {b.skipped[key]}")


@contextlib.contextmanager
def inductor_freezing(enabled: bool) -> Iterator[None]:
    """Inductor freezing on (the best setting a user would find for inference) while a model's
    runners are built and timed; then the flag is restored and compiled code freed, so the next
    model starts clean. Nothing happens when ``enabled`` is false."""
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config  # loads inductor: only when compiling

    before = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = before
        torch._dynamo.reset()


def bind(run: Callable[[list[np.ndarray]], Any], arrays: list[np.ndarray]) -> Run:
    return lambda: run(arrays)


def openvino_runner(proto: Any, arrays: list[np.ndarray]) -> tuple[Run, int | None]:
    """Compile an ONNX model with OpenVINO for CPU in f32 with the latency hint.

    f32 is asked for (``INFERENCE_PRECISION_HINT``): CPUs with bf16 support would otherwise run
    in bf16, which is neither comparable nor faster at batch 1.
    """
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


def op_counts(proto: Any) -> dict[str, int]:
    """ONNX operators of a model by type, sorted by name."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def numpy_outputs(out: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in flatten_outputs(out)]


def error_text(exc: BaseException) -> str:
    """Why a runner failed, in one line of at most 300 characters."""
    return first_line(exc, with_type=True)[:300]

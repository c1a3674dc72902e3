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

The parts: :mod:`~graphopt.bench.runners` (the competitors, one builder each),
:mod:`~graphopt.bench.harness` (building, checking and timing a model's runners; medians and
ratios), :mod:`~graphopt.bench.machine` (the machine and its load), :mod:`~graphopt.bench.output`
(the Markdown table, files) and :mod:`~graphopt.bench.command` (the command line).
"""

from __future__ import annotations

from graphopt.bench.command import add_arguments, main
from graphopt.bench.harness import REWARM, bench_model, rel_error, run_benchmark
from graphopt.bench.machine import BUSY, CpuProbe, machine_info, wait_idle
from graphopt.bench.output import MISMATCH, markdown_table, write_text
from graphopt.bench.runners import (
    COMPILE,
    EAGER,
    GRAPHOPT,
    OPENVINO,
    OPENVINO_MISSING,
    ORT,
    RUNNERS,
    TITLES,
)

__all__ = [
    "BUSY",
    "COMPILE",
    "EAGER",
    "GRAPHOPT",
    "MISMATCH",
    "OPENVINO",
    "OPENVINO_MISSING",
    "ORT",
    "REWARM",
    "RUNNERS",
    "TITLES",
    "CpuProbe",
    "add_arguments",
    "bench_model",
    "machine_info",
    "main",
    "markdown_table",
    "rel_error",
    "run_benchmark",
    "wait_idle",
    "write_text",
]

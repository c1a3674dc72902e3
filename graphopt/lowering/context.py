"""What every lowering stage of one ``optimize`` run shares: :class:`Lowering`, and the lines
of the report that a TVM artifact or a mobile target adds."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx

from graphopt.backends import Artifact, Backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.quiet import collecting, summarize
from graphopt.core.dynamic_axes import DynamicAxes
from graphopt.core.numerics import Comparison
from graphopt.core.pass_infra import Pass, PassContext
from graphopt.core.progress import Progress, current
from graphopt.frontends.onnx import from_numpy
from graphopt.lowering.check import Check
from graphopt.pipeline import PassManager, PipelineResult
from graphopt.report import Report
from graphopt.target import Target


@dataclass
class Lowering:
    """The rewritten graph of one ``optimize`` run and what checking its artifacts needs.

    ``graph``: the pipeline's result; ``original``: a copy of the captured graph before any
    pass, with ``manager`` and ``result`` what bisection reruns; ``inputs``: the example inputs
    every artifact is compiled for; ``input_names`` / ``output_names``: the interface every
    export keeps (an ONNX model's own names), with ``dynamic_axes`` / ``output_axes`` the axes
    that stay symbolic. ``errors``: per backend name, how far its artifact is from the model.
    """

    graph: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str] | None
    original: fx.GraphModule
    manager: PassManager
    result: PipelineResult
    check: Check
    report: Report
    target: Target
    say: Progress
    context: PassContext | None = None  # the FX stage's; int8's ONNX stage starts from it
    onnx_stage: list[Pass] = field(default_factory=list)  # passes with ir="onnx", in order
    errors: dict[str, Comparison] = field(default_factory=dict)
    dynamic_axes: DynamicAxes = field(default_factory=dict)  # the inputs' (by interface name)
    output_axes: DynamicAxes | None = None  # the outputs', found by lowering.dynamic.plan
    other_sizes: list[Any] = field(default_factory=list)  # lowering.dynamic.OtherSize, per dim

    @property
    def reference(self) -> list[torch.Tensor] | None:
        """The model's outputs on every check sample; None when ``verify=False``."""
        return self.check.reference

    @property
    def names(self) -> dict[str, Any]:
        """The interface every export and compile of this model keeps: names and dynamic axes."""
        return {
            "input_names": self.input_names,
            "output_names": self.output_names,
            "dynamic_axes": self.dynamic_axes,
            "output_axes": self.output_axes,
        }

    def run(self, artifact: Artifact) -> list[torch.Tensor]:
        """The artifact's outputs on every check sample, concatenated."""
        return [
            from_numpy(o)  # ml_dtypes' bfloat16/float8 and (u)longlong arrays too
            for sample in self.check.samples
            for o in artifact.run([to_numpy(x) for x in sample])
        ]


F = TypeVar("F", bound=Callable[..., Any])


def with_dependency_notes(fn: F) -> F:
    """``fn`` returns an object with a ``report``: what TVM and ONNX Runtime printed while it ran
    (kept off stderr by :func:`graphopt.backends.quiet.quiet`) goes into ``report.notes``,
    summarized: per kind of line, the count and the first example."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with collecting() as lines:
            result = fn(*args, **kwargs)
        result.report.notes += summarize(lines)
        return result

    return wrapper  # type: ignore[return-value]


def with_progress(fn: F) -> F:
    """``fn`` is a method of an object with a ``progress`` flag: for its run a
    :class:`~graphopt.core.progress.Progress` (enabled by the flag) is current, its phases kept
    alive on stderr (:meth:`Progress.active`), so every stage under it can show progress. A
    caller's enabled one (a command that also loads and saves) goes on instead of a second."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.progress and current().enabled:
            return fn(self, *args, **kwargs)
        with Progress(bool(self.progress)).active():
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def report_tvm(report: Report, artifact: Any) -> None:
    """The TVM artifact's tasks, its tuning and a warning about heavy untuned tasks."""
    report.tvm_tasks = [dataclasses.asdict(t) for t in artifact.tasks]
    if artifact.tuning is not None:
        report.tvm_tuning = {**artifact.tuning.to_dict(), "summary": artifact.tuning.describe()}
        report.warnings += artifact.tuning.warnings
    if heavy := artifact.heavy_untuned:
        report.warnings.append(
            f"{len(heavy)} compute-heavy TVM task(s) run untuned default schedules "
            "(untuned TVM is ~100x slower than ONNX Runtime on the zoo CNNs); tune with "
            "trials=N or tune_minutes=M."
        )


def report_mobile(report: Report, target: Target, runtime: Backend) -> None:
    if target.device == "mobile" and runtime.name == "onnxruntime":
        report.mobile = (
            "mobile: save('model.ort') writes ONNX Runtime's mobile format with the operator "
            "list for a reduced build and XNNPACK session settings beside it."
        )

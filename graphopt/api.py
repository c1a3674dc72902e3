"""``optimize()``: the one call; :class:`Optimizer`, the configurable object behind it; and the
:class:`OptimizedModel` they return.

capture -> PassManager (verified per pass) -> backend artifact -> end-to-end check -> latency.
What happens after the pipeline (lowering, checking and bisecting the artifact, the int8
export, the choice of backend, the baseline) is :mod:`graphopt.lowering`.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx, nn

from graphopt._util import close_matches
from graphopt.backends import Artifact, Backend, get_backend
from graphopt.backends.measure import fewer_torch_threads_when_loaded
from graphopt.core.pass_infra import PassContext
from graphopt.core.progress import current
from graphopt.errors import (
    ArgumentError,
    BackendError,
    graphopt_errors_only,
)
from graphopt.frontends.torch import Captured, capture
from graphopt.lowering import dynamic
from graphopt.lowering.auto import choose_backend, choose_int8_backend
from graphopt.lowering.baseline import Baseline
from graphopt.lowering.check import Check
from graphopt.lowering.context import (
    Lowering,
    report_mobile,
    report_tvm,
    with_dependency_notes,
    with_progress,
)
from graphopt.lowering.fp32 import lower
from graphopt.lowering.int8 import (
    check_calibration,
    lower_int8,
    plan_precision,
    require_calibration,
)
from graphopt.lowering.result import OptimizedModel, result_of
from graphopt.pipeline import (
    Instrument,
    PassManager,
    Pipeline,
    PipelineResult,
    PrintTiming,
    Reproducer,
    Snapshots,
    parse_pipeline,
)
from graphopt.report import Report, op_counts
from graphopt.target import Target

BACKEND_CHOICES = ("onnxruntime", "tvm", "openvino", "auto")


@graphopt_errors_only
def optimize(
    model: nn.Module | str | Path | Any,
    target: str | Target = "cpu",
    example_inputs: Sequence[Any] | None = None,
    pipeline: str | None = None,
    *,
    verify: bool = True,
    strict: bool = False,
    backend: str = "onnxruntime",
    measure: bool = True,
    trials: int = 0,
    tune_minutes: float | None = None,
    database: str | Path | None = None,
    rpc: Any = None,
    calibration_data: Iterable[Any] | None = None,
    precision: str = "fp32",
    max_drop: float | None = None,
    metric: Callable[[Callable[..., Any]], float] | None = None,
    finetune: Callable[[fx.GraphModule], Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    dynamic_axes: Mapping[Any, Any] | None = None,
    instruments: Sequence[Instrument] = (),
    progress: bool = False,
    name: str | None = None,
    accept_mismatch: bool = False,
) -> OptimizedModel:
    """Optimize ``model`` for ``target`` and return an :class:`OptimizedModel`.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``.onnx`` path or a
    ``ModelProto``; it is never modified. ``calibration_data``: input tuples for passes that
    calibrate (``substitute-monarch`` measures each substitute's error on them; int8 calibrates
    on them): batches, each a tuple of tensors / arrays in input order whose first axis is the
    samples. ``metric``: ``metric(predict) -> score`` (higher is better), where
    ``predict(*arrays)`` runs a model on numpy inputs, e.g. held-out accuracy (int8's
    ``max_drop`` and ``merge-convs{budget=...}`` rank by it). ``finetune``:
    ``callable(graph_module)`` that a lossy pass runs on the graph after changing it.
    ``leaf_modules`` / ``concrete_args``: capture hints (see README "Capture").
    ``dynamic_axes``: the inputs' axes that take any size, ``{"x": {0: "batch", 2: "height"}}``
    or ``{"x": [0, 2]}``; default the batch (axis 0) of a module's inputs and every symbolic
    dimension of an ONNX model's. The artifact keeps them symbolic and is checked at the
    example's size and at twice it.

    Every other argument is an option of :class:`Optimizer`, documented there (target,
    pipeline, verify, strict, backend, measure, trials, tune_minutes, database, rpc, precision,
    max_drop, instruments, progress, accept_mismatch). Only :class:`GraphoptError` subclasses
    escape ``optimize``.

    >>> result = optimize(model, "cpu", example_inputs=(x,))
    >>> print(result.report)
    >>> result.save("model.onnx")
    """
    optimizer = Optimizer(
        target=target,
        pipeline=pipeline,
        verify=verify,
        strict=strict,
        backend=backend,
        measure=measure,
        trials=trials,
        tune_minutes=tune_minutes,
        database=database,
        rpc=rpc,
        precision=precision,
        max_drop=max_drop,
        instruments=instruments,
        progress=progress,
        accept_mismatch=accept_mismatch,
    )
    return optimizer.optimize(
        model,
        example_inputs,
        calibration_data=calibration_data,
        metric=metric,
        finetune=finetune,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        dynamic_axes=dynamic_axes,
        name=name,
    )


@dataclass(frozen=True, kw_only=True)
class Optimizer:
    """How to optimize: the options of :func:`optimize`, checked once, reusable across models.

    What belongs to one model (its example inputs, calibration data, metric, fine-tuning
    callback, capture hints and name) is passed to :meth:`optimize` with the model.

    ``target``: ``"cpu"``, ``"cuda"``, ``"llvm -mcpu=..."``, ``"aarch64-linux"``... ``pipeline``:
    a pipeline string, default the target's (``graphopt passes`` lists them). ``verify``: check
    every pass and the final artifact on the example inputs. ``strict``: raise instead of
    rolling a pass back. ``measure``: time the artifact against ONNX Runtime on the unrewritten
    export.

    ``backend``: ``"onnxruntime"`` (default), ``"tvm"`` (needs ``graphopt[tvm]``),
    ``"openvino"`` (needs ``graphopt[openvino]``; OpenVINO runs the int8 QDQ model on its own
    int8 kernels) or
    ``"auto"``: the fastest by measurement of ONNX Runtime under its candidate session settings,
    OpenVINO under its performance hints (where installed) and TVM when TVM is tuned for the
    model (or ``trials``/``tune_minutes`` ask to tune it; fp32 only), each checked against the
    model first, timed interleaved in one run; the report shows every candidate. ``trials`` / ``tune_minutes``: TVM's MetaSchedule budget;
    ``database``: its tuning database directory (default: one per target in the cache
    directory, reused by later runs). ``rpc``: ``"host:port/key"`` of a device registered at a
    TVM RPC tracker, where TVM tunes, runs and measures.

    ``precision="int8"``: the target's pipeline gets ``fold-conv-bn`` and ``reparameterize``
    (where missing), then ``equalize-layers`` and ``insert-qdq``, in that order; the ONNX
    export is calibrated on the calibration data (required), improved (SmoothQuant, bias
    correction) and quantised to a QDQ model whose Conv/Gemm/MatMul ONNX Runtime runs as integer
    kernels. ``max_drop``: the metric drop allowed against fp32; layers are kept in float, the
    most sensitive first, until the drop is within it (default: no fallback, the drop is only
    reported). The default metric is top-1 agreement with fp32 on the calibration data (output
    cosine for non-classifier outputs). A ``finetune`` callback runs e.g. a few epochs of
    training after ``substitute-monarch`` or, after ``merge-convs{budget=...}`` fixed the
    architecture, before its final merge (the verification after that pass then compares the
    fine-tuned graph).

    ``verify``: every check runs on the example inputs and, where one of them is constant (all
    zeros...), on a seeded random input of the same shape too; exact contracts allow the
    model's own float32 rounding (measured against a float64 run) where that is larger than
    ``1e-5 x max|output|``. A check that fails at capture or on the final artifact raises
    :class:`VerificationError` naming the stage at fault (capture, a pass, export, backend);
    ``accept_mismatch=True`` (for experts) returns the artifact anyway, with the mismatch in
    ``report.warnings``. ``instruments``: :class:`graphopt.pipeline.Instrument` objects that
    observe every pass; ``progress``: stage lines on stderr.

    >>> optimizer = Optimizer(target="cpu", backend="auto", tune_minutes=10)
    >>> result = optimizer.optimize(model, (x,))
    >>> int8 = Optimizer(precision="int8", max_drop=0.01).optimize(
    ...     model, (x,), calibration_data=batches
    ... )
    """

    target: str | Target = "cpu"
    pipeline: str | None = None
    verify: bool = True
    strict: bool = False
    backend: str = "onnxruntime"
    measure: bool = True
    trials: int = 0
    tune_minutes: float | None = None
    database: str | Path | None = None
    rpc: Any = None
    precision: str = "fp32"
    max_drop: float | None = None
    instruments: Sequence[Instrument] = ()
    progress: bool = False
    accept_mismatch: bool = False
    # what the options above resolve to, set once by __post_init__
    parsed_target: Target = field(init=False, repr=False)
    parsed_pipeline: Pipeline = field(init=False, repr=False)  # with int8's passes, if asked
    int8: bool = field(init=False, repr=False)

    @graphopt_errors_only
    def __post_init__(self) -> None:
        """Refuse impossible options before any heavy work, each with what to pass."""
        _check_options(self)
        parsed = Target.parse(self.target)  # bad strings fail before any heavy work
        pipe = parse_pipeline(
            self.pipeline if self.pipeline is not None else parsed.default_pipeline
        )
        if self.backend not in BACKEND_CHOICES:
            raise BackendError(
                f"unknown backend {self.backend!r}."
                + close_matches(str(self.backend), BACKEND_CHOICES)
                + f" Choose one of: {', '.join(BACKEND_CHOICES)}."
            )
        pipe, int8 = plan_precision(self.precision, pipe, self.max_drop)
        object.__setattr__(self, "parsed_target", parsed)  # frozen: set once, here
        object.__setattr__(self, "parsed_pipeline", pipe)
        object.__setattr__(self, "int8", int8)

    @property
    def tvm_options(self) -> dict[str, Any]:
        """The TVM backend's keyword arguments."""
        return {
            "trials": self.trials,
            "minutes": self.tune_minutes,
            "database": self.database,
            "rpc": self.rpc,
            "progress": self.progress,
        }

    @property
    def backend_options(self) -> dict[str, Any]:
        """The keyword arguments of the backend asked for (TVM's; OpenVINO takes none)."""
        return self.tvm_options if self.backend == "tvm" else {}

    @graphopt_errors_only
    @fewer_torch_threads_when_loaded
    @with_dependency_notes
    @with_progress
    def optimize(
        self,
        model: nn.Module | str | Path | Any,
        example_inputs: Sequence[Any] | None = None,
        *,
        calibration_data: Iterable[Any] | None = None,
        metric: Callable[[Callable[..., Any]], float] | None = None,
        finetune: Callable[[fx.GraphModule], Any] | None = None,
        leaf_modules: Sequence[type[nn.Module]] = (),
        concrete_args: dict[str, Any] | None = None,
        dynamic_axes: Mapping[Any, Any] | None = None,
        name: str | None = None,
    ) -> OptimizedModel:
        """Optimize ``model`` (an ``nn.Module`` with ``example_inputs``, an ``.onnx`` path or a
        ``ModelProto``) and return an :class:`OptimizedModel`; the arguments mean what
        :func:`optimize`'s of the same name mean. The model passed in is never modified."""
        _check_model_data(calibration_data, metric, finetune)
        if self.int8:
            require_calibration(calibration_data)
        say = current()  # with_progress: on stderr when self.progress
        name = name or _model_name(model)
        ort, runtime = self._backends()
        say(f"capturing {name}")
        captured = capture(
            model,
            example_inputs,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            dynamic_axes=dynamic_axes,
        )
        original = copy.deepcopy(captured.graph)
        if self.int8:  # bad calibration data fails here, before any pass runs
            calibration_data = check_calibration(calibration_data, captured.example_inputs)
        baseline = Baseline.of(model, captured, ort, needed=self.verify or self.measure)
        check = self._check_capture(captured, baseline)
        ctx = self._context(captured, check, runtime, calibration_data, metric, finetune)
        say(f"running {len(self.parsed_pipeline)} passes: {self.parsed_pipeline}")
        passes = self.parsed_pipeline.instantiate()
        # int8's ONNX stage (passes with ir="onnx") runs on the export, in the lowering
        onnx_stage = [p for p in passes if p.ir == "onnx"]
        manager = PassManager([p for p in passes if p.ir == "fx"], strict=self.strict)
        result = manager.run(captured.graph, ctx)
        report = self._report(name, captured, original, result, runtime)
        check.attach(report)
        check.pipeline(result)
        lowering = Lowering(
            graph=result.graph,
            inputs=captured.example_inputs,
            # an ONNX model keeps its interface: input and output names as in the user's file
            input_names=captured.names,
            output_names=captured.graph.meta.get("onnx_output_names"),
            dynamic_axes=captured.dynamic_axes,
            original=original,
            manager=manager,
            result=result,
            check=check,
            report=report,
            target=self.parsed_target,
            say=say,
            context=ctx,
            onnx_stage=onnx_stage,
        )
        if self.verify:  # the outputs' dynamic axes, and the check at a second size
            dynamic.plan(
                lowering,
                baseline.reference_outputs,
                check.rounding.module,
                captured.graph.meta.get("onnx_output_shapes"),
            )
        say(f"lowering to {runtime.name}")
        runtime, artifact, quantization = self._lower(
            lowering, ort, runtime, calibration_data, metric
        )
        report_mobile(report, self.parsed_target, runtime)
        if self.measure:
            baseline.measure(lowering, ort, runtime, artifact)
        return result_of(artifact, lowering, captured, runtime, quantization)

    def _backends(self) -> tuple[Backend, Backend]:
        """ONNX Runtime (the baseline's) and the backend asked for (ONNX Runtime for "auto")."""
        current()(f"loading {self.backend} for {self.parsed_target}")  # TVM's import: seconds
        ort = get_backend("onnxruntime", self.parsed_target)
        if self.backend in ("tvm", "openvino"):
            return ort, get_backend(self.backend, self.parsed_target, **self.backend_options)
        return ort, ort

    def _check_capture(self, captured: Captured, baseline: Baseline) -> Check:
        """The checks of this run; with ``verify``, the captured graph is checked already."""
        check = Check(captured.check_inputs, self.accept_mismatch)
        check.rounding.measure = baseline.rounding  # for an ONNX model, ONNX Runtime's too
        if self.verify:
            current()("checking the capture: reference outputs and the model's float32 rounding")
            check.set_reference(
                baseline.reference_outputs(check.samples), baseline.reference_module(captured)
            )
            check.capture(captured)
        return check

    def _context(
        self,
        captured: Captured,
        check: Check,
        runtime: Backend,
        calibration_data: Any,
        metric: Any,
        finetune: Any,
    ) -> PassContext:
        """What the passes get: the samples their checks run on, the model's own rounding, the
        calibration data and callbacks, the target and its backend, the instruments."""
        ctx = PassContext(
            sample_inputs=captured.example_inputs if self.verify else None,
            extra_sample_inputs=check.samples[1:] if self.verify else [],
            rounding=check.rounding.value,
            calibration_data=calibration_data,
            finetune=finetune,
            metric=metric,
            target=self.parsed_target,
            backend=runtime,
            strict=self.strict,
            verify=self.verify,
            # measure: the latency after each pass that changed the model, too (not where the
            # baseline measurement would not use the copies: TVM, a phone or board)
            instruments=[Reproducer(), *([Snapshots()] * self._per_pass), *self.instruments],
        )
        if self.progress:
            ctx.instruments.append(PrintTiming(total=len(self.parsed_pipeline), progress=current()))
        return ctx

    @property
    def _per_pass(self) -> bool:
        """Whether the run times the model after each pass (``Baseline.measure``)."""
        return self.measure and self.backend != "tvm" and self.parsed_target.device != "mobile"

    def _report(
        self,
        name: str,
        captured: Captured,
        original: fx.GraphModule,
        result: PipelineResult,
        runtime: Backend,
    ) -> Report:
        return Report(
            model=name,
            target=str(self.parsed_target),
            backend=runtime.name,
            backend_version=runtime.version,
            pipeline=str(self.parsed_pipeline),
            capture_method=captured.method,
            capture_notes=list(captured.notes),
            records=result.records,
            ops_before=dict(op_counts(original)),
            ops_after=dict(op_counts(result.graph)),
            graph_error=result.end_to_end,
            threads=runtime.threads,
        )

    def _lower(
        self,
        lowering: Lowering,
        ort: Backend,
        runtime: Backend,
        calibration: list | None,
        metric: Any,
    ) -> tuple[Backend, Artifact, Any]:
        """The artifact: int8, or fp32 on the asked backend or the faster one. Returns the
        backend that made it, the artifact and the int8 report (None for fp32)."""
        report = lowering.report
        if self.int8:
            artifact, quantization = lower_int8(lowering, runtime, calibration, metric)
            if self.backend == "auto":  # ONNX Runtime's settings against OpenVINO's hints
                runtime, artifact = choose_int8_backend(lowering, ort, artifact, self.measure)
            return runtime, artifact, quantization
        artifact = lower(lowering, runtime)
        if self.backend == "auto":
            runtime, artifact = choose_backend(
                lowering, ort, artifact, self.tvm_options, self.measure
            )
        elif runtime.name == "tvm":
            report_tvm(report, artifact)
        return runtime, artifact, None


def _check_options(options: Optimizer) -> None:
    """Refuse impossible option values before any heavy work, each with what to pass."""
    trials, tune_minutes, max_drop = options.trials, options.tune_minutes, options.max_drop
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 0:
        raise ArgumentError(f"trials must be an integer >= 0 (0: no tuning), got {trials!r}.")
    if tune_minutes is not None and (
        isinstance(tune_minutes, bool)
        or not isinstance(tune_minutes, numbers.Real)
        or not math.isfinite(tune_minutes)
        or tune_minutes <= 0
    ):
        raise ArgumentError(
            f"tune_minutes must be a finite number of minutes > 0 (or None), got {tune_minutes!r}."
        )
    if max_drop is not None and (
        isinstance(max_drop, bool)
        or not isinstance(max_drop, numbers.Real)
        or not math.isfinite(max_drop)
        or max_drop < 0
    ):
        raise ArgumentError(
            f"max_drop must be a number >= 0, a drop of the metric (e.g. 0.01), got {max_drop!r}."
        )
    if options.database is not None:
        _check_database(options.database)
    for inst in options.instruments:
        if not isinstance(inst, Instrument):
            raise ArgumentError(
                f"instruments must be graphopt.pipeline.Instrument instances (PrintIR(), "
                f"DumpIR(dir), ...), got a {type(inst).__name__}."
            )


def _check_database(database: Any) -> None:
    """TVM's tuning database is a directory: created if missing, refused if it can't be."""
    if not isinstance(database, str | Path):
        raise ArgumentError(f"database must be a directory path, got {type(database).__name__}.")
    path = Path(database)
    if path.exists() and not path.is_dir():
        raise ArgumentError(
            f"database={str(database)!r} is a file; TVM's tuning database is a directory. "
            "Pass a directory (it is created if missing)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(
            f"cannot create the tuning database directory {str(database)!r}: "
            f"{exc.strerror or exc}; pass a writable directory."
        ) from exc


def _check_model_data(calibration_data: Any, metric: Any, finetune: Any) -> None:
    """Refuse a model's data of the wrong kind before any heavy work."""
    for label, fn in (("metric", metric), ("finetune", finetune)):
        if fn is not None and not callable(fn):
            raise ArgumentError(f"{label} must be a callable, got a {type(fn).__name__}.")
    if calibration_data is not None and (
        isinstance(calibration_data, str | bytes) or not isinstance(calibration_data, Iterable)
    ):
        raise ArgumentError(
            "calibration_data must be an iterable of input batches, e.g. [(x1,), (x2,)], got "
            f"a {type(calibration_data).__name__}."
        )


def _model_name(model: Any) -> str:
    if isinstance(model, nn.Module):
        return type(model).__name__
    if isinstance(model, str | Path):
        return Path(model).name
    return "onnx-model"

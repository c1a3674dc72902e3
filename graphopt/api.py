"""``optimize()``: the one call, and the ``OptimizedModel`` it returns.

capture -> PassManager (verified per pass) -> backend artifact -> end-to-end check -> latency
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from graphopt._util import close_matches
from graphopt.backends import get_backend
from graphopt.backends.measure import time_interleaved
from graphopt.backends.onnxruntime import to_numpy
from graphopt.core.numerics import (
    Numerics,
    Rounding,
    exact_tolerance,
    run_module,
    run_samples,
    sample_labels,
)
from graphopt.core.options import format_value
from graphopt.core.pass_infra import PassContext
from graphopt.core.progress import Progress
from graphopt.errors import (
    ArgumentError,
    BackendError,
    GraphoptError,
    InputError,
    VerificationError,
    graphopt_errors_only,
)
from graphopt.frontends.torch import Captured, InputSpec, capture, set_eval
from graphopt.pipeline import (
    Instrument,
    PassManager,
    PassSpec,
    Pipeline,
    PrintTiming,
    Reproducer,
    parse_pipeline,
)
from graphopt.report import Report, op_counts
from graphopt.target import Target

log = logging.getLogger(__name__)


SAVE_SUFFIXES = {"onnxruntime": (".onnx", ".ort"), "tvm": (".so",)}
BACKEND_CHOICES = ("onnxruntime", "tvm", "auto")
PRECISIONS = ("fp32", "int8")
# equalize-layers for int8: repvgg_a0's 22-conv chain does not converge in the pass's default
# 100 sweeps (about 20 s there); the ranges even out in the first sweeps, 20 keep most of it
INT8_EQUALIZE = PassSpec("equalize-layers", (("max_sweeps", "20"),))


class OptimizedModel:
    """The result of :func:`optimize`: callable like the original model, savable, with a report.

    Call it with torch tensors (returns tensors) or numpy arrays (returns arrays). The batch
    dimension is dynamic; every other dimension and the dtype must match the example inputs.
    With ``precision="int8"`` the artifact (what runs and what ``save`` writes) is the int8 QDQ
    ONNX model, ``quantization`` its :class:`~graphopt.quant.improve.Int8Report` (which layers
    are int8, which stayed float and why, the metric drop), and ``graph_module`` the float graph
    it was quantised from.
    """

    def __init__(
        self,
        artifact: Any,
        graph_module: fx.GraphModule,
        report: Report,
        inputs: list[InputSpec],
        backend: Any,
        quantization: Any = None,
    ) -> None:
        self.artifact = artifact
        self.graph_module = graph_module
        self.report = report
        self.inputs = inputs
        self.backend = backend
        self.quantization = quantization

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise :class:`InputError` unless ``args`` fit the optimized model's inputs."""
        if len(args) != len(self.inputs):
            raise InputError(
                f"the model takes {len(self.inputs)} input(s) "
                f"({'; '.join(s.describe() for s in self.inputs)}), got {len(args)}."
            )
        for i, (spec, x) in enumerate(zip(self.inputs, args, strict=True)):
            if not isinstance(x, torch.Tensor | np.ndarray):
                raise InputError(
                    f"input {i} is a {type(x).__name__}; pass a torch tensor or a numpy array."
                )
            shape = tuple(x.shape)
            ok = len(shape) == len(spec.shape) and all(
                want is None or want == got for want, got in zip(spec.shape, shape, strict=True)
            )
            dtype = (
                x.dtype
                if isinstance(x, torch.Tensor)
                else torch.from_numpy(np.empty(0, dtype=x.dtype)).dtype
            )
            if not ok or dtype != spec.dtype:
                got = f"{str(dtype).replace('torch.', '')}{list(shape)}"
                free = " (N = any batch size)" if None in spec.shape else ""
                raise InputError(
                    f"input {i} should be {spec.describe()}{free}, got {got}. The model was "
                    "optimized for that shape; re-run optimize() with example inputs of the new "
                    "shape."
                )

    @graphopt_errors_only
    def __call__(self, *args: Any) -> Any:
        self.check_inputs(args)
        as_torch = any(isinstance(x, torch.Tensor) for x in args)
        arrays = [to_numpy(x) for x in args]
        outputs = self.artifact.run(arrays)
        if as_torch:
            outputs = [torch.from_numpy(np.asarray(o)) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @graphopt_errors_only
    def save(self, path: str | Path) -> Path:
        """Write the deployable artifact.

        ONNX Runtime: ``.onnx``, or ``.ort`` (ONNX Runtime's mobile format, with the operator
        list and XNNPACK session settings beside it). TVM: ``.so``, a shared library with the
        weights embedded that ``tvm.runtime.load_module`` + ``relax.VirtualMachine`` run.
        """
        if not isinstance(path, str | Path):
            raise ArgumentError(
                f"save() takes a file path (str or pathlib.Path), got {type(path).__name__}."
            )
        path = Path(path)
        suffixes = SAVE_SUFFIXES[self.report.backend]
        if path.suffix not in suffixes:
            raise GraphoptError(
                f"the {self.report.backend} backend saves {' or '.join(suffixes)} files; name "
                f"the output accordingly (got {path.name!r})."
            )
        try:
            return self.artifact.save(path)
        except OSError as exc:  # every backend: an unwritable place is the user's to fix
            raise GraphoptError(
                f"cannot write {path}: {exc.strerror or exc}; choose a writable directory."
            ) from exc

    def __repr__(self) -> str:
        return (
            f"<OptimizedModel {self.report.model} on {self.report.target} ({self.report.backend})>"
        )


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
    instruments: Sequence[Instrument] = (),
    progress: bool = False,
    name: str | None = None,
    accept_mismatch: bool = False,
) -> OptimizedModel:
    """Optimize ``model`` for ``target`` and return an :class:`OptimizedModel`.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``.onnx`` path or a
    ``ModelProto``. ``pipeline``: a pipeline string, default the target's
    (``graphopt passes`` lists them). ``verify``: check every pass and the final artifact on the
    example inputs. ``strict``: raise instead of rolling a pass back. ``measure``: time the
    artifact against ONNX Runtime on the unrewritten export. The model passed in is never
    modified.

    ``backend``: ``"onnxruntime"`` (default), ``"tvm"`` (needs ``graphopt[tvm]``) or
    ``"auto"``: ONNX Runtime with session settings picked by measurement, against TVM when TVM
    is tuned for the model (or ``trials``/``tune_minutes`` ask to tune it); the faster one is
    kept and the report shows both. ``trials`` / ``tune_minutes``: TVM's MetaSchedule budget;
    ``database``: its tuning database directory (default: one per target in the cache
    directory, reused by later runs). ``rpc``: ``"host:port/key"`` of a device registered at a
    TVM RPC tracker, where TVM tunes, runs and measures.

    ``calibration_data``: input tuples for passes that calibrate (``substitute-monarch``
    measures each substitute's error on them; ``insert-qdq`` calibrates int8 on them): batches,
    each a tuple of tensors / arrays in input order whose first axis is the samples.

    ``precision="int8"``: the target's pipeline gets ``fold-conv-bn`` and ``reparameterize``
    (where missing), then ``equalize-layers`` and ``insert-qdq``, in that order; the ONNX
    export is calibrated on ``calibration_data`` (required), improved (SmoothQuant, bias
    correction) and quantised to a QDQ model whose Conv/Gemm/MatMul ONNX Runtime runs as integer
    kernels. ``max_drop``: the metric drop allowed against fp32; layers are kept in float, the
    most sensitive first, until the drop is within it (default: no fallback, the drop is only
    reported). ``metric``: ``metric(predict) -> score`` (higher is better), where
    ``predict(*arrays)`` runs a model on numpy inputs, e.g. held-out accuracy; default: top-1
    agreement with fp32 on the calibration data (output cosine for non-classifier outputs).
    ``merge-convs{budget=...}`` ranks the activations it may remove by the same ``metric``
    (default: the output error on ``calibration_data``). ``finetune``:
    ``callable(graph_module)`` that a lossy pass runs on the graph after changing it, e.g. a few
    epochs of training after ``substitute-monarch`` or, after ``merge-convs{budget=...}`` fixed
    the architecture, before its final merge (the verification after that pass then compares
    the fine-tuned graph).

    ``verify``: every check runs on the example inputs and, where one of them is constant (all
    zeros...), on a seeded random input of the same shape too; exact contracts allow the
    model's own float32 rounding (measured against a float64 run) where that is larger than
    ``1e-5 x max|output|``. A check that fails at capture or on the final artifact raises
    :class:`VerificationError` naming the stage at fault (capture, a pass, export, backend);
    ``accept_mismatch=True`` (for experts) returns the artifact anyway, with the mismatch in
    ``report.warnings``. Only :class:`GraphoptError` subclasses escape ``optimize``.

    >>> result = optimize(model, "cpu", example_inputs=(x,))
    >>> print(result.report)
    >>> result.save("model.onnx")
    """
    _check_arguments(trials, tune_minutes, database, max_drop, instruments, metric, finetune)
    if calibration_data is not None and (
        isinstance(calibration_data, str | bytes) or not isinstance(calibration_data, Iterable)
    ):
        raise ArgumentError(
            "calibration_data must be an iterable of input batches, e.g. [(x1,), (x2,)], got "
            f"a {type(calibration_data).__name__}."
        )
    say = Progress(progress)
    tgt = Target.parse(target)  # bad strings fail before any heavy work
    pipe = parse_pipeline(pipeline if pipeline is not None else tgt.default_pipeline)
    if backend not in BACKEND_CHOICES:
        raise BackendError(
            f"unknown backend {backend!r}."
            + close_matches(str(backend), BACKEND_CHOICES)
            + f" Choose one of: {', '.join(BACKEND_CHOICES)}."
        )
    int8 = _check_precision(precision, pipe, calibration_data, backend, max_drop, metric)
    if precision == "int8":
        pipe = int8_pipeline(pipe, max_drop)
    elif int8 and max_drop is not None:
        pipe = int8_pipeline(pipe, max_drop, complete=False)
    tvm_options = {
        "trials": trials,
        "minutes": tune_minutes,
        "database": database,
        "rpc": rpc,
        "progress": progress,
    }
    ort = get_backend("onnxruntime", tgt)
    runtime = get_backend("tvm", tgt, **tvm_options) if backend == "tvm" else ort
    say(f"capturing {name or _model_name(model)}")
    captured = capture(
        model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
    )
    inputs = captured.example_inputs
    samples = captured.check_inputs
    original = copy.deepcopy(captured.graph)
    if int8:  # bad calibration data fails here, before any pass runs
        from graphopt.quant.calibration import validate_calibration_batches

        calibration_data = list(validate_calibration_batches(calibration_data, inputs))
        if not calibration_data:
            raise InputError(
                "the calibration data is empty; pass batches of representative inputs "
                "(a few hundred samples)."
            )
    # the ground truth: the user's module itself, or ONNX Runtime on the user's ONNX file
    onnx_original = _load_original_onnx(ort, model) if captured.method == "onnx" else None
    # one eval-mode copy of the user's module serves as reference and as the baseline export
    user_model = (
        copy.deepcopy(model).eval() if onnx_original is None and (verify or measure) else None
    )
    check = _Check(samples, accept_mismatch)
    if verify:
        check.set_reference(
            _reference_outputs(user_model, samples, onnx_original),
            user_model if user_model is not None else copy.deepcopy(captured.graph),
        )
        check.capture(captured)
    ctx = PassContext(
        sample_inputs=inputs if verify else None,
        extra_sample_inputs=samples[1:] if verify else [],
        rounding=check.rounding.value,
        calibration_data=calibration_data,
        finetune=finetune,
        metric=metric,
        target=tgt,
        backend=runtime,
        strict=strict,
        verify=verify,
        instruments=[Reproducer()] + list(instruments),
    )
    if progress:
        ctx.instruments.append(PrintTiming(total=len(pipe)))
    say(f"running {len(pipe)} passes: {pipe}")
    manager = PassManager(pipe, strict=strict)
    result = manager.run(captured.graph, ctx)
    gm = result.graph
    # an ONNX model keeps its interface: input and output names as in the user's file
    input_names = captured.graph.meta.get("onnx_input_names") or [s.name for s in captured.inputs]
    output_names = captured.graph.meta.get("onnx_output_names")
    report = Report(
        model=name or _model_name(model),
        target=str(tgt),
        backend=runtime.name,
        backend_version=runtime.version,
        pipeline=str(pipe),
        capture_method=captured.method,
        capture_notes=list(captured.notes),
        records=result.records,
        ops_before=dict(op_counts(original)),
        ops_after=dict(op_counts(gm)),
        graph_error=result.end_to_end,
        threads=getattr(runtime, "threads", 0),
    )
    check.attach(report)
    check.pipeline(result)
    lowering = _Lowering(gm, inputs, input_names, original, manager, result, check, report, say)
    lowering.output_names = output_names
    say(f"lowering to {runtime.name}")
    quantization = None
    if int8:
        artifact, quantization = lowering.lower_int8(runtime, calibration_data, metric)
        if backend == "auto":  # TVM has no integer kernels for the QDQ graph: never faster
            report.backend_choice = (
                "onnxruntime: int8 QDQ models are lowered to ONNX Runtime's integer kernels"
            )
    else:
        artifact = lowering.lower(runtime)
        if backend == "auto":
            runtime, artifact = _choose_backend(
                lowering, ort, artifact, tvm_options, measure, tgt, say
            )
        elif runtime.name == "tvm":
            _report_tvm(report, artifact)
    _report_mobile(report, tgt, runtime)
    if measure:
        _measure(report, lowering, ort, runtime, artifact, user_model, captured, onnx_original, say)
    specs = captured.inputs
    # TVM compiles static shapes; an ONNX Runtime artifact may have had to fix its batch
    if runtime.name == "tvm" or getattr(artifact, "static_batch_reason", None):
        specs = [
            dataclasses.replace(s, shape=tuple(x.shape)) for s, x in zip(specs, inputs, strict=True)
        ]
    set_eval(gm)  # what graphopt returns is in eval mode, whatever the input was
    return OptimizedModel(artifact, gm, report, specs, runtime, quantization)


def _check_arguments(trials, tune_minutes, database, max_drop, instruments, metric, finetune):
    """Refuse impossible argument values before any heavy work, each with what to pass."""
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
    if database is not None:
        if not isinstance(database, str | Path):
            raise ArgumentError(
                f"database must be a directory path, got {type(database).__name__}."
            )
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
    for inst in instruments:
        if not isinstance(inst, Instrument):
            raise ArgumentError(
                f"instruments must be graphopt.pass_manager.Instrument instances (PrintIR(), "
                f"DumpIR(dir), ...), got a {type(inst).__name__}."
            )
    for label, fn in (("metric", metric), ("finetune", finetune)):
        if fn is not None and not callable(fn):
            raise ArgumentError(f"{label} must be a callable, got a {type(fn).__name__}.")


class _Check:
    """The end-to-end checks of one ``optimize`` run: reference outputs on every sample, the
    model's float32 rounding, and what happens when a stage breaks the contract."""

    def __init__(self, samples: list[tuple], accept_mismatch: bool) -> None:
        self.samples = samples
        self.accept = accept_mismatch
        self.reference: list[torch.Tensor] | None = None
        self.rounding = Rounding()
        self.labels: list[str] | None = None
        self.warnings: list[str] = []
        self.report: Report | None = None

    def set_reference(self, reference: list[torch.Tensor], module: nn.Module) -> None:
        """The user's model's outputs on the samples; ``module`` computes them (the model, or
        the imported graph of an ONNX file) and gives the float32 rounding when it is needed."""
        self.reference = reference
        self.labels = sample_labels(len(reference) // len(self.samples), len(self.samples))
        self.rounding.module, self.rounding.samples = module, self.samples
        self.rounding.reference = reference

    def compare(self, outputs: list[torch.Tensor], numerics: Numerics) -> Any:
        return self.rounding.compare(self.reference, outputs, numerics, self.labels)

    def capture(self, captured: Captured) -> None:
        """The captured graph, before any pass, must compute what the user's model computes."""
        error = self.compare(run_samples(captured.graph, self.samples), Numerics.exact())
        if not error.ok:
            what = "importing the ONNX model" if captured.method == "onnx" else captured.method
            self.fail(
                "capture",
                f"the captured graph ({what}) differs from the model before any pass ran: "
                f"{error.describe()}. Capture is at fault: report it with the model; "
                "leaf_modules=[...] keeps the offending module opaque.",
                error,
            )

    def pipeline(self, result: Any) -> None:
        """Each pass is checked and rolled back alone; the passes together must hold too."""
        error = result.end_to_end
        if error is not None and not error.ok:
            self.fail(
                "pipeline",
                "every pass kept its own contract, but together they moved the outputs beyond "
                f"the pipeline's contract: {error.describe()}. Drop passes from the pipeline "
                "to find the combination (PassManager with strict=True shows each step).",
                error,
            )

    def attach(self, report: Report) -> None:
        self.report = report
        report.warnings += self.warnings

    def fail(self, stage: str, message: str, error: Any) -> None:
        """Raise :class:`VerificationError` naming ``stage``, or with ``accept_mismatch`` warn."""
        log.warning(message)
        if self.report is not None:
            self.report.warnings.append(message)
        else:
            self.warnings.append(message)
        if self.accept:
            return
        exc = VerificationError(
            message + " (accept_mismatch=True returns the artifact anyway, with this warning.)",
            output=error.output,
            measured=error.measured,
            allowed=error.allowed,
            stage=stage,
        )
        exc.report = self.report
        raise exc


def int8_pipeline(
    pipe: Pipeline, max_drop: float | None = None, *, complete: bool = True
) -> Pipeline:
    """The pipeline ``optimize(precision="int8")`` runs: ``pipe`` with ``fold-conv-bn`` and
    ``reparameterize`` added where missing, then ``equalize-layers``, then ``insert-qdq`` last.

    Re-parameterise before quantising: a multi-branch block collapses into one conv whose
    merged weights are rounded once; quantising the branches first rounds each branch and then
    the merged kernel again (``tests/test_int8_api.py`` measures both on ``repvgg_a0``).
    Equalise after re-parameterising (it needs the single convs) and before quantising (it
    evens out the per-channel ranges the int8 scales see). ``max_drop`` is set on
    ``insert-qdq``. ``complete=False`` only sets ``max_drop`` on the pipeline's own pass.
    """
    qdq = next((s for s in pipe if s.name == "insert-qdq"), PassSpec("insert-qdq"))
    if max_drop is not None:
        options = tuple((k, v) for k, v in qdq.options if k != "max_drop")
        qdq = PassSpec("insert-qdq", (*options, ("max_drop", format_value(float(max_drop)))))
    if not complete:
        return Pipeline(tuple(qdq if s.name == "insert-qdq" else s for s in pipe))
    specs = [s for s in pipe if s.name not in ("equalize-layers", "insert-qdq")]
    for needed in ("fold-conv-bn", "reparameterize"):
        if needed not in [s.name for s in specs]:
            specs.append(PassSpec(needed))
    equalize = next((s for s in pipe if s.name == "equalize-layers"), INT8_EQUALIZE)
    return Pipeline((*specs, equalize, qdq))


def _check_precision(precision, pipe, calibration_data, backend, max_drop, metric) -> bool:
    """Whether this run quantises to int8; raises on an inconsistent request."""
    if precision not in PRECISIONS:
        raise GraphoptError(
            f"unknown precision {precision!r}; use 'fp32' (default) or 'int8'."
            + close_matches(str(precision), PRECISIONS)
        )
    int8 = precision == "int8" or any(s.name == "insert-qdq" for s in pipe)
    if not int8:
        if max_drop is not None:
            raise GraphoptError("max_drop applies to int8 quantisation; pass precision='int8' too.")
        return False
    if calibration_data is None:
        raise InputError(
            "int8 quantisation needs calibration data: pass calibration_data=[(x,), ...], "
            "batches of inputs representative of deployment (a few hundred samples in all; "
            "from the CLI, --calibration data.npz)."
        )
    return True


class _Lowering:
    """Lowers the rewritten graph to a backend and checks the artifact against the model."""

    def __init__(self, gm, inputs, input_names, original, manager, result, check, report, say):
        self.gm = gm
        self.inputs = inputs
        self.input_names = input_names
        self.output_names: list[str] | None = None
        self.original = original
        self.manager = manager
        self.result = result
        self.check = check
        self.reference = check.reference
        self.report = report
        self.say = say
        self.errors: dict[str, Any] = {}  # backend name -> Comparison of its artifact

    def lower_int8(self, runtime: Any, calibration: list, metric: Any) -> tuple[Any, Any]:
        """Export, quantise with the options of the pipeline's ``insert-qdq`` and load in ONNX
        Runtime; check the int8 artifact against the model under that pass's contract."""
        from graphopt.backends.onnxruntime import export_onnx
        from graphopt.passes.insert_qdq import InsertQDQ
        from graphopt.quant.improve import quantize_int8

        position = max(i for i, p in enumerate(self.manager.passes) if isinstance(p, InsertQDQ))
        record = self.result.records[position]
        if record.status not in ("ok", "unverified"):
            raise GraphoptError(f"insert-qdq {record.status}: {record.message}")
        o = self.manager.passes[position].options
        proto = export_onnx(self.gm, self.inputs, **self.names)
        qproto, quant = quantize_int8(
            proto,
            calibration,
            method=o.method,
            activations=o.activations,
            smoothquant=o.smoothquant,
            alpha=o.alpha,
            correct_bias=o.bias_correction,
            max_drop=o.max_drop,
            metric=metric,
            progress=self.say,
        )
        artifact = runtime.load(qproto, [tuple(x.shape) for x in self.inputs])
        if runtime.name == "tvm":
            from graphopt.backends.tvm import qdq_import_summary

            record.decisions = [*record.decisions, qdq_import_summary(artifact.imported_ops)]
            _report_tvm(self.report, artifact)
        record.modified = True
        record.stats = {
            **record.stats,
            "int8": len(quant.int8_layers),
            "float": len(quant.float_layers),
        }
        record.decisions = [*record.decisions, *quant.lines()]
        if quant.max_drop is not None and quant.drop > quant.max_drop:
            self.report.warnings.append(
                f"int8: {quant.metric} drop {quant.drop:.4g} is above max_drop "
                f"{quant.max_drop:g} even with {len(quant.fallback)} layers in float."
            )
        if self.reference is None:
            return artifact, quant
        error = self.errors[runtime.name] = self.check.compare(
            self.run(artifact), InsertQDQ.numerics
        )
        self.report.artifact_error = error
        if not error.ok:
            self.check.fail(
                "insert-qdq",
                f"the int8 artifact is further from the model than insert-qdq's contract "
                f"{InsertQDQ.numerics} allows: {error.describe()}. Use more representative "
                "calibration data, set max_drop, or skip the worst layers.",
                error,
            )
        return artifact, quant

    @property
    def names(self) -> dict[str, Any]:
        """The interface names every export and compile of this model keeps."""
        return {"input_names": self.input_names, "output_names": self.output_names}

    def run(self, artifact: Any) -> list[torch.Tensor]:
        """The artifact's outputs on every check sample, concatenated."""
        return [
            torch.from_numpy(np.asarray(o))
            for sample in self.check.samples
            for o in artifact.run([to_numpy(x) for x in sample])
        ]

    def lower(self, runtime: Any) -> Any:
        """Compile for ``runtime``; verify (and on a disagreement bisect) unless it can't run."""
        artifact = runtime.compile(self.gm, self.inputs, **self.names)
        if reason := getattr(artifact, "static_batch_reason", None):
            batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].dim() else "?"
            self.report.warnings.append(
                f"the {runtime.name} artifact runs batch {batch} only (the example's): a dynamic "
                f"batch did not lower ({reason})."
            )
        if self.reference is None:
            return artifact
        if getattr(artifact, "cross_compiled", False) and getattr(artifact, "rpc", None) is None:
            self.report.warnings.append(
                f"the {runtime.name} artifact is cross-compiled for {self.report.target} and was "
                "not run: pass rpc='host:port/key' to check its numbers on the device."
            )
            return artifact
        error = self.errors[runtime.name] = self.check.compare(
            self.run(artifact), _artifact_numerics(self.result)
        )
        if runtime.name == self.report.backend:
            self.report.artifact_error = error
        if not error.ok:
            self.say("the artifact disagrees with the model: bisecting the pipeline")
            quiet = runtime.without_tuning() if hasattr(runtime, "without_tuning") else runtime
            stage, diagnosis = _bisect_lowering(quiet, self, _artifact_numerics(self.result))
            self.report.artifact_diagnosis = diagnosis
            self.check.fail(
                stage,
                f"the {runtime.name} artifact differs from the original model beyond the "
                f"pipeline's contract: {error.describe()}. The rewritten graph itself was "
                f"within its contract. {diagnosis}",
                error,
            )
        return artifact


def _report_tvm(report: Report, artifact: Any) -> None:
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


def _report_mobile(report: Report, tgt: Target, runtime: Any) -> None:
    if tgt.device == "mobile" and runtime.name == "onnxruntime":
        report.mobile = (
            "mobile: save('model.ort') writes ONNX Runtime's mobile format with the operator "
            "list for a reduced build and XNNPACK session settings beside it."
        )


def _choose_backend(lowering, ort, ort_artifact, tvm_options, measure, tgt, say):
    """backend='auto': ORT with measured session settings against TVM when TVM is tuned."""
    report = lowering.report
    arrays = [to_numpy(x) for x in lowering.inputs]
    if measure and tgt.device != "mobile":
        say("picking ONNX Runtime session settings by measurement")
        choice = ort.select_settings(ort_artifact, arrays)
        report.ort_settings = {**choice.best, "label": choice.label}
        report.ort_settings_latencies = dict(choice.timings)
        ort = ort.with_settings(**choice.best)
        ort_artifact = ort.load(ort_artifact.proto)
        report.threads = ort.threads
    try:
        tvm_backend = get_backend("tvm", tgt, **tvm_options)
    except BackendError as exc:
        report.warnings.append(f"TVM not considered: {exc}")
        return ort, ort_artifact
    say("lowering to tvm")
    tvm_artifact = lowering.lower(tvm_backend)
    if tvm_artifact.tuning is not None:
        report.tvm_tuning = {
            **tvm_artifact.tuning.to_dict(),
            "summary": tvm_artifact.tuning.describe(),
        }
    tvm_error = lowering.errors.get("tvm")
    if tvm_error is not None and not tvm_error.ok:
        report.backend_choice = "onnxruntime: the TVM artifact disagrees with the model"
        return ort, ort_artifact
    if heavy := tvm_artifact.heavy_untuned:
        report.backend_choice = (
            f"onnxruntime: TVM is not tuned for this model ({len(heavy)} compute-heavy tasks "
            "untuned); pass trials=N or tune_minutes=M to tune and compare"
        )
        if tvm_artifact.tuning is not None:
            report.warnings += tvm_artifact.tuning.warnings
        return ort, ort_artifact
    if not measure or tgt.device == "mobile" and tvm_backend.rpc is None:
        report.backend_choice = "onnxruntime: not measured, so TVM could not be compared"
        return ort, ort_artifact
    say("measuring onnxruntime against tvm")
    timings = time_interleaved(
        {
            "onnxruntime": lambda: ort_artifact.run(arrays),
            "tvm": lambda: tvm_artifact.run(arrays),
        },
        warmup=5,
        runs=30,
        max_time_s=20.0,
    )
    report.backend_latencies = timings
    winner = min(timings, key=lambda k: timings[k].median_ms)
    report.backend_choice = f"{winner} (faster in the same run)"
    if winner == "tvm":
        report.backend, report.backend_version = "tvm", tvm_backend.version
        report.artifact_error = tvm_error or report.artifact_error
        _report_tvm(report, tvm_artifact)
        return tvm_backend, tvm_artifact
    return ort, ort_artifact


def _model_name(model: Any) -> str:
    if isinstance(model, nn.Module):
        return type(model).__name__
    if isinstance(model, str | Path):
        return Path(model).name
    return "onnx-model"


def _load_original_onnx(runtime: Any, model: Any) -> Any:
    from graphopt.frontends.onnx import load_onnx

    return runtime.load(load_onnx(model))


def _reference_outputs(
    user_model: nn.Module | None, samples: list[tuple], onnx_original: Any
) -> list[torch.Tensor]:
    """Outputs of the user's model itself (its eval copy / ONNX Runtime on the user's file) on
    every check sample, concatenated."""
    if onnx_original is not None:
        return [
            torch.from_numpy(np.asarray(o))
            for sample in samples
            for o in onnx_original.run([to_numpy(x) for x in sample])
        ]
    # copies: a model that writes to its inputs was refused at capture; these are ours anyway
    return [t for sample in samples for t in run_module(user_model, [x.clone() for x in sample])]


def _artifact_numerics(result: Any) -> Numerics:
    lossy = [
        r
        for r in result.records
        if r.modified and r.status == "ok" and r.numerics.startswith("lossy")
    ]
    if lossy and result.end_to_end is not None:
        # a lossy pipeline: the artifact may differ as much as the graph did, and rounding
        return Numerics.lossy(
            "max_abs",
            result.end_to_end.details.get("max_abs", 0.0) * 1.01 + exact_tolerance(torch.ones(1)),
        )
    return Numerics.exact()


def _bisect_lowering(runtime: Any, lowering: _Lowering, numerics: Numerics) -> tuple[str, str]:
    """Find the stage at which the lowered artifact first disagrees with the model.

    Binary search over prefixes of the passes that changed the graph: each probe re-runs the
    prefix on a copy of the captured graph, lowers it and compares. A disagreement already at
    prefix 0 means the export or the backend is at fault, not a pass; which one is told apart
    by running the same export in ONNX's reference evaluator (and, for TVM, in ONNX Runtime).
    Returns ``(stage, diagnosis)``.
    """
    applied = [
        p
        for p, r in zip(lowering.manager.passes, lowering.result.records, strict=True)
        if r.status == "ok" and r.modified
    ]

    def graph(k: int) -> fx.GraphModule:
        gm = copy.deepcopy(lowering.original)
        return PassManager(applied[:k], verify=False).run(gm, PassContext()).graph

    def agrees(k: int, backend: Any = runtime) -> bool:
        try:
            artifact = backend.compile(graph(k), lowering.inputs, **lowering.names)
            return lowering.check.compare(lowering.run(artifact), numerics).ok
        except GraphoptError:
            return False

    if not agrees(0):
        return _blame_lowering(runtime, lowering, graph(0), numerics, agrees)
    lo, hi = 0, len(applied)  # agrees(lo) is true, agrees(hi) is false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if agrees(mid) else (lo, mid)
    culprit = applied[hi - 1]
    return f"pass {culprit.name}", (
        f"Bisection: the lowered artifact first disagrees after pass {culprit} (the graph "
        f"agreed in torch, so that rewrite does not survive lowering to {runtime.name})."
    )


def _blame_lowering(runtime, lowering, gm, numerics, agrees) -> tuple[str, str]:
    """The unrewritten graph disagrees once lowered: the exporter's or the backend's fault?"""
    if runtime.name != "onnxruntime":
        ort = get_backend("onnxruntime", Target.parse(lowering.report.target))
        if agrees(0, ort):
            return f"backend {runtime.name}", (
                f"The unrewritten graph already disagrees once lowered to {runtime.name}, while "
                f"ONNX Runtime runs it right: the {runtime.name} backend is at fault, not a pass."
            )
    from graphopt.backends.onnxruntime import export_onnx

    try:
        from onnx.reference import ReferenceEvaluator

        proto = export_onnx(gm, lowering.inputs, **lowering.names)
        evaluator = ReferenceEvaluator(proto)
        names = [i.name for i in proto.graph.input]
        got = [
            torch.from_numpy(np.asarray(o))
            for sample in lowering.check.samples
            for o in evaluator.run(
                None, {n: to_numpy(x) for n, x in zip(names, sample, strict=False)}
            )
        ]
        export_ok = lowering.check.compare(got, numerics).ok
    except Exception:  # noqa: BLE001 - the reference evaluator lacks ops: cannot tell
        return "export or backend", (
            f"The unrewritten graph already disagrees once lowered to {runtime.name}: the ONNX "
            "export or the backend is at fault, not a pass (ONNX's reference evaluator could "
            "not run the export to tell which)."
        )
    if export_ok:
        return "backend onnxruntime", (
            "The unrewritten graph already disagrees once lowered: its ONNX export is right "
            "(ONNX's reference evaluator agrees with the model), ONNX Runtime runs it wrong."
        )
    return "export", (
        "The unrewritten graph already disagrees once lowered: its ONNX export computes "
        "something else (ONNX's reference evaluator disagrees with the model too); the "
        "export is at fault, not a pass."
    )


def _measure(report, lowering, ort, runtime, artifact, user_model, captured, onnx, say):
    """Latency of ONNX Runtime on the unrewritten model and of graphopt's artifact, interleaved.

    The baseline is what a user gets without graphopt: ``torch.onnx.export`` of their module
    (or their ONNX file) in ONNX Runtime, whichever backend graphopt lowered to. A phone or
    board is measured through its RPC device when there is one, without a baseline.
    """
    tgt = Target.parse(report.target)
    if runtime.name == "tvm" and runtime.rpc is not None:
        say(f"measuring on the RPC device {runtime.rpc.describe()}")
        report.latency_optimized = runtime.measure(artifact, captured.example_inputs)
        report.baseline_name = f"measured on {runtime.rpc.describe()}, no local baseline"
        return
    if tgt.device == "mobile":
        report.warnings.append(
            f"latency not measured: {tgt} is a phone or board; measure there with "
            "backend='tvm' and rpc='host:port/key' (see the README)."
        )
        return
    say("measuring latency against the unrewritten export")
    arrays = [to_numpy(x) for x in captured.example_inputs]
    if onnx is not None:
        baseline = onnx
        baseline_name = "onnxruntime on the original ONNX file"
    else:
        try:  # what a user gets from torch.onnx.export of their own model
            baseline = ort.compile(
                user_model, captured.example_inputs, input_names=lowering.input_names
            )
        except BackendError:
            baseline = ort.compile(
                lowering.original, captured.example_inputs, input_names=lowering.input_names
            )
        baseline_name = "onnxruntime on the unrewritten export"
    timings = time_interleaved(
        {"baseline": lambda: baseline.run(arrays), "optimized": lambda: artifact.run(arrays)},
        warmup=5,
        runs=30,
        max_time_s=20.0,
    )
    report.latency_baseline = timings["baseline"]
    report.latency_optimized = timings["optimized"]
    report.baseline_name = baseline_name

"""``optimize()``: the one call, and the ``OptimizedModel`` it returns.

capture -> PassManager (verified per pass) -> backend artifact -> end-to-end check -> latency
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from graphopt.backends import get_backend
from graphopt.backends.measure import time_interleaved
from graphopt.capture import Captured, InputSpec, capture
from graphopt.errors import BackendError, GraphoptError, InputError, VerificationError
from graphopt.pass_manager import (
    Instrument,
    Numerics,
    PassContext,
    PassManager,
    PrintTiming,
    Reproducer,
)
from graphopt.pipeline import parse_pipeline
from graphopt.report import Progress, Report, op_counts
from graphopt.target import Target
from graphopt.verify import compare, exact_tolerance, run_module

log = logging.getLogger(__name__)


class OptimizedModel:
    """The result of :func:`optimize`: callable like the original model, savable, with a report.

    Call it with torch tensors (returns tensors) or numpy arrays (returns arrays). The batch
    dimension is dynamic; every other dimension and the dtype must match the example inputs.
    """

    def __init__(
        self,
        artifact: Any,
        graph_module: fx.GraphModule,
        report: Report,
        inputs: list[InputSpec],
        backend: Any,
    ) -> None:
        self.artifact = artifact
        self.graph_module = graph_module
        self.report = report
        self.inputs = inputs
        self.backend = backend

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
                raise InputError(
                    f"input {i} should be {spec.describe()} (N = any "
                    f"batch size), got {got}. The model was optimized for that "
                    "shape; re-run optimize() with example inputs of the new shape."
                )

    def __call__(self, *args: Any) -> Any:
        self.check_inputs(args)
        as_torch = any(isinstance(x, torch.Tensor) for x in args)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in args]
        outputs = self.artifact.run(arrays)
        if as_torch:
            outputs = [torch.from_numpy(np.asarray(o)) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def save(self, path: str | Path) -> Path:
        """Write the deployable artifact (``.onnx`` for the ONNX Runtime backend)."""
        path = Path(path)
        if path.suffix != ".onnx":
            raise GraphoptError(
                f"the {self.report.backend} backend saves ONNX files; name the "
                f"output '*.onnx' (got {path.name!r})."
            )
        return self.artifact.save(path)

    def __repr__(self) -> str:
        return (
            f"<OptimizedModel {self.report.model} on {self.report.target} ({self.report.backend})>"
        )


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
    calibration_data: Iterable[Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    instruments: Sequence[Instrument] = (),
    progress: bool = False,
    name: str | None = None,
) -> OptimizedModel:
    """Optimize ``model`` for ``target`` and return an :class:`OptimizedModel`.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``.onnx`` path or a
    ``ModelProto``. ``pipeline``: a pipeline string, default the target's
    (``graphopt passes`` lists them). ``verify``: check every pass and the final artifact on the
    example inputs. ``strict``: raise instead of rolling a pass back. ``measure``: time the
    artifact against the backend on the unrewritten export. The model passed in is never
    modified.

    >>> result = optimize(model, "cpu", example_inputs=(x,))
    >>> print(result.report)
    >>> result.save("model.onnx")
    """
    say = Progress(progress)
    tgt = Target.parse(target)  # bad strings fail before any heavy work
    pipe = parse_pipeline(pipeline if pipeline is not None else tgt.default_pipeline)
    runtime = get_backend(backend, tgt)
    say(f"capturing {name or _model_name(model)}")
    captured = capture(
        model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
    )
    inputs = captured.example_inputs
    original = copy.deepcopy(captured.graph)
    # the ground truth: the user's module itself, or ONNX Runtime on the user's ONNX file
    onnx_original = _load_original_onnx(runtime, model) if captured.method == "onnx" else None
    # one eval-mode copy of the user's module serves as reference and as the baseline export
    user_model = (
        copy.deepcopy(model).eval() if onnx_original is None and (verify or measure) else None
    )
    verify_outputs = _reference_outputs(user_model, captured, onnx_original) if verify else None
    ctx = PassContext(
        sample_inputs=inputs if verify else None,
        calibration_data=calibration_data,
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
    input_names = [s.name for s in captured.inputs]
    say(f"lowering to {runtime.name}")
    artifact = runtime.compile(gm, inputs, input_names=input_names)
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
    if verify_outputs is not None:
        got = [torch.from_numpy(np.asarray(o)) for o in artifact.run([x.numpy() for x in inputs])]
        report.artifact_error = compare(verify_outputs, got, _artifact_numerics(result))
        if not report.artifact_error.ok:
            say("the artifact disagrees with the model: bisecting the pipeline")
            report.artifact_diagnosis = _bisect_lowering(
                runtime, original, manager, result, inputs, input_names, verify_outputs
            )
            message = (
                f"the {runtime.name} artifact differs from the original model beyond the "
                f"pipeline's contract: {report.artifact_error.describe()}. "
                f"{report.artifact_diagnosis}"
            )
            if strict:
                raise VerificationError(
                    message + " The rewritten graph itself was within its "
                    "contract; the difference comes from lowering.",
                    output=report.artifact_error.output,
                    measured=report.artifact_error.measured,
                    allowed=report.artifact_error.allowed,
                )
            log.warning(message)
    if measure:
        say("measuring latency against the unrewritten export")
        report.latency_baseline, report.latency_optimized, report.baseline_name = _measure(
            runtime, user_model, captured, original, artifact, input_names, onnx_original
        )
    return OptimizedModel(artifact, gm, report, captured.inputs, runtime)


def _model_name(model: Any) -> str:
    if isinstance(model, nn.Module):
        return type(model).__name__
    if isinstance(model, str | Path):
        return Path(model).name
    return "onnx-model"


def _load_original_onnx(runtime: Any, model: Any) -> Any:
    from graphopt.onnx_import import load_onnx

    return runtime.load(load_onnx(model))


def _reference_outputs(
    user_model: nn.Module | None, captured: Captured, onnx_original: Any
) -> list[torch.Tensor]:
    """Outputs of the user's model itself (its eval copy / ONNX Runtime on the user's file)."""
    if onnx_original is not None:
        arrays = [x.numpy() for x in captured.example_inputs]
        return [torch.from_numpy(np.asarray(o)) for o in onnx_original.run(arrays)]
    return run_module(user_model, captured.example_inputs)


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


def _bisect_lowering(
    runtime: Any,
    original: fx.GraphModule,
    manager: PassManager,
    result: Any,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    reference: list[torch.Tensor],
) -> str:
    """Find the first applied pass after which the lowered artifact disagrees with the model.

    Binary search over prefixes of the passes that changed the graph: each probe re-runs the
    prefix on a copy of the captured graph, lowers it and compares. A disagreement already at
    prefix 0 means the exporter/backend, not a pass, is at fault.
    """
    applied = [
        p
        for p, r in zip(manager.passes, result.records, strict=True)
        if r.status == "ok" and r.modified
    ]
    numerics = _artifact_numerics(result)
    arrays = [x.numpy() for x in inputs]

    def agrees(k: int) -> bool:
        gm = copy.deepcopy(original)
        gm = PassManager(applied[:k], verify=False).run(gm, PassContext()).graph
        try:
            artifact = runtime.compile(gm, inputs, input_names=input_names)
            got = [torch.from_numpy(np.asarray(o)) for o in artifact.run(arrays)]
        except GraphoptError:
            return False
        return compare(reference, got, numerics).ok

    if not agrees(0):
        return (
            f"The unrewritten graph already disagrees once lowered to {runtime.name}: the "
            "export or the backend is at fault, not a pass."
        )
    lo, hi = 0, len(applied)  # agrees(lo) is true, agrees(hi) is false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if agrees(mid) else (lo, mid)
    return (
        f"Bisection: the lowered artifact first disagrees after pass {applied[hi - 1]} "
        f"(the graph agreed in torch, so that rewrite does not survive lowering to "
        f"{runtime.name})."
    )


def _measure(runtime, user_model, captured, original_gm, artifact, input_names, onnx_original):
    """Latency of the backend on the unrewritten model and on graphopt's artifact, interleaved."""
    arrays = [x.numpy() for x in captured.example_inputs]
    if onnx_original is not None:
        baseline = onnx_original
        baseline_name = f"{runtime.name} on the original ONNX file"
    else:
        try:  # what a user gets from torch.onnx.export of their own model
            baseline = runtime.compile(user_model, captured.example_inputs, input_names=input_names)
        except BackendError:
            baseline = runtime.compile(
                original_gm, captured.example_inputs, input_names=input_names
            )
        baseline_name = f"{runtime.name} on the unrewritten export"
    timings = time_interleaved(
        {"baseline": lambda: baseline.run(arrays), "optimized": lambda: artifact.run(arrays)},
        warmup=5,
        runs=30,
        max_time_s=20.0,
    )
    return timings["baseline"], timings["optimized"], baseline_name

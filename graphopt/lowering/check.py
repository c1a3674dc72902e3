"""The end-to-end checks of one ``optimize`` run, and where a failing one puts the blame.

:class:`Check` holds the reference outputs (the user's model on every check sample) and the
model's own float32 rounding; a stage that breaks the contract (capture, the pipeline as a
whole, the export, a backend, a pass that does not survive lowering) raises
:class:`VerificationError` naming that stage, or with ``accept_mismatch`` only warns.

When an artifact disagrees with the model although the rewritten graph agreed in torch,
:func:`bisect_lowering` searches for the first pass after which the *lowered* graph disagrees:
each probe reruns the pipeline on a copy of the captured graph through the pass manager with a
:class:`~graphopt.pipeline.Bisect` instrument that lets the first ``n`` of the passes that
changed the graph run, lowers the result and compares. A disagreement with no pass at all is
the exporter's or the backend's (:func:`blame_lowering` tells which).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from torch import fx, nn

from graphopt.backends import Backend, get_backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.export import export_onnx
from graphopt.core.numerics import (
    Comparison,
    Numerics,
    Rounding,
    exact_tolerance,
    run_samples,
    sample_labels,
)
from graphopt.core.pass_infra import PassContext
from graphopt.errors import GraphoptError, VerificationError
from graphopt.frontends.torch import Captured
from graphopt.pipeline import Bisect, PassManager, PipelineResult
from graphopt.report import Report
from graphopt.target import Target

if TYPE_CHECKING:
    from graphopt.lowering.context import Lowering

log = logging.getLogger(__name__)


class Check:
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

    def compare(self, outputs: list[torch.Tensor], numerics: Numerics) -> Comparison:
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

    def pipeline(self, result: PipelineResult) -> None:
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

    def fail(self, stage: str, message: str, error: Comparison) -> None:
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


def artifact_numerics(result: PipelineResult) -> Numerics:
    """The contract an fp32 artifact is held to: exact, unless a lossy pass changed the graph."""
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


class _Probe:
    """Lowers the captured graph rewritten by the first ``n`` passes that changed it."""

    def __init__(self, lowering: Lowering, numerics: Numerics) -> None:
        self.lowering = lowering
        self.numerics = numerics
        records = lowering.result.records
        self.applied = [i for i, r in enumerate(records) if r.status == "ok" and r.modified]

    def graph(self, n: int) -> fx.GraphModule:
        """The pipeline rerun on a copy of the captured graph, every pass after the first ``n``
        that changed the graph skipped."""
        manager = PassManager(
            self.lowering.manager.passes, verify=False, instruments=[Bisect(n, self.applied)]
        )
        return manager.run(copy.deepcopy(self.lowering.original), PassContext()).graph

    def agrees(self, n: int, backend: Backend) -> bool:
        lowering = self.lowering
        try:
            artifact = backend.compile(self.graph(n), lowering.inputs, **lowering.names)
            return lowering.check.compare(lowering.run(artifact), self.numerics).ok
        except GraphoptError:
            return False


def bisect_lowering(runtime: Backend, lowering: Lowering, numerics: Numerics) -> tuple[str, str]:
    """Find the stage at which the lowered artifact first disagrees with the model.

    Binary search over prefixes of the passes that changed the graph: each probe re-runs the
    prefix on a copy of the captured graph, lowers it and compares. A disagreement already at
    prefix 0 means the export or the backend is at fault, not a pass; which one is told apart
    by running the same export in ONNX's reference evaluator (and, for TVM, in ONNX Runtime).
    Returns ``(stage, diagnosis)``.
    """
    probe = _Probe(lowering, numerics)
    if not probe.agrees(0, runtime):
        return blame_lowering(runtime, probe)
    lo, hi = 0, len(probe.applied)  # agrees(lo) is true, agrees(hi) is false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe.agrees(mid, runtime) else (lo, mid)
    culprit = lowering.manager.passes[probe.applied[hi - 1]]
    return f"pass {culprit.name}", (
        f"Bisection: the lowered artifact first disagrees after pass {culprit} (the graph "
        f"agreed in torch, so that rewrite does not survive lowering to {runtime.name})."
    )


def blame_lowering(runtime: Backend, probe: _Probe) -> tuple[str, str]:
    """The unrewritten graph disagrees once lowered: the exporter's or the backend's fault?"""
    lowering = probe.lowering
    if runtime.name != "onnxruntime":
        ort = get_backend("onnxruntime", Target.parse(lowering.report.target))
        if probe.agrees(0, ort):
            return f"backend {runtime.name}", (
                f"The unrewritten graph already disagrees once lowered to {runtime.name}, while "
                f"ONNX Runtime runs it right: the {runtime.name} backend is at fault, not a pass."
            )
    try:
        export_ok = _reference_evaluator_agrees(probe)
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


def _reference_evaluator_agrees(probe: _Probe) -> bool:
    """Whether ONNX's reference evaluator, running the export of the unrewritten graph,
    computes what the model does."""
    lowering = probe.lowering
    proto = export_onnx(probe.graph(0), lowering.inputs, **lowering.names)
    evaluator = ReferenceEvaluator(proto)
    names = [i.name for i in proto.graph.input]
    got = [
        torch.from_numpy(np.asarray(o))
        for sample in lowering.check.samples
        for o in evaluator.run(None, {n: to_numpy(x) for n, x in zip(names, sample, strict=False)})
    ]
    return lowering.check.compare(got, probe.numerics).ok

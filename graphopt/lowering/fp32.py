"""Lowering the rewritten float graph: compile it for a backend and verify the artifact.

The artifact is held to the pipeline's contract (:func:`~graphopt.lowering.check.
artifact_numerics`) on every check sample; one that disagrees is bisected to the stage at fault
(:func:`~graphopt.lowering.check.bisect_lowering`) before :class:`VerificationError` names it.
"""

from __future__ import annotations

from graphopt.backends import Artifact, Backend
from graphopt.core.dynamic_axes import describe, sizes
from graphopt.lowering import dynamic
from graphopt.lowering.check import artifact_numerics, bisect_lowering
from graphopt.lowering.context import Lowering


def lower(lowering: Lowering, runtime: Backend) -> Artifact:
    """Compile for ``runtime``; verify (and on a disagreement bisect) unless it can't run."""
    report = lowering.report
    artifact = runtime.compile(lowering.graph, lowering.inputs, **lowering.names)
    if reason := artifact.static_shape_reason:
        report.warnings.append(
            f"the {runtime.name} artifact runs at the example's shapes only: its dynamic axes "
            f"did not lower ({reason})."
        )
    elif runtime.name == "tvm" == report.backend and lowering.dynamic_axes:  # not auto's trial
        at = sizes(lowering.dynamic_axes, lowering.input_names, lowering.inputs)
        report.warnings.append(
            f"the tvm artifact compiles static shapes: the dynamic axes "
            f"{describe(lowering.dynamic_axes)} are fixed at the example's sizes "
            f"({', '.join(f'{d}={n}' for d, n in at.items())}), and other sizes are refused; "
            "backend='onnxruntime' keeps them dynamic."
        )
    if lowering.reference is None:
        return artifact
    if artifact.cross_compiled and artifact.rpc is None:
        report.warnings.append(
            f"the {runtime.name} artifact is cross-compiled for {report.target} and was "
            "not run: pass rpc='host:port/key' to check its numbers on the device."
        )
        return artifact
    numerics = artifact_numerics(lowering.result)
    error = lowering.errors[runtime.name] = lowering.check.compare(lowering.run(artifact), numerics)
    if runtime.name == report.backend:
        report.artifact_error = error
    if not error.ok:
        lowering.say("the artifact disagrees with the model: bisecting the pipeline")
        stage, diagnosis = bisect_lowering(runtime.without_tuning(), lowering, numerics)
        report.artifact_diagnosis = diagnosis
        lowering.check.fail(
            stage,
            f"the {runtime.name} artifact differs from the original model beyond the "
            f"pipeline's contract: {error.describe()}. The rewritten graph itself was "
            f"within its contract. {diagnosis}",
            error,
        )
    if runtime.name != "tvm":  # TVM compiles the example's shapes
        dynamic.check(lowering, artifact, numerics, runtime.name)
    return artifact

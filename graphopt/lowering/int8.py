"""``precision="int8"``: the pipeline that prepares a graph for int8, and its lowering to a QDQ
ONNX model that ONNX Runtime (or TVM) runs with integer kernels.

The pipeline ends in ``insert-qdq``, which places and calibrates the quantisation in the graph;
lowering exports the float graph and quantises the ONNX model with that pass's options
(:func:`quantize_export`), then checks the int8 artifact against the model under the pass's
contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from graphopt._util import close_matches
from graphopt.backends import Artifact, Backend
from graphopt.backends import tvm as tvm_backend
from graphopt.backends.export import export_onnx
from graphopt.core.options import format_value
from graphopt.core.pass_infra import PassContext
from graphopt.errors import GraphoptError, InputError
from graphopt.lowering import dynamic
from graphopt.lowering.context import Lowering, report_tvm
from graphopt.pipeline import PassSpec, Pipeline
from graphopt.quant.calibration import validate_calibration_batches
from graphopt.quant.improve import Int8Report, quantize_int8
from graphopt.quant.onnx_passes import InsertQDQ
from graphopt.target import int8_pairs_saturate

PRECISIONS = ("fp32", "int8")
# equalize-layers for int8: repvgg_a0's 22-conv chain does not converge in the pass's default
# 100 sweeps (about 20 s there); the ranges even out in the first sweeps, 20 keep most of it
INT8_EQUALIZE = PassSpec("equalize-layers", (("max_sweeps", "20"),))

Metric = Callable[[Callable[..., Any]], float]


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


def plan_precision(precision: str, pipe: Pipeline, max_drop: float | None) -> tuple[Pipeline, bool]:
    """The pipeline to run, and whether this run quantises to int8 (``precision="int8"``, or a
    pipeline with ``insert-qdq``); raises on an inconsistent request."""
    if precision not in PRECISIONS:
        raise GraphoptError(
            f"unknown precision {precision!r}; use 'fp32' (default) or 'int8'."
            + close_matches(str(precision), PRECISIONS)
        )
    if precision == "int8":
        return int8_pipeline(pipe, max_drop), True
    if not any(s.name == "insert-qdq" for s in pipe):
        if max_drop is not None:
            raise GraphoptError("max_drop applies to int8 quantisation; pass precision='int8' too.")
        return pipe, False
    return (pipe if max_drop is None else int8_pipeline(pipe, max_drop, complete=False)), True


def require_calibration(calibration_data: Iterable[Any] | None) -> None:
    """An int8 run without calibration data fails before any work."""
    if calibration_data is None:
        raise InputError(
            "int8 quantisation needs calibration data: pass calibration_data=[(x,), ...], "
            "batches of inputs representative of deployment (a few hundred samples in all; "
            "from the CLI, --calibration data.npz)."
        )


def check_calibration(
    calibration_data: Iterable[Any], inputs: Sequence[torch.Tensor]
) -> list[tuple]:
    """The calibration batches, checked against the captured model's inputs (bad calibration
    data fails here, before any pass runs)."""
    batches = list(validate_calibration_batches(calibration_data, inputs))
    if not batches:
        raise InputError(
            "the calibration data is empty; pass batches of representative inputs "
            "(a few hundred samples)."
        )
    return batches


def quantize_export(
    lowering: Lowering, calibration: list, metric: Metric | None
) -> tuple[Any, Int8Report]:
    """Export the float graph and run the int8 ONNX stage on it (``quantize_int8`` with the
    options of the pipeline's last ``insert-qdq``): the QDQ ONNX model and what quantisation did.
    The stage's pass records go into the report after the FX passes'."""
    o = [p for p in lowering.onnx_stage if p.name == "insert-qdq"][-1].options
    proto = export_onnx(lowering.graph, lowering.inputs, **lowering.names)
    fx_ctx = lowering.context or PassContext()
    # with accept_mismatch, a broken int8 contract is a warning on the artifact, not a rollback
    verify = fx_ctx.verify and not lowering.check.accept
    ctx = dataclasses.replace(fx_ctx, rounding=None, verify=verify)
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
        progress=lowering.say,
        context=ctx,
        **_weight_bits(o.weights, lowering),
    )
    offset = len(lowering.result.records)
    staged = [dataclasses.replace(r, position=offset + r.position) for r in quant.records]
    lowering.report.records = [*lowering.report.records, *staged]  # a new list: bisection
    return qproto, quant  # reads lowering.result.records, the FX stage's


def _weight_bits(weights: str, lowering: Lowering) -> dict[str, Any]:
    """insert-qdq's ``weights`` option as ``quantize_int8``'s arguments: ``auto`` is 7 bits
    where the target is this CPU and its int8 kernels sum pairs of products in int16."""
    if weights == "int7":
        return {"weight_bits": 7, "weight_bits_reason": "asked for (insert-qdq{weights=int7})"}
    reason = int8_pairs_saturate(lowering.target) if weights == "auto" else ""
    return {"weight_bits": 7, "weight_bits_reason": reason} if reason else {"weight_bits": 8}


def lower_int8(
    lowering: Lowering, runtime: Backend, calibration: list, metric: Metric | None
) -> tuple[Artifact, Int8Report]:
    """Export, run the int8 stage and load; check the int8 artifact against the model under
    insert-qdq's contract."""
    report = lowering.report
    qproto, quant = quantize_export(lowering, calibration, metric)
    report.quantization = quant.to_dict()
    if quant.quant.weight_bits != 8:
        report.notes.append(
            f"int8: {quant.quant.weight_bits}-bit weights: {quant.quant.weight_bits_reason}; "
            "insert-qdq{weights=int8} keeps 8 bits."
        )
    record = report.records[-1]  # insert-qdq's
    numerics = InsertQDQ.numerics
    if record.status == "rolled-back":  # its contract broke on the sample inputs
        lowering.check.fail(
            "insert-qdq",
            f"the int8 artifact is further from the model than insert-qdq's contract "
            f"{numerics} allows: {record.comparison.describe()}. Use more representative "
            "calibration data, set max_drop, or skip the worst layers.",
            record.comparison,
        )
    artifact = runtime.load(qproto, [tuple(x.shape) for x in lowering.inputs])
    if runtime.name == "tvm":
        summary = tvm_backend.qdq_import_summary(artifact.imported_ops)
        record.decisions = [*record.decisions, summary]
        report_tvm(report, artifact)
    elif runtime.name == "openvino":  # which layers reach OpenVINO's own int8 kernels
        record.decisions = [*record.decisions, artifact.int8_summary()]
        report.warnings += artifact.int8_warnings()  # kernels that saturate on this CPU
    if quant.max_drop is not None and quant.drop > quant.max_drop:
        report.warnings.append(
            f"int8: {quant.metric} drop {quant.drop:.4g} is above max_drop "
            f"{quant.max_drop:g} even with {len(quant.fallback)} layers in float."
        )
    if lowering.reference is None:
        return artifact, quant
    error = lowering.check.compare(lowering.run(artifact), numerics)
    lowering.errors[runtime.name] = report.artifact_error = error
    if not error.ok:
        lowering.check.fail(
            "insert-qdq",
            f"the int8 artifact is further from the model than insert-qdq's contract "
            f"{numerics} allows: {error.describe()}. Use more representative "
            "calibration data, set max_drop, or skip the worst layers.",
            error,
        )
    if runtime.name != "tvm":  # TVM compiles the example's shapes
        dynamic.check(lowering, artifact, numerics, runtime.name)
    return artifact, quant

"""Lowering: from the rewritten graph of an ``optimize`` run to a checked backend artifact.

``context``: :class:`Lowering`, what every stage shares (the rewritten graph, how it was made,
the checks and the report). ``check``: :class:`Check`, the end-to-end checks and the
stage-naming :class:`~graphopt.errors.VerificationError`, the artifact's contract and the
bisection of an artifact that disagrees. ``fp32``: compile for a backend and verify the
artifact. ``int8``: the int8 pipeline and the QDQ export quantised with ``insert-qdq``'s
options. ``auto``: ``backend="auto"``, the backend chosen by measurement. ``baseline``: the
user's model as it is, the reference of every check and of the latency comparison.
``dynamic``: the outputs' dynamic axes and the artifact checked at a second size of each.

Modules import downward only: ``check`` < ``context`` < ``dynamic`` < ``fp32``, ``int8``,
``baseline`` < ``auto``.
"""

from graphopt.lowering.auto import choose_backend
from graphopt.lowering.baseline import Baseline, load_original_onnx
from graphopt.lowering.check import Check, artifact_numerics, bisect_lowering, blame_lowering
from graphopt.lowering.context import Lowering, report_mobile, report_tvm
from graphopt.lowering.fp32 import lower
from graphopt.lowering.int8 import (
    INT8_EQUALIZE,
    PRECISIONS,
    check_calibration,
    int8_pipeline,
    lower_int8,
    plan_precision,
    quantize_export,
    require_calibration,
)

__all__ = [
    "INT8_EQUALIZE",
    "PRECISIONS",
    "Baseline",
    "Check",
    "Lowering",
    "artifact_numerics",
    "bisect_lowering",
    "blame_lowering",
    "check_calibration",
    "choose_backend",
    "int8_pipeline",
    "load_original_onnx",
    "lower",
    "lower_int8",
    "plan_precision",
    "quantize_export",
    "report_mobile",
    "report_tvm",
    "require_calibration",
]

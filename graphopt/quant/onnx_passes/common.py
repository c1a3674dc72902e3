"""What the int8 stage's passes share: their base class, what they take from the context (the
calibration batches, the run of the stage), and quantisation under the stage's annotations.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import onnx

from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.pipeline.instruments import Instrument
from graphopt.quant.annotations import (
    float_marks,
    original_biases,
    restore_biases,
    strip,
    weight_bits,
)
from graphopt.quant.calibration import Batch, calibration_batches, progress_batches
from graphopt.quant.qdq import QuantReport, quantize_onnx

__all__ = ["OnnxPass", "StageRun", "quantize_marked", "stage_batches", "stage_run"]

Say = Callable[[str], None]


class OnnxPass(Pass):
    """A pass of the int8 ONNX stage: it rewrites an ``onnx.ModelProto`` and runs under
    ``PassManager(..., ir=ONNX)`` (:mod:`graphopt.quant.onnx_ir`), after the export. ``ir``
    tells the FX pipeline to refuse it."""

    ir: ClassVar[str] = "onnx"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:  # type: ignore[override]
        raise NotImplementedError


class StageRun(Instrument):
    """What :func:`~graphopt.quant.improve.quantize_int8` lends the stage's passes for one run
    (an instrument, so that it travels in the context; :func:`stage_run` finds it).

    ``say``: the progress callback (the lines and the calibration bar ``optimize(progress=True)``
    prints). :meth:`quantize`: :func:`~graphopt.quant.qdq.quantize_onnx` that remembers its last
    result, keyed by its exact inputs: fallback-to-float's last trial is the model insert-qdq
    quantises next, and is not calibrated twice. A result is the same whether remembered or not.
    """

    def __init__(self, say: Say | None = None) -> None:
        self.say: Say = say or (lambda _line: None)
        self._last: tuple[str, onnx.ModelProto, QuantReport] | None = None

    def quantize(
        self,
        base: onnx.ModelProto,
        batches: list[Batch],
        *,
        method: str,
        activations: str,
        skip: list[str],
        weight_bits: int = 8,
        bar: str | None = None,
    ) -> tuple[onnx.ModelProto, QuantReport]:
        key = _digest(base, batches, method, activations, skip, weight_bits)
        if self._last is None or self._last[0] != key:
            after = "choosing the calibration method per tensor (auto)" if method == "auto" else ""
            shown = progress_batches(batches, bar, self.say if bar else None, after)
            qmodel, report = quantize_onnx(
                base,
                shown,
                method=method,
                skip=skip,
                activations=activations,
                weight_bits=weight_bits,
            )
            self._last = (key, qmodel, report)
        _, qmodel, report = self._last
        out = onnx.ModelProto()
        out.CopyFrom(qmodel)
        return out, copy.deepcopy(report)  # callers rewrite the reasons


def _digest(base: onnx.ModelProto, batches: list[Batch], *options: Any) -> str:
    h = hashlib.sha256(base.SerializeToString())
    for batch in batches:
        for x in batch:
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
    h.update(repr(options).encode())
    return h.hexdigest()


def stage_run(ctx: PassContext) -> StageRun:
    """The :class:`StageRun` of ``ctx``, or a fresh one (no progress lines, nothing shared)."""
    for inst in ctx.instruments:
        if isinstance(inst, StageRun):
            return inst
    return StageRun()


def stage_batches(ctx: PassContext, model: onnx.ModelProto) -> list[Batch]:
    """``ctx.calibration_data`` checked against ``model``'s inputs (InputError without it)."""
    return calibration_batches(ctx.calibration_data, model)


def quantize_marked(
    model: onnx.ModelProto,
    batches: list[Batch],
    run: StageRun,
    *,
    method: str,
    activations: str,
    also_float: Iterable[str] = (),
    uncorrected: Iterable[str] = (),
    bar: str | None = None,
) -> tuple[onnx.ModelProto, QuantReport, set[str]]:
    """:func:`~graphopt.quant.qdq.quantize_onnx` of ``model`` (through ``run``) with the layers
    marked to stay in float (and ``also_float``) kept in float, each with its mark's reason,
    and the biases of the layers left in float as they were before correction.

    ``uncorrected``: corrected layers to take the correction off as well (the layers a previous
    call returned). A corrected layer the quantiser keeps in float anyway (its bias would
    overflow int32, a 1-D conv) loses its correction and the model is quantised again. ``bar``:
    the label of a progress bar. Returns the QDQ model (without the stage's annotations), its
    report and every layer whose correction was taken off.
    """
    marks = float_marks(model)
    bits, why = weight_bits(model)  # strip() takes the mark off the copy quantised
    skip = sorted(set(marks) | set(also_float))
    corrected = set(original_biases(model))
    restored = (set(skip) | set(uncorrected)) & corrected
    while True:
        base = restore_biases(model, restored)
        strip(base)
        qmodel, report = run.quantize(
            base,
            batches,
            method=method,
            activations=activations,
            skip=skip,
            weight_bits=bits,
            bar=bar,
        )
        report.weight_bits_reason = why
        # a corrected layer kept in float anyway must not keep the shift: its float weights
        # were never rounded
        kept = {d.node for d in report.layers if not d.quantized} & corrected - restored
        if not kept:
            break
        restored |= kept
        bar = None
    for d in report.layers:
        if d.node in marks and not d.quantized:
            d.reason = marks[d.node]
    return qmodel, report, restored

"""The calibrated int8 flow on an ONNX model: the int8 stage's passes under the pass manager.

:func:`quantize_int8` (what ``optimize(precision="int8")`` runs on the export) builds the stage
from its options (:func:`graphopt.quant.onnx_passes.int8_passes`) and runs it with
``PassManager(passes, ir=ONNX)``::

    smooth-quant        Y = (X diag(s)^-1)(diag(s) W), exact in float
    correct-bias        b += E[y_float] - E[y_int8-weights], per channel
    fallback-to-float   with max_drop: the layers to keep in float, by measured sensitivity
    insert-qdq          calibration (``method``) and the QDQ pairs ONNX Runtime fuses

so that each step is a pass with its own contract, comparison (given sample inputs), rollback
and record, like the FX passes. The improvers work on the model that insert-qdq quantises, so
the layers they correct are exactly the nodes that become integer kernels, and a layer kept in
float gets its float bias back (``shared/notes/algorithms.md`` §5.5). The :class:`Int8Report`
gathers what the passes decided; its ``records`` are the stage's pass records.

Calibration methods: ``method="auto"`` picks, per activation tensor, the observer with the
lowest fake-quantisation error (the issue's per-layer choice); each tensor is observed once
(percentile, entropy and mse share one histogram, minmax the extrema) and the candidates' errors
are measured on a stratified sample of it (``graphopt.quant.qdq``).

    >>> qmodel, report = quantize_int8(proto, batches, max_drop=0.01)  # doctest: +SKIP
    >>> print(report)                                                    # doctest: +SKIP

Not handled: AdaRound, analytic (BN-based) bias correction, SmoothQuant through Transpose or
Reshape between the producer and the MatMul, per-channel activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from graphopt.core.names import decision_dict, layer_name
from graphopt.core.pass_infra import PassContext
from graphopt.errors import GraphoptError, InputError
from graphopt.pipeline.manager import PassManager, PassRecord
from graphopt.quant.annotations import mark_float, mark_weight_bits, strip
from graphopt.quant.calibration import calibration_batches
from graphopt.quant.graph import named
from graphopt.quant.onnx_ir import ONNX
from graphopt.quant.onnx_passes import (
    BiasCorrection,
    FallbackSummary,
    InsertQDQ,
    LayerSensitivity,
    QdqSummary,
    SmoothQuantDecision,
    StageRun,
    int8_passes,
)
from graphopt.quant.ort_policy import count_layers
from graphopt.quant.qdq import QuantReport, check_arguments
from graphopt.quant.qparams import check_weight_bits
from graphopt.quant.scoring import Metric

__all__ = ["Int8Report", "int8_report", "quantize_int8"]

_DONE = ("ok", "unverified")  # a pass whose result the stage kept


@dataclass
class Int8Report:
    """What :func:`quantize_int8` did: improvers, per-layer precision with reasons, the drop.

    ``quant``: the final :class:`QuantReport` (``layers`` says int8 or float and why);
    ``drop_all``: the metric drop with every quantisable layer in int8; ``drop``: the drop of
    the returned model; ``fallback``: layers kept in float by the ``max_drop`` search, in the
    order they were added; ``records``: the stage's pass records (status, time, comparison).
    """

    quant: QuantReport
    metric: str
    drop_all: float
    drop: float
    max_drop: float | None = None
    fp32: float = 1.0  # the metric on the float model; int8's is ``fp32 - drop``
    smoothquant: list[SmoothQuantDecision] = field(default_factory=list)
    bias: list[BiasCorrection] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)

    @property
    def int8_layers(self) -> list[str]:
        return self.quant.quantized

    @property
    def float_layers(self) -> dict[str, str]:
        """Layers kept in float, with the reason."""
        return self.quant.float_layers

    @property
    def int8(self) -> float:
        """The metric on the int8 model."""
        return self.fp32 - self.drop

    def summary(self) -> str:
        """One line: layers in int8, calibration, the metric in fp32 and int8 and the drop."""
        q = self.quant
        budget = f", allowed {self.max_drop:g}" if self.max_drop is not None else ""
        every = (
            f"; every layer int8: {self.fp32 - self.drop_all:.4g}"
            if self.fallback and self.drop_all != self.drop
            else ""
        )
        weights = f", {q.weight_bits}-bit weights" if q.weight_bits != 8 else ""
        count, weighted = count_layers(q.layers)
        return (
            f"int8: {count} int8 ({weighted}{q.method} calibration, "
            f"{q.activation_dtype} activations{weights}, {q.batches} batches); {self.metric}: fp32 "
            f"{self.fp32:.4g} -> int8 {self.int8:.4g} (drop {self.drop:.4g}{budget}{every})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Structured fields for the JSON report: the metric's values, the layers' precision
        (PyTorch module paths where the export named nodes after them), the improvers'
        decisions."""
        q = self.quant
        return {
            "metric": self.metric,
            "fp32": self.fp32,
            "int8": self.int8,
            "drop": self.drop,
            "drop_all_int8": self.drop_all,
            "max_drop": self.max_drop,
            "method": q.method,
            "activations": q.activation_dtype,
            "weight_bits": q.weight_bits,
            "weight_bits_reason": q.weight_bits_reason,
            "calibration_batches": q.batches,
            "int8_layers": len(q.quantized),
            "layers": [decision_dict(d) for d in q.layers],
            "fallback": [layer_name(n) for n in self.fallback],
            "sensitivity": [decision_dict(d) for d in self.sensitivity],
            "bias_correction": [decision_dict(d) for d in self.bias],
            "smoothquant": [dataclasses.asdict(d) for d in self.smoothquant],
        }

    def lines(self) -> list[str]:
        """The summary line, then one line per decision."""
        q = self.quant
        out = [self.summary()]
        out += [f"  {d}" for d in q.layers]
        out += [f"  {s}" for s in self.smoothquant]
        out += [f"  {b}" for b in self.bias]
        out += [f"  {s}" for s in self.sensitivity]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def quantize_int8(
    model: onnx.ModelProto,
    calibration: Iterable[Any],
    *,
    method: str = "auto",
    activations: str = "uint8",
    skip: Iterable[str] = (),
    smoothquant: bool = True,
    alpha: float = 0.5,
    correct_bias: bool = True,
    max_drop: float | None = None,
    metric: Metric | None = None,
    progress: Callable[[str], None] | None = None,
    context: PassContext | None = None,
    weight_bits: int = 8,
    weight_bits_reason: str = "",
) -> tuple[onnx.ModelProto, Int8Report]:
    """Calibrated int8 QDQ model of ``model`` with SmoothQuant, bias correction and, given
    ``max_drop``, the mixed-precision fallback; and the :class:`Int8Report`.

    ``calibration``: batches (tuples of arrays in input order, first axis = samples).
    ``method``: the calibration method of :func:`quantize_onnx` (``auto``: per tensor by
    measured error). ``skip``: node names always kept in float. ``metric``: the user's
    ``metric(predict) -> score`` (higher is better), default agreement with fp32 on the
    calibration data. ``progress``: called with a line per step (a bar while calibrating).
    ``context``: the stage's :class:`PassContext` (sample inputs to check each pass on,
    instruments, ``strict``); without one the stage runs strict and unchecked, so that a
    failing pass raises :class:`~graphopt.errors.PassError`. ``weight_bits``: 8, or 7 for CPUs
    whose int8 kernels sum pairs of products in int16 (``weight_bits_reason`` says why, in the
    report). ``model`` is not modified.
    """
    if max_drop is not None and max_drop < 0:
        raise InputError(f"max_drop must be >= 0 (a metric drop), got {max_drop}.")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"SmoothQuant alpha must be in [0, 1], got {alpha}; 0.5 is the default.")
    check_arguments(model, method, activations, skip)
    work = named(model)
    batches = calibration_batches(calibration, work)
    mark_float(work, dict.fromkeys(skip, "in the skip list"))
    check_weight_bits(weight_bits)
    mark_weight_bits(work, weight_bits, weight_bits_reason)
    options = InsertQDQ.Options(
        method=method,
        activations=activations,
        smoothquant=smoothquant,
        alpha=alpha,
        bias_correction=correct_bias,
        max_drop=max_drop,
    )
    ctx = context if context is not None else PassContext(strict=True)
    instruments = [*ctx.instruments, StageRun(progress)]
    ctx = dataclasses.replace(ctx, calibration_data=batches, metric=metric, instruments=instruments)
    result = PassManager(int8_passes(options), ir=ONNX).run(work, ctx)
    qmodel = result.graph
    strip(qmodel)  # a rolled-back insert-qdq leaves the float model with the annotations
    return qmodel, int8_report(result.records)


def int8_report(records: Sequence[PassRecord]) -> Int8Report:
    """The :class:`Int8Report` of a run of the int8 stage, from its pass records (a pass rolled
    back or failed contributes nothing but its record)."""
    last = records[-1] if records else None
    if last is None or last.name != InsertQDQ.name or not last.decisions:
        status = f"{last.status}: {last.message}" if last is not None else "did not run"
        raise GraphoptError(f"insert-qdq {status}")
    summary = last.decisions[0]
    assert isinstance(summary, QdqSummary)  # insert-qdq's first decision
    result = Int8Report(summary.quant, summary.metric, summary.drop, summary.drop)
    result.fp32 = summary.fp32
    result.records = list(records)
    for r in records:
        if r.status not in _DONE:
            continue
        found = [d for d in r.decisions if isinstance(d, FallbackSummary)]
        if found:
            result.drop_all, result.max_drop = found[0].drop_all, found[0].max_drop
            result.fallback = list(found[0].fallback)
        result.smoothquant += [d for d in r.decisions if isinstance(d, SmoothQuantDecision)]
        result.bias += [d for d in r.decisions if isinstance(d, BiasCorrection)]
        result.sensitivity += [d for d in r.decisions if isinstance(d, LayerSensitivity)]
    _mark_uncorrected(result)
    return result


def _mark_uncorrected(result: Int8Report) -> None:
    """Layers in float carry no bias shift: say so in their bias-correction line."""
    float_layers = result.float_layers
    for b in result.bias:
        if b.applied and b.node in float_layers:
            b.applied, b.reason = False, "layer kept in float"

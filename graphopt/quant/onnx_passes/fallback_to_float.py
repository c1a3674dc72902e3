"""fallback-to-float: mixed precision, the layers to keep in float so that int8 costs at most
``max_drop`` of a metric.

Quantise every layer (as insert-qdq would: same ``method`` and ``activations``), measure the
drop of the metric against the float model on the calibration data
(:class:`~graphopt.quant.scoring.Scorer`: the user's ``metric`` from the context, or agreement
with fp32). If it exceeds ``max_drop``, measure each int8 layer's sensitivity (the drop with
only that layer kept in float) and keep layers in float greedily, the one whose un-quantisation
helps most first, each step measured, until the drop is within ``max_drop``. With
``method=auto`` the ranking runs with minmax calibration (no histograms per layer); every step
of the search with ``auto``.

The pass decides; insert-qdq, after it, quantises: the chosen layers are marked to stay in
float (:mod:`graphopt.quant.annotations`, with the reason insert-qdq reports for them) and the
float model is otherwise unchanged, so the pass is exact. Its decisions are the measurements:
the drop with every layer int8, each layer's sensitivity, the drop it reached.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import onnx

from graphopt.core.names import layer_name
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.quant.annotations import mark_float, original_biases, restore_biases
from graphopt.quant.calibration import Batch
from graphopt.quant.onnx_passes.common import (
    OnnxPass,
    quantize_marked,
    stage_batches,
    stage_run,
)
from graphopt.quant.scoring import Scorer

__all__ = ["FallbackSummary", "FallbackToFloat", "LayerSensitivity"]

log = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy", "mse", "auto"]


@dataclass
class LayerSensitivity:
    """The metric drop with only this layer kept in float (everything else int8)."""

    node: str
    op_type: str
    drop_without: float

    @property
    def severity(self) -> float:  # the most sensitive layer leaves the smallest drop in float
        return -self.drop_without

    def __str__(self) -> str:
        return (
            f"sensitivity {self.op_type} {layer_name(self.node)}: drop {self.drop_without:.4g} "
            "when float"
        )


@dataclass
class FallbackSummary:
    """What the search measured: the drop with every layer int8 and the drop it reached with
    ``fallback`` (in the order chosen) in float."""

    metric: str
    drop_all: float
    drop: float
    max_drop: float
    fallback: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.fallback:
            return (
                f"mixed precision: {self.metric} drop {self.drop_all:.4g} with every layer int8, "
                f"within max_drop {self.max_drop:g}"
            )
        return (
            f"mixed precision: {self.metric} drop {self.drop_all:.4g} with every layer int8; "
            f"{len(self.fallback)} layer(s) kept float bring it to {self.drop:.4g} "
            f"(max_drop {self.max_drop:g})"
        )


@register_pass
class FallbackToFloat(OnnxPass):
    """Keep the layers in float that int8 hurts most, until the metric drop is within
    ``max_drop`` (see the module docstring)."""

    name = "fallback-to-float"
    numerics = Numerics.exact()  # it only marks layers; insert-qdq keeps them in float

    @dataclass(frozen=True)
    class Options:
        max_drop: float = 0.01  # metric drop allowed (1 - agreement with fp32 by default)
        method: Method = "auto"  # calibration of the trials: insert-qdq's
        activations: Literal["uint8", "int8"] = "uint8"  # asymmetric | symmetric

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o, run = self.options, stage_run(ctx)
        batches = stage_batches(ctx, model)
        # the float reference: the model before bias correction (its shifts are for int8)
        scorer = Scorer(restore_biases(model, original_biases(model)), batches, ctx.metric)
        qmodel, report, uncorrected = quantize_marked(
            model, batches, run, method=o.method, activations=o.activations, bar="calibrating"
        )
        drop_all = scorer.drop(qmodel)
        run.say(f"int8: {scorer.name} drop {drop_all:.4g} with every layer int8")
        summary = FallbackSummary(scorer.name, drop_all, drop_all, o.max_drop)
        stats = Counter({"int8-layers": len(report.quantized)})
        if drop_all <= o.max_drop:
            return PassResult(model, False, stats, [summary])
        trial = _Trials(model, batches, o, scorer, uncorrected, run)
        sensitivity = trial.sensitivity([d for d in report.layers if d.quantized])
        summary.fallback, summary.drop = trial.search(sensitivity, drop_all)
        if summary.drop > o.max_drop:
            log.warning("int8: drop %.4g still above max_drop %g", summary.drop, o.max_drop)
        sens = {s.node: s.drop_without for s in sensitivity}
        marked = onnx.ModelProto()
        marked.CopyFrom(model)
        mark_float(
            marked,
            {
                node: f"mixed-precision fallback: drop {sens[node]:.4g} with only this layer "
                f"float (all int8: {drop_all:.4g}); kept float to bring the drop to "
                f"{summary.drop:.4g} <= max_drop {o.max_drop:g}"
                for node in summary.fallback
            },
        )
        stats["kept-float"] = len(summary.fallback)
        return PassResult(marked, True, stats, [summary, *sensitivity])


class _Trials:
    """Quantisations of ``model`` with some layers kept in float, scored by ``scorer``."""

    def __init__(self, model, batches: list[Batch], options, scorer: Scorer, uncorrected, run):
        self.model, self.batches, self.options = model, batches, options
        self.scorer, self.uncorrected, self.run = scorer, uncorrected, run

    def drop(self, float_nodes: set[str], method: str) -> float:
        qmodel, _, _ = quantize_marked(
            self.model,
            self.batches,
            self.run,
            method=method,
            activations=self.options.activations,
            also_float=float_nodes,
            uncorrected=self.uncorrected,
        )
        return self.scorer.drop(qmodel)

    def sensitivity(self, candidates: list) -> list[LayerSensitivity]:
        """Each layer's drop with only it in float; ranking only orders the search, so with
        ``auto`` it runs minmax (no histograms per layer)."""
        method = "minmax" if self.options.method == "auto" else self.options.method
        out = []
        for i, d in enumerate(candidates, start=1):
            out.append(LayerSensitivity(d.node, d.op_type, self.drop({d.node}, method)))
            self.run.say(f"sensitivity {i}/{len(candidates)}: {out[-1]}")
        return out

    def search(self, sensitivity: list[LayerSensitivity], drop: float) -> tuple[list[str], float]:
        """Layers kept in float, least sensitive first, until the drop (``drop`` with none)
        is within max_drop; and the drop reached."""
        fallback: list[str] = []
        for s in sorted(sensitivity, key=lambda s: s.drop_without):
            fallback.append(s.node)
            drop = self.drop(set(fallback), self.options.method)
            self.run.say(f"int8: {len(fallback)} layer(s) in float, drop {drop:.4g}")
            if drop <= self.options.max_drop:
                break
        return fallback, drop

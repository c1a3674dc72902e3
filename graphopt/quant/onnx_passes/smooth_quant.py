"""smooth-quant: SmoothQuant (Xiao et al. 2023) on the ONNX graph, before int8.

For ``Y = X W`` (MatMul ``W[K, N]``, or Gemm), with per-input-channel
``s_j = max|X_j|^a / max|W_j|^(1-a)`` (``a = alpha``, 0.5 by default)::

    Y = (X diag(s)^-1) (diag(s) W)

``diag(s)^-1`` is folded into the producer of ``X``: a LayerNormalization's gamma and beta, a
MatMul / Gemm weight's output columns (and the bias ``Add`` of a constant after a MatMul), so
the float model computes the same function (float32 rounding only) while the activation the
int8 kernel reads has its outlier channels divided down and the weight, quantised per output
channel, absorbs them. ``W_j`` is taken over every consumer of ``X`` (Q, K and V projections
sharing one LayerNorm get one ``s``); ``max|X_j|`` over the calibration data.

Refused (a decision with the reason): a producer that cannot absorb ``1/s`` (GELU, Relu, a
graph input...), an ``X`` read by anything other than constant-weight MatMul / Gemm,
initializers shared with other nodes, consumers that disagree on ``K``.
Not handled: SmoothQuant through Transpose or Reshape between the producer and the MatMul.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.core.names import layer_name
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.errors import InputError
from graphopt.quant.calibration import calibration_batches
from graphopt.quant.graph import GraphIndex, attr, named
from graphopt.quant.onnx_passes.common import OnnxPass, stage_batches, stage_run
from graphopt.quant.runtime import feed, probe

__all__ = ["SmoothQuant", "SmoothQuantDecision", "smooth_quant"]


@dataclass
class SmoothQuantDecision:
    """One activation smoothed (or refused): its consumers, producer and the scale range."""

    tensor: str
    producer: str
    consumers: list[str]
    applied: bool
    reason: str = ""
    scale_min: float = 1.0
    scale_max: float = 1.0
    act_range_before: float = 0.0  # max_j max|X_j| / median_j max|X_j|
    act_range_after: float = 0.0

    @property
    def outcome(self) -> str:  # what the report counts
        return "smoothed" if self.applied else "not applied"

    @property
    def severity(self) -> float:  # the report lists the worst channel outliers first
        return self.act_range_before

    def __str__(self) -> str:
        if not self.applied:
            return f"smoothquant {self.tensor}: not applied ({self.reason})"
        return (
            f"smoothquant {self.tensor} ({layer_name(self.producer)} -> "
            f"{', '.join(map(layer_name, self.consumers))}): "
            f"s in [{self.scale_min:.3g}, {self.scale_max:.3g}], channel outlier ratio "
            f"{self.act_range_before:.3g} -> {self.act_range_after:.3g}"
        )


def _consumer_weight(idx: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray, int] | str:
    """(weight, input-channel axis) of a MatMul / Gemm reading X as its first input, or why not."""
    if node.op_type == "MatMul":
        w = idx.own_const(node.input[1])
        if w is None or w.ndim != 2:
            return "a MatMul whose weight is not a 2-D constant of its own"
        return w, 0
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "a Gemm with transA"
        w = idx.own_const(node.input[1])
        if w is None:
            return "a Gemm whose weight is not a constant of its own"
        return w, 1 if attr(node, "transB", 0) else 0
    return f"a {node.op_type} reads it"


def _fold_inverse(
    idx: GraphIndex, x: str, k: int
) -> tuple[Callable[[np.ndarray], None], str] | str:
    """A function applying ``X /= s`` through the producer of ``x``, and its name; or why not."""
    p = idx.producer.get(x)
    if p is None:
        return "a graph input (no producer to fold 1/s into)"
    if x in idx.outputs:
        return "the tensor is a graph output"
    if p.op_type == "LayerNormalization":
        gamma = idx.own_const(p.input[1])
        beta = idx.own_const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if gamma is None or gamma.shape != (k,) or attr(p, "axis", -1) not in (-1,):
            return "a LayerNormalization without its own [K] gamma over the last axis"
        if len(p.input) > 2 and p.input[2] and beta is None:
            return "a LayerNormalization whose beta is not a constant of its own"

        def apply_ln(s: np.ndarray) -> None:  # arrays re-read: an earlier group may scale them
            idx.set(p.input[1], idx.own_const(p.input[1]) / s)
            if beta is not None:
                idx.set(p.input[2], idx.own_const(p.input[2]) / s)

        return apply_ln, p.name
    if p.op_type == "Add":
        const = [i for i in p.input if i in idx.init]
        other = [i for i in p.input if i not in idx.init]
        if len(const) != 1 or len(other) != 1:
            return "an Add that is not tensor + constant"
        c = idx.own_const(const[0])
        y = other[0]
        mm = idx.producer.get(y)
        if c is None or c.shape != (k,):
            return "an Add whose constant is not a [K] vector of its own"
        if mm is None or mm.op_type != "MatMul" or len(idx.consumers.get(y, [])) != 1:
            return "an Add of a constant not after a MatMul used only there"
        w = idx.own_const(mm.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != k:
            return "the MatMul before the Add has no [., K] constant weight of its own"

        def apply_add(s: np.ndarray) -> None:
            idx.set(mm.input[1], idx.own_const(mm.input[1]) / s[None, :])
            idx.set(const[0], idx.own_const(const[0]) / s)

        return apply_add, f"{mm.name}+{p.name}"
    if p.op_type == "MatMul":
        w = idx.own_const(p.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != k:
            return "a MatMul without a [., K] constant weight of its own"

        def apply_mm(s: np.ndarray) -> None:
            idx.set(p.input[1], idx.own_const(p.input[1]) / s[None, :])

        return apply_mm, p.name
    if p.op_type == "Gemm" and not attr(p, "transA", 0):
        w = idx.own_const(p.input[1])
        trans_b = attr(p, "transB", 0)
        c = idx.own_const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if w is None or (w.shape[0] if trans_b else w.shape[1]) != k:
            return "a Gemm without a constant weight of its own"
        if len(p.input) > 2 and p.input[2] and (c is None or c.shape != (k,)):
            return "a Gemm whose bias is not a [K] constant of its own"

        def apply_gemm(s: np.ndarray) -> None:
            idx.set(p.input[1], idx.own_const(p.input[1]) / (s[:, None] if trans_b else s[None, :]))
            if c is not None:
                idx.set(p.input[2], idx.own_const(p.input[2]) / s)

        return apply_gemm, p.name
    return f"its producer {p.op_type} cannot absorb 1/s"


def smooth_quant(
    model: onnx.ModelProto, calibration: Iterable[Any], alpha: float = 0.5
) -> tuple[onnx.ModelProto, list[SmoothQuantDecision]]:
    """A SmoothQuant-rescaled copy of ``model`` (same float function) and one decision per
    MatMul / Gemm activation considered. ``alpha`` in [0, 1]: 0 leaves the activation's
    outliers, 1 moves them all into the weight."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"SmoothQuant alpha must be in [0, 1], got {alpha}; 0.5 is the default.")
    work = named(model)
    batches = calibration_batches(calibration, work)
    idx = GraphIndex(work)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in work.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[0] not in idx.init:
            groups.setdefault(node.input[0], []).append(node)
    plans: list[tuple[str, list[onnx.NodeProto], Callable, str]] = []
    decisions: list[SmoothQuantDecision] = []
    for x, _ in groups.items():
        consumers = idx.consumers.get(x, [])
        names = [c.name for c in consumers]
        producer = idx.producer[x].name if x in idx.producer else "input"
        weights = [_consumer_weight(idx, c) for c in consumers]
        if bad := next((w for w in weights if isinstance(w, str)), None):
            decisions.append(SmoothQuantDecision(x, producer, names, False, bad))
            continue
        ks = {w.shape[axis] for w, axis in weights}
        if len(ks) != 1:
            decisions.append(
                SmoothQuantDecision(x, producer, names, False, "consumers disagree on K")
            )
            continue
        fold = _fold_inverse(idx, x, ks.pop())
        if isinstance(fold, str):
            decisions.append(SmoothQuantDecision(x, producer, names, False, fold))
            continue
        plans.append((x, consumers, fold[0], fold[1]))
    if not plans:
        return work, decisions
    session = probe(work, [p[0] for p in plans])
    amax = [None] * len(plans)
    tensors = [p[0] for p in plans]
    for batch in batches:
        for i, v in enumerate(session.run(tensors, feed(work, batch))):
            m = np.abs(v.astype(np.float64)).reshape(-1, v.shape[-1]).max(0)
            amax[i] = m if amax[i] is None else np.maximum(amax[i], m)
    for (x, consumers, fold, producer), ax in zip(plans, amax, strict=True):
        wmax = np.zeros_like(ax)
        for c in consumers:  # re-read: an earlier group may have rescaled this weight
            w, axis = _consumer_weight(idx, c)
            wmax = np.maximum(wmax, np.abs(np.moveaxis(w, axis, 0)).reshape(len(ax), -1).max(1))
        ok = (ax > 0) & (wmax > 0)
        s = np.ones_like(ax)
        s[ok] = ax[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
        fold(s)
        for c in consumers:
            w, axis = _consumer_weight(idx, c)
            shape = [1, 1]
            shape[axis] = -1
            idx.set(c.input[1], w * s.reshape(shape))
        med = float(np.median(ax)) or 1.0
        after = ax / s
        med_after = float(np.median(after)) or 1.0
        decisions.append(
            SmoothQuantDecision(
                x,
                producer,
                [c.name for c in consumers],
                True,
                scale_min=float(s.min()),
                scale_max=float(s.max()),
                act_range_before=float(ax.max() / med),
                act_range_after=float(after.max() / med_after),
            )
        )
    return work, decisions


@register_pass
class SmoothQuant(OnnxPass):
    """Move activation outliers into the weights of the MatMul / Gemm reading them (exact in
    float; see the module docstring)."""

    name = "smooth-quant"
    # an exact rewrite; without a float64 run of an ONNX graph to measure the model's own
    # rounding, a fixed bound 10x float32's default leaves room for a transformer's depth
    numerics = Numerics.exact(rtol=1e-4)

    @dataclass(frozen=True)
    class Options:
        alpha: float = field(
            default=0.5,
            metadata={"min": 0.0, "max": 1.0, "doc": "a in s_j = max|X_j|^a / max|W_j|^(1-a)"},
        )

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        stage_run(ctx).say("smoothquant: measuring activation channel ranges")
        smoothed, decisions = smooth_quant(model, stage_batches(ctx, model), self.options.alpha)
        # each refusal's reason is in its decision
        stats = Counter("smoothed" if d.applied else "refused" for d in decisions)
        return PassResult(smoothed, stats["smoothed"] > 0, stats, list(decisions))

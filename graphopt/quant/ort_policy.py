"""What ONNX Runtime fuses into integer kernels: which tensors of a graph get a Q/DQ pair.

This is the policy of the int8 stage (as torch.ao's ``Quantizer`` annotates a graph before its
``prepare`` inserts observers); :mod:`graphopt.quant.qdq` is the mechanism that calibrates and
inserts the pairs :func:`plan_pairs` asks for.

Which tensors get a pair follows ORT's QDQ selectors (``shared/notes/algorithms.md`` §5.2):

* Conv: ``DQ(x), DQ(W), DQ(b) -> Conv -> Q`` becomes ``QLinearConv``; the Q on the output is
  required. Gemm becomes ``QGemm``, MatMul ``QLinearMatMul`` (with Q) or
  ``MatMulIntegerToFloat`` (without); their output gets a pair only when a quantised op reads
  it, otherwise it stays float (logits, a transformer's MatMul before its bias Add): one
  rounding fewer and no Q/DQ in front of a float op.
* A Relu, or a Clip with constant bounds around 0 (ReLU6), that is the only consumer of a
  quantised op's output is not given a pair of its own input: the pair goes on its output,
  and with uint8 activations (zero point 0 = q_min, the range starting at 0) ORT's
  ``ReluQuantFusion`` / ``ClipQuantFusion`` delete it, the clip of Q doing its work. For a
  Clip the scale is shrunk, if needed, until ``[s(q_min - z), s(q_max - z)]`` lies inside the
  bounds in float32 (ClipQuantFusion's condition).
* Add, Mul, Concat, GlobalAveragePool, AveragePool get pairs on their inputs and their output
  (``QLinearAdd`` ... ``QLinearGlobalAveragePool``) when every operand already has a pair:
  a ResNet's residual Add between QLinearConvs becomes ``QLinearAdd``, with the Relu after it
  folded into its Q; an Add that would need a new Q on a float operand (a transformer's
  residual, next to a float bias Add and LayerNorm) stays float, which is faster in ORT.
* Data-movement ops (MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Slice, Expand,
  Tile) after a quantised tensor get an output pair with the *same* scale and zero point as the
  input, so that ORT drops both and runs them on the integers.
* A float consumer of a tensor produced by a float op (or a graph input) keeps reading the
  exact tensor, not the DQ; below a quantised producer every consumer reads the DQ, since ORT
  fuses the producer's output Q only when the Q is its sole reader.

Activations are asymmetric uint8 by default, not symmetric int8: with symmetric int8 the zero
point of a post-ReLU tensor is 0, not q_min = -128, so ``ReluQuantFusion`` cannot remove the
Relu and half the code range is spent on values that never occur. ``activations="int8"`` gives

A node is left in float, with the reason, when it is in ``skip``, when its weight is not a
float32 initializer, or when its attributes are outside what the integer kernel handles (Gemm
with ``transA`` / alpha / beta != 1, a 1-D or 5-D Conv). The mechanism may still keep a planned
node in float (its bias overflows int32, a tensor holds inf) and plans again without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from graphopt.core.names import layer_name
from graphopt.quant.graph import GraphIndex, attr, opset
from graphopt.quant.qparams import QParams

__all__ = [
    "COMPUTE_OPS",
    "INTEGER_OPS",
    "OWN_SCALE_OPS",
    "SAME_SCALE_OPS",
    "LayerDecision",
    "Plan",
    "fit_bounds",
    "plan_pairs",
    "weight_axis",
]

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# why a compute node has no weight to quantise (a transformer's attention MatMuls, activation x
# activation): the reports count the layers with weights apart from these
NO_WEIGHT = "weight is not a constant initializer"
# ops with an integer kernel that needs its own output scale (QLinearAdd, QLinearConcat, ...)
OWN_SCALE_OPS = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool")
# ops ORT runs on the integers when DQ -> op -> Q share one scale and zero point
SAME_SCALE_OPS = (
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Expand",
    "Tile",
)
# what ORT's optimised graph holds when it fused a QDQ group into an integer kernel
INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "NhwcQLinearConv",
)


@dataclass
class LayerDecision:
    """What became of one compute node: quantised, or kept in float and why."""

    node: str
    op_type: str
    quantized: bool
    reason: str = ""

    @property
    def outcome(self) -> str:  # what the report counts
        return "int8" if self.quantized else "float"

    @property
    def severity(self) -> float:  # the report lists layers kept in float first
        return 0.0 if self.quantized else 1.0

    def __str__(self) -> str:
        state = "int8" if self.quantized else f"float ({self.reason})"
        return f"{self.op_type} {layer_name(self.node)}: {state}"


def count_layers(layers: Iterable[LayerDecision | dict[str, Any]]) -> tuple[str, str]:
    """``("50 of 235 layers", "50 of 50 with weights, ")``: the layers that are int8, and, where
    some of them have no weights (a transformer's bias Adds and residuals, its attention's
    activation x activation MatMuls: ONNX Runtime runs them in float beside the integer
    kernels), those with weights ('' where every layer is int8 or has weights), to open the
    parenthesis after the count. ``layers``: decisions or their JSON dicts."""
    rows = [
        (d.get("op_type", ""), bool(d.get("quantized")), d.get("reason", ""))
        if isinstance(d, dict)  # a saved report's: read as leniently as the rest of it
        else (d.op_type, d.quantized, d.reason)
        for d in layers
    ]
    weighted = [q for op, q, why in rows if op in COMPUTE_OPS and why != NO_WEIGHT]
    int8 = sum(q for _, q, _ in rows)
    apart = weighted and len(weighted) < len(rows) and int8 < len(rows)  # some are float
    return (
        f"{int8} of {len(rows)} layers",
        f"{sum(weighted)} of {len(weighted)} with weights, " if apart else "",
    )


def _weight_reason(g: GraphIndex, node: onnx.NodeProto, index: int) -> str:
    """Why input ``index`` of ``node`` cannot be a quantised weight ('' when it can)."""
    if len(node.input) <= index or node.input[index] not in g.init:
        return NO_WEIGHT
    if g.init[node.input[index]].data_type != TensorProto.FLOAT:
        return "weight is not float32"
    return ""


def _compute_reason(g: GraphIndex, node: onnx.NodeProto) -> str:
    """Why a Conv / Gemm / MatMul cannot become an integer kernel ('' when it can)."""
    if not g.is_float_activation(node.input[0]):
        return "activation input is not a float32 tensor"
    if reason := _weight_reason(g, node, 1):
        return reason
    w = g.array(node.input[1])
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and node.input[2] not in g.init:
        return "bias is not a constant initializer"
    if node.op_type == "Conv":
        if w.ndim != 4:
            return f"{w.ndim - 2}-D convolution (QLinearConv on CPU is used for 2-D here)"
        if has_bias and g.array(node.input[2]).shape != (w.shape[0],):
            return "bias shape differs from the output channels"
    elif node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1 (QGemm's selector refuses it)"
        if attr(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
        n = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        if has_bias and g.array(node.input[2]).shape != (n,):
            return "Gemm bias is not a vector over the output features"
    elif node.op_type == "MatMul":
        if w.ndim != 2:
            return "MatMul weight is not 2-D"
        if len(node.input) > 2:
            return "unexpected third MatMul input"
    return ""


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight (§5.2 rule 2)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # MatMul B[K, N]


# ------------------------------------------------------------------------------------------------
# planning: which tensors get a Q/DQ pair


@dataclass
class Plan:
    """The pairs a graph gets: the decision per layer, the quantised nodes, the tensors observed
    on the calibration data, the tensors sharing another's parameters, and the Relu / Clip
    outputs whose parameters must fit the bounds (:func:`fit_bounds`)."""

    layers: list[LayerDecision] = field(default_factory=list)
    quantized_nodes: list[onnx.NodeProto] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)  # tensors with their own statistics
    alias: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose qparams it shares
    wants: dict[str, list[str]] = field(default_factory=dict)  # node -> tensors it gave pairs
    # output of a Relu / Clip that ORT deletes when the Q's range lies inside [lo, hi]
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, name: str) -> None:
        if name not in self.observed and name not in self.alias:
            self.observed.append(name)

    def has(self, name: str) -> bool:
        return name in self.observed or name in self.alias

    def root(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name


def _clip_bounds(g: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """``(lo, hi)`` of a Relu, or of a Clip with constant bounds around 0; None otherwise."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    if opset(g.model) < 11:
        lo, hi = attr(node, "min", -np.inf), attr(node, "max", np.inf)
    else:
        bounds = []
        for k, default in ((1, -np.inf), (2, np.inf)):
            if len(node.input) <= k or not node.input[k]:
                bounds.append(default)
                continue
            value = g.constant(node.input[k])
            if value is None or value.size != 1:
                return None  # bounds computed at run time: ORT cannot fold the Clip
            bounds.append(float(value.reshape(())))
        lo, hi = bounds
    # the Q's range contains 0 (zero padding stays exact), so it fits only bounds around 0
    return (float(lo), float(hi)) if lo <= 0 <= hi and lo < hi else None


def _operand_reason(g: GraphIndex, node: onnx.NodeProto, act_inputs: list[str]) -> str:
    """Why an Add / Mul / Concat / pool cannot become its integer kernel ('' when it can)."""
    if any(g.constant(i) is not None for i in act_inputs):
        return "a constant operand (only activation operands are quantised)"
    if not all(g.is_float_activation(i) for i in act_inputs):
        return "an operand is not a float32 tensor"
    if node.op_type == "AveragePool" and attr(node, "count_include_pad", 0):
        return "AveragePool with count_include_pad"
    return ""


def _output_pairs(
    g: GraphIndex, node: onnx.NodeProto, skip: set[str], activations: str, plan: Plan
) -> list[str]:
    """The tensors after a quantised ``node`` that get a pair, a Relu / Clip taken into account.

    A Gemm / MatMul output that no quantised op reads stays float (QGemm with float output,
    MatMulIntegerToFloat): one rounding fewer, and no Q/DQ before a float consumer.
    """
    out = node.output[0]
    users = g.consumers.get(out, [])
    act = users[0] if len(users) == 1 and out not in g.outputs else None
    bounds = _clip_bounds(g, act) if act is not None and act.name not in skip else None
    after = act.output[0] if bounds is not None else out
    if node.op_type in ("Gemm", "MatMul") and not plan.has(after):
        return []
    if bounds is None:
        return [out]
    if activations == "int8":
        return [out, after]  # z = 0 != q_min: ORT keeps the activation, between two pairs
    # the pair goes after the Relu / Clip only; ORT deletes the activation (its
    # Relu/ClipQuantFusion), the clip of Q doing its work
    plan.bounds[after] = bounds
    return [after]


def plan_pairs(
    g: GraphIndex, skip: set[str], activations: str, refused: dict[str, str] | None = None
) -> Plan:
    """Which tensors get a Q/DQ pair. ``refused``: nodes to keep in float, with the reason.

    1. Conv / Gemm / MatMul: the activation input and (Conv always, Gemm / MatMul when a
       quantised op reads it) the output, after a Relu / Clip that ORT can delete.
    2. In graph order: a data-movement op whose input has a pair shares it (an alias of the
       same scale and zero point); Add / Mul / Concat / pools are quantised only when every
       operand already has a pair, so they never add a QuantizeLinear on a float tensor: a
       transformer's residual Add between a float bias Add and LayerNorm stays float, a
       ResNet's between two QLinearConvs becomes QLinearAdd.
    """
    plan = Plan()
    refused = refused or {}
    nodes = list(g.model.graph.node)
    decisions: dict[str, LayerDecision] = {}

    def decide(node: onnx.NodeProto, act_inputs: list[str], reason: str) -> bool:
        if not reason and len(node.output) != 1:
            reason = "more than one output"
        reason = reason or refused.get(node.name, "")
        decisions[node.name] = LayerDecision(node.name, node.op_type, not reason, reason)
        if not reason:
            plan.quantized_nodes.append(node)
            plan.wants[node.name] = list(act_inputs)
            for name in act_inputs:
                plan.add(name)
        return not reason

    compute = []
    for node in nodes:
        if node.op_type in COMPUTE_OPS and node.name in skip:
            decisions[node.name] = LayerDecision(node.name, node.op_type, False, "in the skip list")
        elif node.op_type in COMPUTE_OPS and decide(
            node, [node.input[0]], _compute_reason(g, node)
        ):
            compute.append(node)
    for node in compute:  # outputs once every compute input is known
        for name in _output_pairs(g, node, skip, activations, plan):
            plan.wants[node.name].append(name)
            plan.add(name)
    for node in nodes:
        op = node.op_type
        if op in SAME_SCALE_OPS and node.name not in skip and len(node.output) == 1:
            src, out = node.input[0], node.output[0]
            if op == "MaxPool" and opset(g.model) < 12:
                continue  # int8 MaxPool needs opset 12
            if plan.has(src) and g.is_float_activation(out) and out not in plan.alias:
                # same values, rearranged: one scale for both sides, so ORT drops the pair
                if out in plan.observed:
                    plan.observed.remove(out)
                plan.alias[out] = src
        elif op in OWN_SCALE_OPS:
            if node.name in skip:
                decisions[node.name] = LayerDecision(node.name, op, False, "in the skip list")
                continue
            act_inputs = [i for i in node.input if i]
            reason = _operand_reason(g, node, act_inputs)
            if not reason and (bare := [i for i in act_inputs if not plan.has(i)]):
                reason = (
                    f"operand {bare[0]!r} has no Q/DQ pair (its producer stays float); an "
                    "integer kernel here would add a QuantizeLinear"
                )
            if decide(node, act_inputs, reason):
                for name in _output_pairs(g, node, skip, activations, plan):
                    plan.wants[node.name].append(name)
                    plan.add(name)
    order = {n.name: i for i, n in enumerate(nodes)}
    plan.layers = sorted(decisions.values(), key=lambda d: order[d.node])
    plan.quantized_nodes.sort(key=lambda n: order[n.name])
    return plan


def fit_bounds(qp: QParams, lo: float, hi: float) -> QParams:
    """``qp`` with its scale shrunk, if needed, so that ``[s(q_min - z), s(q_max - z)]`` lies
    inside ``[lo, hi]`` in float32: ORT's ClipQuantFusion only deletes a Clip then (it allows
    float32 epsilon); rounding the observed range to a zero point can overshoot ``hi``."""
    z = int(qp.zero_point)
    s = np.float32(qp.scale.item())
    limits = []
    if qp.qmax > z and np.isfinite(hi):
        limits.append(hi / (qp.qmax - z))
    if qp.qmin < z and np.isfinite(lo):
        limits.append(lo / (qp.qmin - z))
    for limit in limits:
        if s > limit:
            s = np.float32(limit)
    # float32 rounding of the division may still leave s*(q - z) a hair outside
    while (np.isfinite(hi) and s * np.float32(qp.qmax - z) > hi) or (
        np.isfinite(lo) and s * np.float32(qp.qmin - z) < lo
    ):
        s = np.nextafter(s, np.float32(0))
    if s == np.float32(qp.scale.item()):
        return qp
    return replace(qp, scale=torch.tensor(s, dtype=torch.float32))

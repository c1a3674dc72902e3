"""Calibrated QDQ insertion on an ONNX graph, placed so that ONNX Runtime fuses integer kernels.

``quantize_onnx(model, calibration)`` runs the float model in ONNX Runtime over the calibration
batches, observes the activations that must be quantised, and rewrites a copy of the graph:

    activation t (per tensor):   t -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> consumers
    weight W (per channel c):    DequantizeLinear(int8 Wq, s_w[c], 0, axis)      Wq = round(W / s_w)
    bias b (per channel c):      DequantizeLinear(int32 bq, s_x * s_w[c], 0)     bq = round(b / s_b)

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
symmetric int8 (z = 0) for EPs that need it; then a Relu gets its own input and output pairs.

A node is left in float, with the reason in :class:`QuantReport`, when it is in ``skip``, when
its weight is not a float32 initializer, when its attributes are outside what the integer
kernel handles (Gemm with ``transA`` / alpha / beta != 1, a 1-D or 5-D Conv), when its bias
would overflow int32 at ``s_x * s_w``, or when a tensor it would quantise holds inf or NaN on
the calibration data (an attention mask's -inf). Such a Conv/Gemm reading a quantised tensor
gets its own DQ with the scale repeated per channel (axis 1): from a per-tensor DQ, ORT's
``WeightBiasQuantization`` would quantise its float weights anyway. Calibration batches are
checked by :func:`graphopt.quant.calibration.validate_calibration_batches` (NaN / inf, wrong
shape, count); integer model inputs (token ids, masks) are checked as float64 and fed to the
model in their own dtype.

    >>> qmodel, report = quantize_onnx(proto, [(x,) for x in batches], method="entropy")  # doctest: +SKIP
    >>> print(report)                                                                      # doctest: +SKIP
    >>> integer_op_counts(ort_optimized_model(qmodel))                                     # doctest: +SKIP

Not handled: per-channel activations, int16 / int4, QDQ on constants that feed Add/Mul/Concat
(those ops stay float), ConvTranspose, ORT's enlarging of the weight scale when a bias would
overflow (the layer stays float instead), and pre-processing such as BN folding (export in
eval mode folds BN already).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt._util import close_matches
from graphopt.backends.onnxruntime import EXACT_INT8_CONFIG
from graphopt.errors import BackendError, GraphoptError, InputError
from graphopt.quant.calibration import (
    OBSERVERS,
    MethodChoice,
    Observer,
    QParams,
    choose_observer,
    make_observer,
    quantize_bias,
    to_fixed_batch,
    validate_calibration_batches,
    weight_qparams,
)

__all__ = [
    "INTEGER_OPS",
    "LayerDecision",
    "QuantReport",
    "integer_op_counts",
    "ort_optimized_model",
    "quantize_onnx",
]

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
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
METHODS = (*OBSERVERS, "auto")
_ACTIVATION_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


# ------------------------------------------------------------------------------------------------
# report


@dataclass
class LayerDecision:
    """What became of one compute node: quantised, or kept in float and why."""

    node: str
    op_type: str
    quantized: bool
    reason: str = ""

    def __str__(self) -> str:
        state = "int8" if self.quantized else f"float ({self.reason})"
        return f"{self.op_type} {self.node}: {state}"


@dataclass
class QuantReport:
    """The outcome of :func:`quantize_onnx`.

    ``layers``: one decision per Conv / Gemm / MatMul / Add / ... node considered;
    ``activations``: the quantisation parameters of each quantised activation tensor (shared
    ones repeated under every name); ``choices``: for ``method="auto"``, the method kept per
    tensor with the error of each candidate; ``batches``: calibration batches seen.
    """

    method: str
    activation_dtype: str
    layers: list[LayerDecision] = field(default_factory=list)
    activations: dict[str, QParams] = field(default_factory=dict)
    choices: dict[str, MethodChoice] = field(default_factory=dict)
    batches: int = 0

    @property
    def quantized(self) -> list[str]:
        """Names of the nodes that were quantised."""
        return [d.node for d in self.layers if d.quantized]

    @property
    def float_layers(self) -> dict[str, str]:
        """Nodes kept in float, with the reason."""
        return {d.node: d.reason for d in self.layers if not d.quantized}

    def __str__(self) -> str:
        head = (
            f"QDQ quantisation ({self.method}, {self.activation_dtype} activations, "
            f"{self.batches} calibration batches): {len(self.quantized)} of {len(self.layers)} "
            "layers quantised"
        )
        lines = [head, *(f"  {d}" for d in self.layers)]
        lines += [f"  {name}: {qp}" for name, qp in self.activations.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# graph helpers


class _Graph:
    """Index of an ONNX graph: initializers, producers, consumers, float tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.init = {t.name: t for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.init]
        self.outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.elem_type: dict[str, int] = {}
        self.channels: dict[str, int] = {}  # size of axis 1, where known
        for vi in itertools.chain(
            inferred.graph.value_info, inferred.graph.input, inferred.graph.output
        ):
            self.elem_type[vi.name] = vi.type.tensor_type.elem_type
            dims = vi.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[1].HasField("dim_value"):
                self.channels[vi.name] = dims[1].dim_value

    def is_float_activation(self, name: str) -> bool:
        return (
            bool(name) and name not in self.init and self.elem_type.get(name) == TensorProto.FLOAT
        )

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.init[name])

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a ``Constant`` node's output; None otherwise."""
        if name in self.init:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
            if isinstance(value, (int, float, list)):  # value_float(s), value_int(s)
                return np.asarray(value)
        return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_reason(g: _Graph, node: onnx.NodeProto, index: int) -> str:
    """Why input ``index`` of ``node`` cannot be a quantised weight ('' when it can)."""
    if len(node.input) <= index or node.input[index] not in g.init:
        return "weight is not a constant initializer"
    if g.init[node.input[index]].data_type != TensorProto.FLOAT:
        return "weight is not float32"
    return ""


def _compute_reason(g: _Graph, node: onnx.NodeProto) -> str:
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
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1 (QGemm's selector refuses it)"
        if _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
        n = w.shape[0] if _attr(node, "transB", 0) else w.shape[1]
        if has_bias and g.array(node.input[2]).shape != (n,):
            return "Gemm bias is not a vector over the output features"
    elif node.op_type == "MatMul":
        if w.ndim != 2:
            return "MatMul weight is not 2-D"
        if len(node.input) > 2:
            return "unexpected third MatMul input"
    return ""


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight (§5.2 rule 2)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # MatMul B[K, N]


# ------------------------------------------------------------------------------------------------
# planning: which tensors get a Q/DQ pair


@dataclass
class _Plan:
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


def _clip_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """``(lo, hi)`` of a Relu, or of a Clip with constant bounds around 0; None otherwise."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    if _opset(g.model) < 11:
        lo, hi = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
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


def _operand_reason(g: _Graph, node: onnx.NodeProto, act_inputs: list[str]) -> str:
    """Why an Add / Mul / Concat / pool cannot become its integer kernel ('' when it can)."""
    if any(g.constant(i) is not None for i in act_inputs):
        return "a constant operand (only activation operands are quantised)"
    if not all(g.is_float_activation(i) for i in act_inputs):
        return "an operand is not a float32 tensor"
    if node.op_type == "AveragePool" and _attr(node, "count_include_pad", 0):
        return "AveragePool with count_include_pad"
    return ""


def _output_pairs(
    g: _Graph, node: onnx.NodeProto, skip: set[str], activations: str, plan: _Plan
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


def _plan(
    g: _Graph, skip: set[str], activations: str, refused: dict[str, str] | None = None
) -> _Plan:
    """Which tensors get a Q/DQ pair. ``refused``: nodes to keep in float, with the reason.

    1. Conv / Gemm / MatMul: the activation input and (Conv always, Gemm / MatMul when a
       quantised op reads it) the output, after a Relu / Clip that ORT can delete.
    2. In graph order: a data-movement op whose input has a pair shares it (an alias of the
       same scale and zero point); Add / Mul / Concat / pools are quantised only when every
       operand already has a pair, so they never add a QuantizeLinear on a float tensor: a
       transformer's residual Add between a float bias Add and LayerNorm stays float, a
       ResNet's between two QLinearConvs becomes QLinearAdd.
    """
    plan = _Plan()
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
            if op == "MaxPool" and _opset(g.model) < 12:
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


def _fit_bounds(qp: QParams, lo: float, hi: float) -> QParams:
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


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


# ------------------------------------------------------------------------------------------------
# calibration


def _session(model: onnx.ModelProto, level: str = "none") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    # no spinning after a run: torch computes the statistics in between, on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry(*EXACT_INT8_CONFIG)
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise BackendError(
            f"ONNX Runtime could not load the model: {type(exc).__name__}: {exc}"
        ) from exc


def _reference_inputs(model: onnx.ModelProto, first: Sequence[Any], names: list[str]) -> list:
    """Tensors shaped like the model's inputs (batch 1); unknown sizes taken from ``first``."""
    by_name = {i.name: i for i in model.graph.input}
    refs = []
    for j, name in enumerate(names):
        dims = by_name[name].type.tensor_type.shape.dim
        shape = [1]
        for k, d in enumerate(list(dims)[1:], start=1):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                x = first[j] if j < len(first) else None
                shape.append(int(x.shape[k]) if x is not None and x.ndim > k else 1)
        refs.append(torch.zeros(shape if dims else []))
    return refs


def _batches(
    model: onnx.ModelProto, calibration: Iterable[Any], names: list[str]
) -> Iterable[tuple[torch.Tensor, ...]]:
    it = iter(calibration)
    try:
        first = next(it)
    except StopIteration:
        raise InputError(
            "the calibration data is empty; pass an iterable of input tuples (a few hundred "
            "samples representative of deployment)."
        ) from None
    items = tuple(first) if isinstance(first, (tuple, list)) else (first,)
    as_t = [torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in items]
    refs = _reference_inputs(model, as_t, names)
    # integer inputs (token ids, masks) are checked as float64, exact below 2**53, and fed to
    # the model in its own dtype by _collect
    integer = [j for j, name in enumerate(names) if _input_dtype(model, name) != np.float32]
    return to_fixed_batch(
        validate_calibration_batches(
            (_as_float(batch, integer) for batch in itertools.chain([first], it)), refs
        ),
        fixed_batch(model),
    )


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every input of ``model`` fixes (dim 0 a number), else None (dynamic)."""
    sizes = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def _input_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    vi = next(i for i in model.graph.input if i.name == name)
    return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)


def _as_float(batch: Any, integer: list[int]) -> tuple:
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(
        torch.as_tensor(x).double()
        if j in integer and isinstance(x, (np.ndarray, torch.Tensor))
        else x
        for j, x in enumerate(items)
    )


def _collect(
    model: onnx.ModelProto,
    g: _Graph,
    plan: _Plan,
    calibration: Iterable[Any],
    method: str,
    symmetric: bool,
) -> tuple[dict[str, QParams], dict[str, MethodChoice], int, set[str]]:
    """Run the float model on a copy whose graph outputs include every observed tensor.

    Returns the parameters of the observed tensors, the ``auto`` choices, the number of
    batches, and the observed tensors that held inf or NaN in some batch (an attention mask's
    -inf, for instance): those get no parameters.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in plan.observed:
        if name not in present and name not in g.inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = _session(probe)
    out_names = [o.name for o in session.get_outputs()]
    observers: dict[str, Observer] = {}
    kept: dict[str, list[torch.Tensor]] = {}
    nonfinite: set[str] = set()
    n = 0
    for batch in _batches(model, calibration, g.inputs):
        feed = {
            name: x.detach().numpy().astype(_input_dtype(model, name))
            for name, x in zip(g.inputs, batch, strict=True)
        }
        values = dict(zip(out_names, session.run(out_names, feed), strict=True))
        values.update(feed)
        for name in plan.observed:
            if name in nonfinite:
                continue
            array = values[name]
            if not (np.isfinite(array.min()) and np.isfinite(array.max())):  # NaN propagates
                nonfinite.add(name)
                continue
            x = torch.from_numpy(np.asarray(array, order="C"))
            if method == "auto":
                kept.setdefault(name, []).append(x)
            else:
                observers.setdefault(name, make_observer(method)).observe(x)
        n += 1
    qparams: dict[str, QParams] = {}
    choices: dict[str, MethodChoice] = {}
    for name in plan.observed:
        if name in nonfinite:
            continue
        if method == "auto":
            choices[name] = choose_observer(kept[name], symmetric=symmetric, name=name)
            qparams[name] = choices[name].qparams
        else:
            qparams[name] = observers[name].qparams(symmetric=symmetric)
    return qparams, choices, n, nonfinite


# ------------------------------------------------------------------------------------------------
# rewriting


def _np_dtype(qp: QParams) -> type:
    return {"uint8": np.uint8, "int8": np.int8, "int32": np.int32}[qp.dtype]


def _add_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _qdq_activation(
    model: onnx.ModelProto,
    g: _Graph,
    name: str,
    qp: QParams,
    float_nodes: set[str],
    int8_readers: set[str],
) -> list:
    """Q/DQ nodes for activation ``name``; consumers are rewired to the DQ output.

    A float consumer of a tensor that a float op (or the caller) produced keeps reading the
    exact tensor: no rounding, no DQ to run (a transformer's residual Add beside the MatMul
    that reads the same LayerNorm output). Below a quantised producer every consumer reads
    the DQ, since ORT fuses the producer's output Q only when the Q is its sole reader.
    A float Conv/Gemm (``float_nodes``) reading a per-tensor DQ would get its weights quantised
    by ORT's ``WeightBiasQuantization``; it gets its own DQ with the same scale repeated per
    channel (axis 1), which that transformer and the QDQ selectors leave alone.
    """
    producer = g.producer.get(name)
    users = g.consumers.get(name, [])
    if (producer is None or producer.name not in int8_readers) and name not in g.outputs:
        users = [u for u in users if u.name in int8_readers]
    scale = _add_init(model, f"{name}_scale", np.asarray(qp.scale.item(), dtype=np.float32))
    zp = _add_init(model, f"{name}_zero_point", np.asarray(int(qp.zero_point), dtype=_np_dtype(qp)))
    quantized, dequantized = f"{name}_quantized", f"{name}_dequantized"
    if name in g.outputs:
        # keep the graph output's name on the DQ result; the producer writes a new name
        source = f"{name}_float"
        if producer is not None:
            producer.output[list(producer.output).index(name)] = source
        for user in users:
            user.input[:] = [source if i == name else i for i in user.input]
        dequantized, name = name, source
        users = []
    else:
        for user in users:
            user.input[:] = [dequantized if i == name else i for i in user.input]
    extra = []
    keep_float = [u for u in users if u.name in float_nodes]
    channels = g.channels.get(dequantized if dequantized == name else name)
    if keep_float and channels:
        c_scale = _add_init(
            model, f"{name}_scale_c", np.full(channels, qp.scale.item(), dtype=np.float32)
        )
        c_zp = _add_init(
            model, f"{name}_zero_point_c", np.full(channels, int(qp.zero_point), _np_dtype(qp))
        )
        out = f"{name}_dequantized_c"
        extra.append(
            helper.make_node(
                "DequantizeLinear", [quantized, c_scale, c_zp], [out], name=f"{name}_DQc", axis=1
            )
        )
        for user in keep_float:
            user.input[:] = [out if i == dequantized else i for i in user.input]
    return [
        helper.make_node("QuantizeLinear", [name, scale, zp], [quantized], name=f"{name}_Q"),
        helper.make_node(
            "DequantizeLinear", [quantized, scale, zp], [dequantized], name=f"{name}_DQ"
        ),
        *extra,
    ]


def _dq_constant(model: onnx.ModelProto, base: str, q: np.ndarray, qp: QParams) -> tuple:
    """A DequantizeLinear of an integer initializer (per channel when ``qp.axis`` is set)."""
    qname = _add_init(model, f"{base}_quantized", q)
    scale = _add_init(model, f"{base}_scale", qp.scale.numpy().astype(np.float32))
    zp = _add_init(model, f"{base}_zero_point", qp.zero_point.numpy().astype(q.dtype))
    attrs = {"axis": qp.axis} if qp.axis is not None and qp.scale.dim() > 0 else {}
    out = f"{base}_dequantized"
    node = helper.make_node(
        "DequantizeLinear", [qname, scale, zp], [out], name=f"{base}_DQ", **attrs
    )
    return node, out


def _quantize_weights(
    model: onnx.ModelProto, g: _Graph, node: onnx.NodeProto, x_qp: QParams
) -> tuple[list, str]:
    """Per-channel int8 weight and int32 bias DQs for ``node``; ('', nodes) or a reason."""
    w = torch.from_numpy(g.array(node.input[1]).copy())
    w_qp = weight_qparams(w, axis=_weight_axis(node))
    new_inputs = list(node.input)
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias:
        b = torch.from_numpy(g.array(node.input[2]).copy())
        try:
            b_q = quantize_bias(b, x_qp, w_qp)
        except GraphoptError as exc:
            return [], f"bias overflows int32 at s_x*s_w ({exc})"
    tag = node.name or node.output[0]
    w_node, w_out = _dq_constant(model, f"{tag}_W", w_qp.quantize(w).numpy().astype(np.int8), w_qp)
    new_nodes = [w_node]
    new_inputs[1] = w_out
    if has_bias:
        b_scale = QParams(
            (x_qp.scale.double() * w_qp.scale.double()).float(),
            torch.zeros(b.shape[0], dtype=torch.int64),
            -(2**31),
            2**31 - 1,
            "int32",
            axis=0,
        )
        b_node, b_out = _dq_constant(model, f"{tag}_B", b_q.numpy().astype(np.int32), b_scale)
        new_nodes.append(b_node)
        new_inputs[2] = b_out
    node.input[:] = new_inputs
    return new_nodes, ""


def quantize_onnx(
    model: onnx.ModelProto,
    calibration: Iterable[Any],
    method: str = "minmax",
    skip: Iterable[str] = (),
    *,
    activations: str = "uint8",
) -> tuple[onnx.ModelProto, QuantReport]:
    """A QDQ-quantised copy of ``model`` calibrated on ``calibration``, and the report.

    ``calibration``: an iterable of batches, each a tuple of numpy arrays or torch tensors in the
    order of the model's inputs (a lone tensor counts as a 1-tuple). ``method``: ``minmax``,
    ``percentile``, ``entropy``, ``mse``, or ``auto`` (per tensor, the method with the lowest
    fake-quantisation error; keeps every batch of every observed tensor in memory).
    ``skip``: node names to keep in float. ``activations``: ``uint8`` (asymmetric, the default;
    see the module docstring) or ``int8`` (symmetric). ``model`` is not modified.
    """
    if method not in METHODS:
        raise GraphoptError(
            f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}."
            + close_matches(method, METHODS)
        )
    if activations not in _ACTIVATION_TYPES:
        raise GraphoptError(f"activations must be 'uint8' or 'int8'; got {activations!r}.")
    if _opset(model) < 13:
        raise InputError(
            f"the model has opset {_opset(model)}; per-channel DequantizeLinear needs opset "
            ">= 13. Re-export with a newer opset or convert it with onnx.version_converter."
        )
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for i, node in enumerate(work.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    names = {n.name for n in work.graph.node}
    skip = set(skip)
    for s in skip:
        if s not in names:
            raise InputError(
                f"skip names node {s!r}, which is not in the graph." + close_matches(s, names)
            )
    g = _Graph(work)
    plan = _plan(g, skip, activations)
    qparams, choices, batches, nonfinite = _collect(
        work, g, plan, calibration, method, symmetric=activations == "int8"
    )
    if nonfinite:
        # a node whose operand or result is not finite (an attention mask's -inf) stays float;
        # planning again only drops pairs, so every tensor left was observed
        refused = {
            node: f"{bad[0]!r} holds inf or NaN on the calibration data"
            for node, wants in plan.wants.items()
            if (bad := [t for t in wants if plan.root(t) in nonfinite])
        }
        plan = _plan(g, skip, activations, refused)
    for name, (lo, hi) in plan.bounds.items():
        qparams[name] = _fit_bounds(qparams[name], lo, hi)
    for name in plan.alias:
        qparams[name] = qparams[plan.root(name)]
    report = QuantReport(method, activations, plan.layers, batches=batches)
    report.choices = {k: v for k, v in choices.items() if plan.has(k)}
    # weights first: a layer whose bias cannot be quantised goes back to float
    weight_nodes: dict[str, list] = {}
    replaced = set()  # float weights and biases that a DQ of integers may have replaced
    for node in plan.quantized_nodes:
        if node.op_type not in COMPUTE_OPS:
            continue
        replaced.update(i for i in node.input[1:3] if i in g.init)
        new_nodes, reason = _quantize_weights(work, g, node, qparams[node.input[0]])
        if reason:
            for d in report.layers:
                if d.node == node.name:
                    d.quantized, d.reason = False, reason
            continue
        weight_nodes[node.name] = new_nodes
    report.activations = {name: qparams[name] for name in [*plan.observed, *plan.alias]}
    float_nodes = {
        d.node for d in report.layers if not d.quantized and d.op_type in ("Conv", "Gemm")
    }
    # nodes that read a DQ: the quantised ones, the data-movement ops ORT runs on the
    # integers and the Relu / Clip it deletes in front of a Q
    int8_readers = {d.node for d in report.layers if d.quantized}
    int8_readers |= {g.producer[name].name for name in [*plan.alias, *plan.bounds]}
    qdq: dict[str, list] = {}
    for name in [*plan.observed, *plan.alias]:
        qdq[name] = _qdq_activation(work, g, name, qparams[name], float_nodes, int8_readers)
    # rebuild the node list in topological order: Q/DQ right after the producer
    ordered: list[onnx.NodeProto] = []
    for name in g.inputs:
        ordered += qdq.pop(name, [])
    for node in list(work.graph.node):
        ordered += weight_nodes.pop(node.name, [])
        ordered.append(node)
        for out in node.output:
            key = out[: -len("_float")] if out.endswith("_float") else out
            ordered += qdq.pop(key, [])
    del work.graph.node[:]
    work.graph.node.extend(ordered)
    used = {i for n in work.graph.node for i in n.input}
    if unused := replaced - used:
        kept = [t for t in work.graph.initializer if t.name not in unused]
        del work.graph.initializer[:]
        work.graph.initializer.extend(kept)
    onnx.checker.check_model(work)
    return work, report


# ------------------------------------------------------------------------------------------------
# checking what ORT made of it


def ort_optimized_model(model: onnx.ModelProto, level: str = "extended") -> onnx.ModelProto:
    """The graph ONNX Runtime (CPU) runs after its optimisations, read back from the file
    ``SessionOptions.optimized_model_filepath`` writes. ``level``: ``basic`` (constant folding
    and semantics-preserving rewrites only), ``extended`` or ``all``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        opts.optimized_model_filepath = path
        opts.add_session_config_entry(*EXACT_INT8_CONFIG)
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime could not load the model: {type(exc).__name__}: {exc}"
            ) from exc
        return onnx.load(path)


def integer_op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each integer-kernel op type (:data:`INTEGER_OPS`) ``model`` holds."""
    return Counter(n.op_type for n in model.graph.node if n.op_type in INTEGER_OPS)

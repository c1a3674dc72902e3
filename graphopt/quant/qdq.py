"""Calibrated QDQ insertion on an ONNX graph: the mechanism that places the pairs the ONNX
Runtime policy (:mod:`graphopt.quant.ort_policy`) asks for.

``quantize_onnx(model, calibration)`` runs the float model in ONNX Runtime over the calibration
batches, observes the activations that must be quantised, and rewrites a copy of the graph:

    activation t (per tensor):   t -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> consumers
    weight W (per channel c):    DequantizeLinear(int8 Wq, s_w[c], 0, axis)      Wq = round(W / s_w)
    bias b (per channel c):      DequantizeLinear(int32 bq, s_x * s_w[c], 0)     bq = round(b / s_b)

Activations are asymmetric uint8 by default, not symmetric int8: with symmetric int8 the zero
point of a post-ReLU tensor is 0, not q_min = -128, so ``ReluQuantFusion`` cannot remove the
Relu and half the code range is spent on values that never occur. ``activations="int8"`` gives
symmetric int8 (z = 0) for EPs that need it; then a Relu gets its own input and output pairs.

A node is left in float, with the reason in :class:`QuantReport`, where the policy refuses it,
when its bias would overflow int32 at ``s_x * s_w``, or when a tensor it would quantise holds
inf or NaN on the calibration data (an attention mask's -inf). Such a Conv/Gemm reading a
quantised tensor gets its own DQ with the scale repeated per channel (axis 1): from a
per-tensor DQ, ORT's ``WeightBiasQuantization`` would quantise its float weights anyway.
Calibration batches are checked by :func:`graphopt.quant.calibration.iter_calibration_batches`
(NaN / inf, wrong shape, count); integer model inputs (token ids, masks) are checked as float64
and fed to the model in their own dtype.

    >>> qmodel, report = quantize_onnx(proto, [(x,) for x in batches], method="entropy")  # doctest: +SKIP
    >>> print(report)                                                                      # doctest: +SKIP
    >>> integer_op_counts(ort_optimized_model(qmodel))                                     # doctest: +SKIP

Not handled: per-channel activations, int16 / int4, QDQ on constants that feed Add/Mul/Concat
(those ops stay float), ConvTranspose, ORT's enlarging of the weight scale when a bias would
overflow (the layer stays float instead), and pre-processing such as BN folding (export in
eval mode folds BN already).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt._util import close_matches
from graphopt.backends.onnxruntime import ort_optimized_model
from graphopt.core.progress import current
from graphopt.errors import GraphoptError, InputError
from graphopt.quant.annotations import weight_bits as marked_weight_bits
from graphopt.quant.calibration import MethodChoice, iter_calibration_batches, pick_method
from graphopt.quant.graph import GraphIndex, named, opset
from graphopt.quant.observers import (
    OBSERVERS,
    HistogramObserver,
    Observer,
    make_observer,
    observe_all,
)
from graphopt.quant.ort_policy import (
    COMPUTE_OPS,
    INTEGER_OPS,
    LayerDecision,
    Plan,
    fit_bounds,
    plan_pairs,
    weight_axis,
)
from graphopt.quant.qparams import QParams, quantize_bias, weight_qparams
from graphopt.quant.runtime import feed, one_torch_thread, probe

__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_SAMPLE",
    "AUTO_TOP",
    "METHODS",
    "QuantReport",
    "integer_op_counts",
    "ort_optimized_model",
    "quantize_onnx",
]

METHODS = (*OBSERVERS, "auto")
AUTO_CANDIDATES = ("minmax", "percentile", "entropy", "mse")
# method="auto" measures the candidates' error, per batch of each tensor, on about its AUTO_TOP
# largest |x| and on AUTO_SAMPLE elements drawn uniformly, standing for the rest
AUTO_TOP = 2**10
AUTO_SAMPLE = 2**15
_ACTIVATION_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


# ------------------------------------------------------------------------------------------------
# report


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
    weight_bits: int = 8  # 7: int8 values in [-63, 63] (see weight_qparams)
    weight_bits_reason: str = ""

    @property
    def quantized(self) -> list[str]:
        """Names of the nodes that were quantised."""
        return [d.node for d in self.layers if d.quantized]

    @property
    def float_layers(self) -> dict[str, str]:
        """Nodes kept in float, with the reason."""
        return {d.node: d.reason for d in self.layers if not d.quantized}

    def __str__(self) -> str:
        weights = f", {self.weight_bits}-bit weights" if self.weight_bits != 8 else ""
        head = (
            f"QDQ quantisation ({self.method}, {self.activation_dtype} activations{weights}, "
            f"{self.batches} calibration batches): {len(self.quantized)} of {len(self.layers)} "
            "layers quantised"
        )
        lines = [head, *(f"  {d}" for d in self.layers)]
        lines += [f"  {name}: {qp}" for name, qp in self.activations.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# calibration


def _collect(
    model: onnx.ModelProto,
    plan: Plan,
    calibration: Iterable[Any],
    method: str,
    symmetric: bool,
) -> tuple[dict[str, QParams], dict[str, MethodChoice], int, set[str]]:
    """Run the float model on a copy whose graph outputs include every observed tensor.

    Returns the parameters of the observed tensors, the ``auto`` choices, the number of
    batches, and the observed tensors that held inf or NaN in some batch (an attention mask's
    -inf, for instance): those get no parameters.
    """
    session = probe(model, plan.observed)
    out_names = [o.name for o in session.get_outputs()]
    methods = AUTO_CANDIDATES if method == "auto" else (method,)
    observers: dict[str, list[Observer]] = {}
    samples: dict[str, _ErrorSample] = {}
    nonfinite: set[str] = set()
    gen = torch.Generator().manual_seed(0)  # the same sample on every run
    n = 0
    for batch in iter_calibration_batches(calibration, model):
        inputs = feed(model, batch)
        values = dict(zip(out_names, session.run(out_names, inputs), strict=True))
        values.update(inputs)
        for name in plan.observed:
            if name in nonfinite:
                continue
            x = torch.from_numpy(np.asarray(values[name], order="C"))
            if not all(math.isfinite(v.item()) for v in torch.aminmax(x)):  # NaN propagates
                nonfinite.add(name)
                continue
            fed = observers.setdefault(name, [make_observer(m) for m in methods])
            observe_all(fed, x)
            if method == "auto":
                histogram = next(o for o in fed if isinstance(o, HistogramObserver))
                samples.setdefault(name, _ErrorSample()).add(x, histogram, gen)
        n += 1
    qparams: dict[str, QParams] = {}
    choices: dict[str, MethodChoice] = {}
    names: Iterable[str] = plan.observed
    if method == "auto":  # a second or more per tensor on big activations
        names = current().track(plan.observed, "auto: calibration method", unit="tensor")
    for name in names:
        if name in nonfinite:
            continue
        if method == "auto":
            choices[name] = pick_method(
                observers[name], samples[name].error, symmetric=symmetric, name=name
            )
            qparams[name] = choices[name].qparams
        else:
            qparams[name] = observers[name][0].qparams(symmetric=symmetric)
    return qparams, choices, n, nonfinite


class _ErrorSample:
    """What ``method="auto"`` keeps of one tensor to measure the candidates' error, per batch:
    every element with ``|x| >= tau`` (where clipping errs; ``tau`` leaves about
    :data:`AUTO_TOP` elements per batch above it in the histogram so far) and
    :data:`AUTO_SAMPLE` elements drawn uniformly, those below ``tau`` standing for the rest.
    All of a batch that is not larger than that."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # top, drawn, weight
        self.count = 0

    def add(self, x: torch.Tensor, histogram: HistogramObserver, gen: torch.Generator) -> None:
        flat = x.reshape(-1)
        n = flat.numel()
        self.count += n
        if n <= AUTO_TOP + AUTO_SAMPLE:
            self.parts.append((flat.clone(), flat[:0], 0.0))
            return
        tail = np.cumsum(histogram.abs_hist()[::-1])[::-1]  # tail[j]: count with |x| >= j w
        j = int(np.flatnonzero(tail >= AUTO_TOP * histogram.batches)[-1])
        array = flat.numpy()  # numpy's boolean indexing: 6x torch's on one thread
        top = np.abs(array) >= j * histogram.width
        drawn = torch.randint(n, (AUTO_SAMPLE,), generator=gen).numpy()
        rest = drawn[~top[drawn]]  # a uniform sample of the elements below tau
        self.parts.append((torch.from_numpy(array[top]), flat[rest], n / AUTO_SAMPLE))

    def error(self, qp: QParams) -> float:
        """The fake-quantisation MSE of the tensor: exact on the elements above ``tau``, the
        drawn ones standing for the rest (each for ``n / AUTO_SAMPLE`` elements of its batch)."""
        total = 0.0
        for top, drawn, weight in self.parts:
            total += qp.squared_error(top) + (weight * qp.squared_error(drawn) if weight else 0.0)
        return total / max(self.count, 1)


# ------------------------------------------------------------------------------------------------
# rewriting


def _np_dtype(qp: QParams) -> type:
    return {"uint8": np.uint8, "int8": np.int8, "int32": np.int32}[qp.dtype]


def _add_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _qdq_activation(
    model: onnx.ModelProto,
    g: GraphIndex,
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
    model: onnx.ModelProto, g: GraphIndex, node: onnx.NodeProto, x_qp: QParams, bits: int
) -> tuple[list, str]:
    """Per-channel int8 weight (``bits`` 8 or 7) and int32 bias DQs for ``node``; ('', nodes)
    or a reason."""
    w = torch.from_numpy(g.array(node.input[1]).copy())
    w_qp = weight_qparams(w, axis=weight_axis(node), bits=bits)
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
    weight_bits: int | None = None,
) -> tuple[onnx.ModelProto, QuantReport]:
    """A QDQ-quantised copy of ``model`` calibrated on ``calibration``, and the report.

    ``calibration``: an iterable of batches, each a tuple of numpy arrays or torch tensors in the
    order of the model's inputs (a lone tensor counts as a 1-tuple). ``method``: ``minmax``,
    ``percentile``, ``entropy``, ``mse``, or ``auto`` (per tensor, the method with the lowest
    fake-quantisation error, measured per batch on about the :data:`AUTO_TOP` largest ``|x|`` and
    :data:`AUTO_SAMPLE` elements drawn uniformly, all of a smaller batch; percentile, entropy
    and mse read one shared histogram).
    ``skip``: node names to keep in float. ``activations``: ``uint8`` (asymmetric, the default;
    see the module docstring) or ``int8`` (symmetric). ``weight_bits``: 8, or 7 (int8 values in
    ``[-63, 63]``: exact on x86 int8 kernels without VNNI, see :func:`weight_qparams`); None
    reads the int8 stage's mark (:func:`~graphopt.quant.annotations.weight_bits`), else 8.
    ``model`` is not modified.
    """
    check_arguments(model, method, activations, skip)
    work = named(model)
    skip = set(skip)
    g = GraphIndex(work, types=True)
    plan = plan_pairs(g, skip, activations)
    with one_torch_thread():
        qparams, choices, batches, nonfinite = _collect(
            work, plan, calibration, method, symmetric=activations == "int8"
        )
    if nonfinite:
        # a node whose operand or result is not finite (an attention mask's -inf) stays float;
        # planning again only drops pairs, so every tensor left was observed
        refused = {
            node: f"{bad[0]!r} holds inf or NaN on the calibration data"
            for node, wants in plan.wants.items()
            if (bad := [t for t in wants if plan.root(t) in nonfinite])
        }
        plan = plan_pairs(g, skip, activations, refused)
    for name, (lo, hi) in plan.bounds.items():
        qparams[name] = fit_bounds(qparams[name], lo, hi)
    for name in plan.alias:
        qparams[name] = qparams[plan.root(name)]
    bits, why = marked_weight_bits(model) if weight_bits is None else (weight_bits, "")
    report = QuantReport(method, activations, plan.layers, batches=batches)
    report.weight_bits, report.weight_bits_reason = bits, why
    report.choices = {k: v for k, v in choices.items() if plan.has(k)}
    report.activations = {name: qparams[name] for name in [*plan.observed, *plan.alias]}
    _rewrite(work, g, plan, qparams, report)
    onnx.checker.check_model(work)
    return work, report


def check_arguments(
    model: onnx.ModelProto, method: str, activations: str, skip: Iterable[str] = ()
) -> None:
    """Raise on a method, activation type, opset or skip list :func:`quantize_onnx` refuses."""
    if method not in METHODS:
        raise GraphoptError(
            f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}."
            + close_matches(method, METHODS)
        )
    if activations not in _ACTIVATION_TYPES:
        raise GraphoptError(f"activations must be 'uint8' or 'int8'; got {activations!r}.")
    if opset(model) < 13:
        raise InputError(
            f"the model has opset {opset(model)}; per-channel DequantizeLinear needs opset "
            ">= 13. Re-export with a newer opset or convert it with onnx.version_converter."
        )
    names = {n.name for n in named(model).graph.node}
    for s in skip:
        if s not in names:
            raise InputError(
                f"skip names node {s!r}, which is not in the graph." + close_matches(s, names)
            )


def _rewrite(
    work: onnx.ModelProto,
    g: GraphIndex,
    plan: Plan,
    qparams: dict[str, QParams],
    report: QuantReport,
) -> None:
    """Insert the weight DQs and the activation pairs of ``plan`` into ``work``; a layer whose
    bias cannot be quantised goes back to float (in ``report``)."""
    weight_nodes: dict[str, list] = {}
    replaced = set()  # float weights and biases that a DQ of integers may have replaced
    for node in plan.quantized_nodes:
        if node.op_type not in COMPUTE_OPS:
            continue
        replaced.update(i for i in node.input[1:3] if i in g.init)
        new_nodes, reason = _quantize_weights(
            work, g, node, qparams[node.input[0]], report.weight_bits
        )
        if reason:
            for d in report.layers:
                if d.node == node.name:
                    d.quantized, d.reason = False, reason
            continue
        weight_nodes[node.name] = new_nodes
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


# ------------------------------------------------------------------------------------------------
# checking what ORT made of it


def integer_op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each integer-kernel op type (:data:`INTEGER_OPS`) ``model`` holds."""
    return Counter(n.op_type for n in model.graph.node if n.op_type in INTEGER_OPS)

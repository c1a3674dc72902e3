"""Post-training int8 accuracy improvers on the ONNX graph, and the calibrated int8 flow.

They work on the ONNX model that :func:`graphopt.quant.qdq.quantize_onnx` quantises, so that the
layers they correct are exactly the nodes that become integer kernels, and a layer kept in float
by the mixed-precision search gets its float bias back (``shared/notes/algorithms.md`` §5.5).

**SmoothQuant** (Xiao et al. 2023) for ``Y = X W`` (MatMul ``W[K, N]``, or Gemm), with
per-input-channel ``s_j = max|X_j|^a / max|W_j|^(1-a)`` (``a = alpha``, 0.5 by default)::

    Y = (X diag(s)^-1) (diag(s) W)

``diag(s)^-1`` is folded into the producer of ``X``: a LayerNormalization's gamma and beta, a
MatMul / Gemm weight's output columns (and the bias ``Add`` of a constant after a MatMul), so
the float model computes the same function (float32 rounding only) while the activation the
int8 kernel reads has its outlier channels divided down and the weight, quantised per output
channel, absorbs them. ``W_j`` is taken over every consumer of ``X`` (Q, K and V projections
sharing one LayerNorm get one ``s``). Refused (with the reason): a producer that cannot absorb
``1/s`` (GELU, Relu, a graph input...), an ``X`` read by anything other than constant-weight
MatMul / Gemm, initializers shared with other nodes.

**Bias correction** (Nagel et al. 2019, empirical): per output channel ``c`` of each quantised
Conv / Gemm / MatMul, in topological order::

    b[c] += E[y_float[c]] - E[y_wq[c]]

where ``y_float`` is the layer's output in the float model and ``y_wq`` its output in the model
whose weights, up to and including this layer, are the int8-rounded ones
(``weight_qparams(W).fake_quantize(W)``, exactly what ``quantize_onnx`` stores) and whose earlier
biases are already corrected; the expectation is over the calibration data and every position
(batch, spatial, tokens). The systematic shift rounding puts in the outputs thereby goes into the
bias. A MatMul without a constant bias ``Add`` after it is not corrected (``no bias to fold``).

**Mixed precision** (:func:`quantize_int8` with ``max_drop``): quantise everything, measure the
drop of a metric against the float model on the calibration data; if it exceeds ``max_drop``,
measure each quantised layer's sensitivity (the drop with only that layer kept in float) and keep
layers in float greedily, the one whose un-quantisation helps most first, each step measured,
until the drop is within ``max_drop`` (with ``method="auto"`` the ranking runs with minmax
calibration, which needs no histograms, and every step of the search with ``auto``). The metric is the user's ``metric(predict) -> score``
(higher is better; ``predict(*arrays)`` runs a model on numpy inputs) or, by default, top-1
agreement with the float model (a 2-D output of at least 2 classes) or output cosine similarity
(other outputs); the drop of the default is ``1 - score``.

Calibration methods: ``method="auto"`` picks, per activation tensor, the observer with the
lowest fake-quantisation error (the issue's per-layer choice); it keeps every calibration batch
of every observed tensor and costs about 4x the histogram passes of one method.

    >>> qmodel, report = quantize_int8(proto, batches, max_drop=0.01)  # doctest: +SKIP
    >>> print(report)                                                    # doctest: +SKIP

Not handled: AdaRound, analytic (BN-based) bias correction, SmoothQuant through Transpose or
Reshape between the producer and the MatMul, per-channel activations.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import BackendError, InputError
from graphopt.quant.calibration import (
    to_fixed_batch,
    validate_calibration_batches,
    weight_qparams,
)
from graphopt.quant.qdq import EXACT_INT8_CONFIG, QuantReport, fixed_batch, quantize_onnx

log = logging.getLogger(__name__)

__all__ = [
    "BiasCorrection",
    "Int8Report",
    "LayerSensitivity",
    "SmoothQuantDecision",
    "apply_bias_shifts",
    "bias_correction",
    "calibration_batches",
    "default_metric",
    "quantize_int8",
    "smooth_quant",
]

Batch = tuple[np.ndarray, ...]
Metric = Callable[[Callable[..., Any]], float]


# ------------------------------------------------------------------------------------------------
# decisions (plain data: the report prints them, JSON serialises them)


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

    def __str__(self) -> str:
        if not self.applied:
            return f"smoothquant {self.tensor}: not applied ({self.reason})"
        return (
            f"smoothquant {self.tensor} ({self.producer} -> {', '.join(self.consumers)}): "
            f"s in [{self.scale_min:.3g}, {self.scale_max:.3g}], channel outlier ratio "
            f"{self.act_range_before:.3g} -> {self.act_range_after:.3g}"
        )


@dataclass
class BiasCorrection:
    """The bias shift folded into one layer (or why none was)."""

    node: str
    op_type: str
    applied: bool
    max_abs_shift: float = 0.0
    mean_abs_shift: float = 0.0
    reason: str = ""

    def __str__(self) -> str:
        if not self.applied:
            return f"bias correction {self.op_type} {self.node}: not applied ({self.reason})"
        return (
            f"bias correction {self.op_type} {self.node}: |shift| mean {self.mean_abs_shift:.3g}, "
            f"max {self.max_abs_shift:.3g}"
        )


@dataclass
class LayerSensitivity:
    """The metric drop with only this layer kept in float (everything else int8)."""

    node: str
    op_type: str
    drop_without: float

    def __str__(self) -> str:
        return f"sensitivity {self.op_type} {self.node}: drop {self.drop_without:.4g} when float"


@dataclass
class Int8Report:
    """What :func:`quantize_int8` did: improvers, per-layer precision with reasons, the drop.

    ``quant``: the final :class:`QuantReport` (``layers`` says int8 or float and why);
    ``drop_all``: the metric drop with every quantisable layer in int8; ``drop``: the drop of
    the returned model; ``fallback``: layers kept in float by the ``max_drop`` search, in the
    order they were added.
    """

    quant: QuantReport
    metric: str
    drop_all: float
    drop: float
    max_drop: float | None = None
    smoothquant: list[SmoothQuantDecision] = field(default_factory=list)
    bias: list[BiasCorrection] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)

    @property
    def int8_layers(self) -> list[str]:
        return self.quant.quantized

    @property
    def float_layers(self) -> dict[str, str]:
        """Layers kept in float, with the reason."""
        return self.quant.float_layers

    def lines(self) -> list[str]:
        """One line per decision, for the optimize report."""
        q = self.quant
        budget = f", allowed {self.max_drop:g}" if self.max_drop is not None else ""
        out = [
            f"int8: {len(q.quantized)} of {len(q.layers)} layers int8 ({q.method} calibration, "
            f"{q.activation_dtype} activations, {q.batches} batches); {self.metric} drop "
            f"{self.drop:.4g}{budget} (all int8: {self.drop_all:.4g})"
        ]
        out += [f"  {d}" for d in q.layers]
        out += [f"  {s}" for s in self.smoothquant]
        out += [f"  {b}" for b in self.bias]
        out += [f"  {s}" for s in self.sensitivity]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ------------------------------------------------------------------------------------------------
# ONNX helpers


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named (``<op>_<index>`` where unnamed, as quantize_onnx does)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for i, node in enumerate(work.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return work


def _input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    opts.log_severity_level = 3
    opts.add_session_config_entry(*EXACT_INT8_CONFIG)  # no int16 saturation on x86 w/o VNNI
    try:
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(
            f"ONNX Runtime could not load the model: {type(exc).__name__}: {exc}"
        ) from exc


def _probe(model: onnx.ModelProto, tensors: Sequence[str]) -> ort.InferenceSession:
    """A session whose outputs are ``tensors`` (intermediate float tensors of ``model``)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return _session(probe)


def _feed(model: onnx.ModelProto, batch: Batch) -> dict[str, np.ndarray]:
    return {
        n: np.asarray(x, dtype=np.float32, order="C")
        for n, x in zip(_input_names(model), batch, strict=True)
    }


class _Index:
    """Producers, consumers and initializers of a graph (views into ``model``)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.init = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.uses: Counter = Counter()
        for node in model.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
                    self.uses[i] += 1
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The float32 initializer ``name`` used by exactly one node, else None."""
        t = self.init.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or self.uses[name] != 1:
            return None
        return numpy_helper.to_array(t).copy()

    def set(self, name: str, array: np.ndarray) -> None:
        self.init[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def calibration_batches(calibration: Iterable[Any], model: onnx.ModelProto) -> list[Batch]:
    """The calibration data as a list of numpy tuples, checked against ``model``'s inputs.

    Raises :class:`InputError` on an empty iterable, NaN / inf, a wrong input count or shape.
    """
    if calibration is None:
        raise InputError(
            "int8 quantisation needs calibration data: pass calibration_data=[(x,), ...], "
            "batches of inputs representative of deployment (a few hundred samples)."
        )
    names = _input_names(model)
    by_name = {i.name: i for i in model.graph.input}
    items = list(calibration)
    if not items:
        raise InputError(
            "the calibration data is empty; pass an iterable of input tuples (a few hundred "
            "samples representative of deployment)."
        )
    first = items[0] if isinstance(items[0], (tuple, list)) else (items[0],)
    refs = []
    for j, name in enumerate(names):
        dims = by_name[name].type.tensor_type.shape.dim
        shape = [1]
        for k, d in enumerate(list(dims)[1:], start=1):
            x = first[j] if j < len(first) else None
            known = d.dim_value if d.HasField("dim_value") else None
            shape.append(known or (int(x.shape[k]) if x is not None and x.ndim > k else 1))
        refs.append(torch.zeros(shape))
    return [
        tuple(x.detach().cpu().float().numpy() for x in batch)
        for batch in to_fixed_batch(validate_calibration_batches(items, refs), fixed_batch(model))
    ]


def _channel_means(values: np.ndarray, axis: int) -> np.ndarray:
    axis %= values.ndim
    v = np.moveaxis(values.astype(np.float64), axis, 0)
    return v.reshape(v.shape[0], -1).mean(1)


# ------------------------------------------------------------------------------------------------
# SmoothQuant


def _consumer_weight(idx: _Index, node: onnx.NodeProto) -> tuple[np.ndarray, int] | str:
    """(weight, input-channel axis) of a MatMul / Gemm reading X as its first input, or why not."""
    if node.op_type == "MatMul":
        w = idx.const(node.input[1])
        if w is None or w.ndim != 2:
            return "a MatMul whose weight is not a 2-D constant of its own"
        return w, 0
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return "a Gemm with transA"
        w = idx.const(node.input[1])
        if w is None:
            return "a Gemm whose weight is not a constant of its own"
        return w, 1 if _attr(node, "transB", 0) else 0
    return f"a {node.op_type} reads it"


def _fold_inverse(idx: _Index, x: str, k: int) -> tuple[Callable[[np.ndarray], None], str] | str:
    """A function applying ``X /= s`` through the producer of ``x``, and its name; or why not."""
    p = idx.producer.get(x)
    if p is None:
        return "a graph input (no producer to fold 1/s into)"
    if x in idx.outputs:
        return "the tensor is a graph output"
    if p.op_type == "LayerNormalization":
        gamma = idx.const(p.input[1])
        beta = idx.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if gamma is None or gamma.shape != (k,) or _attr(p, "axis", -1) not in (-1,):
            return "a LayerNormalization without its own [K] gamma over the last axis"
        if len(p.input) > 2 and p.input[2] and beta is None:
            return "a LayerNormalization whose beta is not a constant of its own"

        def apply_ln(s: np.ndarray) -> None:  # arrays re-read: an earlier group may scale them
            idx.set(p.input[1], idx.const(p.input[1]) / s)
            if beta is not None:
                idx.set(p.input[2], idx.const(p.input[2]) / s)

        return apply_ln, p.name
    if p.op_type == "Add":
        const = [i for i in p.input if i in idx.init]
        other = [i for i in p.input if i not in idx.init]
        if len(const) != 1 or len(other) != 1:
            return "an Add that is not tensor + constant"
        c = idx.const(const[0])
        y = other[0]
        mm = idx.producer.get(y)
        if c is None or c.shape != (k,):
            return "an Add whose constant is not a [K] vector of its own"
        if mm is None or mm.op_type != "MatMul" or len(idx.consumers.get(y, [])) != 1:
            return "an Add of a constant not after a MatMul used only there"
        w = idx.const(mm.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != k:
            return "the MatMul before the Add has no [., K] constant weight of its own"

        def apply_add(s: np.ndarray) -> None:
            idx.set(mm.input[1], idx.const(mm.input[1]) / s[None, :])
            idx.set(const[0], idx.const(const[0]) / s)

        return apply_add, f"{mm.name}+{p.name}"
    if p.op_type == "MatMul":
        w = idx.const(p.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != k:
            return "a MatMul without a [., K] constant weight of its own"

        def apply_mm(s: np.ndarray) -> None:
            idx.set(p.input[1], idx.const(p.input[1]) / s[None, :])

        return apply_mm, p.name
    if p.op_type == "Gemm" and not _attr(p, "transA", 0):
        w = idx.const(p.input[1])
        trans_b = _attr(p, "transB", 0)
        c = idx.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if w is None or (w.shape[0] if trans_b else w.shape[1]) != k:
            return "a Gemm without a constant weight of its own"
        if len(p.input) > 2 and p.input[2] and (c is None or c.shape != (k,)):
            return "a Gemm whose bias is not a [K] constant of its own"

        def apply_gemm(s: np.ndarray) -> None:
            idx.set(p.input[1], idx.const(p.input[1]) / (s[:, None] if trans_b else s[None, :]))
            if c is not None:
                idx.set(p.input[2], idx.const(p.input[2]) / s)

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
    work = _named(model)
    batches = calibration_batches(calibration, work)
    idx = _Index(work)
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
    session = _probe(work, [p[0] for p in plans])
    amax = [None] * len(plans)
    for batch in batches:
        for i, v in enumerate(session.run(None, _feed(work, batch))):
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


# ------------------------------------------------------------------------------------------------
# bias correction


@dataclass
class _BiasSite:
    node: onnx.NodeProto
    weight: str
    axis: int  # the weight's output-channel axis
    out_axis: int  # the output's channel axis
    bias: str | None  # initializer to add the shift to (None: a Conv/Gemm without one)


def _bias_site(idx: _Index, node: onnx.NodeProto) -> _BiasSite | str:
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return "not a Conv / Gemm / MatMul"
    if len(node.input) < 2 or idx.const(node.input[1]) is None:
        return "weight is not a float32 constant of its own"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        return _BiasSite(node, node.input[1], 0, 1, bias)
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1"
        if bias is not None and _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
        return _BiasSite(node, node.input[1], 0 if _attr(node, "transB", 0) else 1, -1, bias)
    users = idx.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in idx.outputs:
        add = users[0]
        const = [i for i in add.input if i != node.output[0]]
        if len(const) == 1 and idx.const(const[0]) is not None:
            return _BiasSite(node, node.input[1], 1, -1, const[0])
    return "no bias to fold into (a MatMul without a constant Add after it)"


def bias_correction(
    model: onnx.ModelProto,
    calibration: Iterable[Any],
    skip: Iterable[str] = (),
) -> tuple[onnx.ModelProto, list[BiasCorrection], dict[str, np.ndarray]]:
    """Empirical bias correction of every Conv / Gemm / MatMul not in ``skip``.

    Returns the corrected float copy of ``model``, a decision per layer, and the shifts by node
    name (reusable with :func:`apply_bias_shifts` for a subset of the layers). The weights are
    unchanged: ``quantize_onnx`` rounds them exactly as measured here.
    """
    work = _named(model)
    batches = calibration_batches(calibration, work)
    idx = _Index(work)
    skip = set(skip)
    sites: list[_BiasSite] = []
    decisions: list[BiasCorrection] = []
    for node in work.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name in skip:
            continue
        site = _bias_site(idx, node)
        if isinstance(site, str):
            decisions.append(BiasCorrection(node.name, node.op_type, False, reason=site))
        else:
            sites.append(site)
    if not sites:
        return work, decisions, {}
    outs = [s.node.output[0] for s in sites]
    reference = _means(work, batches, outs, [s.out_axis for s in sites])
    probe = _named(model)
    pidx = _Index(probe)
    probe_nodes = {n.name: n for n in probe.graph.node}
    shifts: dict[str, np.ndarray] = {}
    for k, work_site in enumerate(sites):
        site = _bias_site(pidx, probe_nodes[work_site.node.name])
        assert isinstance(site, _BiasSite)  # the same graph as work, where it was a site
        w = pidx.const(site.weight)
        pidx.set(site.weight, weight_qparams(torch.from_numpy(w), axis=site.axis)
                 .fake_quantize(torch.from_numpy(w)).numpy())  # fmt: skip
        got = _means(probe, batches, [outs[k]], [site.out_axis])[0]
        shift = reference[k] - got
        shifts[site.node.name] = shift
        _add_bias(pidx, site, shift)
        decisions.append(
            BiasCorrection(
                site.node.name,
                site.node.op_type,
                True,
                max_abs_shift=float(np.abs(shift).max()),
                mean_abs_shift=float(np.abs(shift).mean()),
            )
        )
    return apply_bias_shifts(work, shifts), decisions, shifts


def apply_bias_shifts(
    model: onnx.ModelProto, shifts: dict[str, np.ndarray], exclude: Iterable[str] = ()
) -> onnx.ModelProto:
    """A copy of ``model`` with ``shifts[node]`` added to each node's bias (except ``exclude``);
    a Conv / Gemm without a bias gets one."""
    work = _named(model)
    idx = _Index(work)
    exclude = set(exclude)
    for node in work.graph.node:
        if node.name in shifts and node.name not in exclude:
            site = _bias_site(idx, node)
            if isinstance(site, _BiasSite):
                _add_bias(idx, site, shifts[node.name])
    return work


def _add_bias(idx: _Index, site: _BiasSite, shift: np.ndarray) -> None:
    if site.bias is None:
        name = f"{site.node.name}_corrected_bias"
        idx.model.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), name))
        idx.init[name] = idx.model.graph.initializer[-1]
        idx.uses[name] = 1
        if site.node.op_type == "Gemm" and _attr(site.node, "beta", 1.0) != 1.0:
            raise InputError(f"Gemm {site.node.name} has beta != 1; cannot add a bias to it.")
        site.node.input.append(name)
        site.bias = name
        return
    b = idx.const(site.bias)
    if b is None:  # a shared bias was refused when the site was built
        return
    idx.set(site.bias, b + shift.reshape(b.shape) if b.size == shift.size else b + shift)


def _means(
    model: onnx.ModelProto, batches: Sequence[Batch], tensors: list[str], axes: list[int]
) -> list[np.ndarray]:
    """Per-channel means of ``tensors`` over all batches (every position of each sample)."""
    session = _probe(model, tensors)
    sums: list[np.ndarray | None] = [None] * len(tensors)
    count = 0
    for batch in batches:
        values = session.run(None, _feed(model, batch))
        count += 1
        for i, (v, axis) in enumerate(zip(values, axes, strict=True)):
            m = _channel_means(v, axis)
            sums[i] = m if sums[i] is None else sums[i] + m
    return [s / count for s in sums]


# ------------------------------------------------------------------------------------------------
# metrics, sensitivity and the int8 flow


def _predictor(model: onnx.ModelProto) -> Callable[..., Any]:
    session = _session(model, optimize=True)
    names = [i.name for i in session.get_inputs()]
    fixed = fixed_batch(model)

    def predict(*arrays: Any) -> Any:
        batch = tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays)
        runs = [
            session.run(None, {n: x.numpy() for n, x in zip(names, piece, strict=True)})
            for piece in to_fixed_batch([batch], fixed)  # a fixed-batch model: piece by piece
        ]
        outs = [np.concatenate(o) if len(runs) > 1 else o[0] for o in zip(*runs, strict=True)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return predict


def default_metric(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]
) -> tuple[str, float]:
    """Agreement of ``outputs`` with ``reference`` (lists of per-batch output lists).

    Top-1 agreement of the first output when it is ``[N, classes >= 2]``; otherwise the mean
    per-sample cosine similarity over all outputs. 1.0 means identical.
    """
    first = [r[0] for r in reference]
    if first[0].ndim == 2 and first[0].shape[1] >= 2:
        ref = np.concatenate(first).argmax(1)
        got = np.concatenate([o[0] for o in outputs]).argmax(1)
        return "top-1 agreement with fp32", float((ref == got).mean())
    sims = []
    for ref_b, out_b in zip(reference, outputs, strict=True):
        for r, o in zip(ref_b, out_b, strict=True):
            r64 = r.reshape(r.shape[0], -1).astype(np.float64)
            o64 = o.reshape(o.shape[0], -1).astype(np.float64)
            denom = np.linalg.norm(r64, axis=1) * np.linalg.norm(o64, axis=1)
            sims += list(np.where(denom > 0, (r64 * o64).sum(1) / np.maximum(denom, 1e-300), 1.0))
    return "output cosine with fp32", float(np.mean(sims))


class _Scorer:
    """The drop of a quantised model against the float one, on the calibration batches or with
    the user's metric."""

    def __init__(
        self, model: onnx.ModelProto, batches: Sequence[Batch], metric: Metric | None
    ) -> None:
        self.batches = batches
        self.metric = metric
        float_predict = _predictor(model)
        if metric is None:
            self.reference = [self._all(float_predict, b) for b in batches]
            self.name = default_metric(self.reference, self.reference)[0]
            self.base = 1.0
        else:
            self.name = getattr(metric, "__name__", "metric")
            self.base = float(metric(float_predict))

    @staticmethod
    def _all(predict: Callable[..., Any], batch: Batch) -> list[np.ndarray]:
        out = predict(*batch)
        return list(out) if isinstance(out, tuple) else [out]

    def drop(self, qmodel: onnx.ModelProto) -> float:
        predict = _predictor(qmodel)
        if self.metric is None:
            outs = [self._all(predict, b) for b in self.batches]
            return self.base - default_metric(self.reference, outs)[1]
        return self.base - float(self.metric(predict))


def _progress_batches(
    batches: Sequence[Batch], label: str | None, say: Callable[[str], None] | None, after: str = ""
) -> Iterable[Batch]:
    """Yield ``batches``, drawing a progress bar with ``say`` (about 10 updates), then
    ``after``."""
    n = len(batches)
    every = max(1, n // 10)
    for i, batch in enumerate(batches, start=1):
        yield batch
        if say is not None and (i % every == 0 or i == n):
            done = round(20 * i / n)
            say(f"{label} [{'#' * done}{'.' * (20 - done)}] {i}/{n} batches")
    if say is not None and after:
        say(after)


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
) -> tuple[onnx.ModelProto, Int8Report]:
    """Calibrated int8 QDQ model of ``model`` with SmoothQuant, bias correction and, given
    ``max_drop``, the mixed-precision fallback; and the :class:`Int8Report`.

    ``calibration``: batches (tuples of arrays in input order, first axis = samples).
    ``method``: the calibration method of :func:`quantize_onnx` (``auto``: per tensor by
    measured error). ``skip``: node names always kept in float. ``metric``: the user's
    ``metric(predict) -> score`` (higher is better), default agreement with fp32 on the
    calibration data. ``progress``: called with a line per step (a bar while calibrating).
    ``model`` is not modified.
    """
    say = progress or (lambda _message: None)
    if max_drop is not None and max_drop < 0:
        raise InputError(f"max_drop must be >= 0 (a metric drop), got {max_drop}.")
    work = _named(model)
    batches = calibration_batches(calibration, work)
    base_skip = set(skip)
    sq: list[SmoothQuantDecision] = []
    if smoothquant:
        say("smoothquant: measuring activation channel ranges")
        work, sq = smooth_quant(work, batches, alpha)
    shifts: dict[str, np.ndarray] = {}
    bias: list[BiasCorrection] = []
    if correct_bias:
        say("bias correction: measuring the output shift of each layer's int8 weights")
        _, bias, shifts = bias_correction(work, batches, skip=base_skip)

    def quantize(
        float_nodes: set[str], bar: str | None, how: str = method
    ) -> tuple[onnx.ModelProto, QuantReport]:
        corrected = apply_bias_shifts(work, shifts, exclude=float_nodes) if shifts else work
        return quantize_onnx(
            corrected,
            _progress_batches(
                batches,
                bar,
                progress if bar else None,
                "choosing the calibration method per tensor (auto)" if how == "auto" else "",
            ),
            method=how,
            skip=sorted(float_nodes),
            activations=activations,
        )

    qmodel, report = quantize(base_skip, "calibrating")
    # a corrected layer that quantize_onnx kept in float anyway (e.g. its bias would overflow
    # int32) must not keep the shift: its float weights were never rounded
    kept_float = {d.node for d in report.layers if not d.quantized} & set(shifts)
    if kept_float:
        shifts = {k: v for k, v in shifts.items() if k not in kept_float}
        qmodel, report = quantize(base_skip, None)
    scorer = _Scorer(work, batches, metric)
    drop_all = drop = scorer.drop(qmodel)
    say(f"int8: {scorer.name} drop {drop_all:.4g} with every layer int8")
    result = Int8Report(report, scorer.name, drop_all, drop, max_drop, sq, bias)
    if max_drop is None or drop_all <= max_drop:
        _mark_uncorrected(result)
        return qmodel, result
    candidates = [d for d in report.layers if d.quantized]
    # ranking only orders the search: with "auto" it runs minmax (no histograms per layer);
    # every fallback step below is measured with the chosen method
    rank_method = "minmax" if method == "auto" else method
    for i, d in enumerate(candidates, start=1):
        q_i, _ = quantize(base_skip | {d.node}, None, rank_method)
        result.sensitivity.append(LayerSensitivity(d.node, d.op_type, scorer.drop(q_i)))
        say(f"sensitivity {i}/{len(candidates)}: {result.sensitivity[-1]}")
    ranked = sorted(result.sensitivity, key=lambda s: s.drop_without)
    fallback: list[str] = []
    for s in ranked:
        fallback.append(s.node)
        qmodel, report = quantize(base_skip | set(fallback), None)
        drop = scorer.drop(qmodel)
        say(f"int8: {len(fallback)} layer(s) in float, drop {drop:.4g}")
        if drop <= max_drop:
            break
    sens = {s.node: s.drop_without for s in result.sensitivity}
    for d in report.layers:
        if d.node in fallback:
            d.reason = (
                f"mixed-precision fallback: drop {sens[d.node]:.4g} with only this layer "
                f"float (all int8: {drop_all:.4g}); kept float to bring the drop to "
                f"{drop:.4g} <= max_drop {max_drop:g}"
            )
    result.quant, result.drop, result.fallback = report, drop, fallback
    if drop > max_drop:
        log.warning("int8: drop %.4g still above max_drop %g", drop, max_drop)
    _mark_uncorrected(result)
    return qmodel, result


def _mark_uncorrected(result: Int8Report) -> None:
    """Layers in float carry no bias shift: say so in their bias-correction line."""
    float_layers = result.float_layers
    for b in result.bias:
        if b.applied and b.node in float_layers:
            b.applied, b.reason = False, "layer kept in float"

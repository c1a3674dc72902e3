"""correct-bias: empirical bias correction (Nagel et al. 2019) on the ONNX graph, before int8.

Per output channel ``c`` of each Conv / Gemm / MatMul, in topological order::

    b[c] += E[y_float[c]] - E[y_wq[c]]

where ``y_float`` is the layer's output in the float model and ``y_wq`` its output in the model
whose weights, up to and including this layer, are the int8-rounded ones
(``weight_qparams(W).fake_quantize(W)``, exactly what insert-qdq stores) and whose earlier
biases are already corrected; the expectation is over the calibration data and every position
(batch, spatial, tokens). The systematic shift rounding puts in the outputs thereby goes into
the bias. The float model moves by the shifts (lossy: the output cosine with the model before
stays above 0.99); the int8 model it becomes loses its mean error.

Each changed layer's bias from before is kept in the model (:mod:`graphopt.quant.annotations`):
insert-qdq puts it back on a layer it leaves in float, whose weights are never rounded.
Layers marked to stay in float are not corrected. A MatMul without a constant bias ``Add``
after it is not corrected (``no bias to fold``). Not handled: analytic (BN-based) correction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import PassContext, PassResult
from graphopt.core.progress import current
from graphopt.core.registry import register_pass
from graphopt.errors import InputError
from graphopt.quant.annotations import float_marks, record_original_bias
from graphopt.quant.calibration import Batch, calibration_batches
from graphopt.quant.graph import GraphIndex, attr, named
from graphopt.quant.onnx_passes.common import OnnxPass, stage_batches, stage_run
from graphopt.quant.qparams import weight_qparams
from graphopt.quant.runtime import feed, probe

__all__ = [
    "BiasCorrection",
    "BiasSite",
    "CorrectBias",
    "apply_bias_shifts",
    "bias_correction",
    "bias_site",
]


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
class BiasSite:
    """A layer whose bias can absorb a shift: its weight, the channel axes, the bias."""

    node: onnx.NodeProto
    weight: str
    axis: int  # the weight's output-channel axis
    out_axis: int  # the output's channel axis
    bias: str | None  # initializer to add the shift to (None: a Conv/Gemm without one)


def bias_site(idx: GraphIndex, node: onnx.NodeProto) -> BiasSite | str:
    """Where ``node``'s output shift would go, or why it cannot be corrected."""
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return "not a Conv / Gemm / MatMul"
    if len(node.input) < 2 or idx.own_const(node.input[1]) is None:
        return "weight is not a float32 constant of its own"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        return BiasSite(node, node.input[1], 0, 1, bias)
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1"
        if bias is not None and attr(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
        return BiasSite(node, node.input[1], 0 if attr(node, "transB", 0) else 1, -1, bias)
    users = idx.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in idx.outputs:
        add = users[0]
        const = [i for i in add.input if i != node.output[0]]
        if len(const) == 1 and idx.own_const(const[0]) is not None:
            return BiasSite(node, node.input[1], 1, -1, const[0])
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
    work = named(model)
    batches = calibration_batches(calibration, work)
    idx = GraphIndex(work)
    skip = set(skip)
    sites: list[BiasSite] = []
    decisions: list[BiasCorrection] = []
    for node in work.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name in skip:
            continue
        site = bias_site(idx, node)
        if isinstance(site, str):
            decisions.append(BiasCorrection(node.name, node.op_type, False, reason=site))
        else:
            sites.append(site)
    if not sites:
        return work, decisions, {}
    outs = [s.node.output[0] for s in sites]
    reference = _means(work, batches, outs, [s.out_axis for s in sites])
    probe = named(model)
    pidx = GraphIndex(probe)
    probe_nodes = {n.name: n for n in probe.graph.node}
    shifts: dict[str, np.ndarray] = {}
    for k, work_site in enumerate(current().track(sites, "bias correction", unit="layer")):
        site = bias_site(pidx, probe_nodes[work_site.node.name])
        assert isinstance(site, BiasSite)  # the same graph as work, where it was a site
        w = pidx.own_const(site.weight)
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
    a Conv / Gemm without a bias gets one. The copy remembers each changed bias as it was
    (:func:`graphopt.quant.annotations.restore_biases` puts it back)."""
    work = named(model)
    idx = GraphIndex(work)
    exclude = set(exclude)
    for node in work.graph.node:
        if node.name in shifts and node.name not in exclude:
            site = bias_site(idx, node)
            if isinstance(site, BiasSite):
                original = idx.init[site.bias] if site.bias is not None else None
                record_original_bias(work, node.name, original)
                _add_bias(idx, site, shifts[node.name])
    return work


def _add_bias(idx: GraphIndex, site: BiasSite, shift: np.ndarray) -> None:
    if site.bias is None:
        name = f"{site.node.name}_corrected_bias"
        idx.model.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), name))
        idx.init[name] = idx.model.graph.initializer[-1]
        idx.consumers[name] = [site.node]
        if site.node.op_type == "Gemm" and attr(site.node, "beta", 1.0) != 1.0:
            raise InputError(f"Gemm {site.node.name} has beta != 1; cannot add a bias to it.")
        site.node.input.append(name)
        site.bias = name
        return
    b = idx.own_const(site.bias)
    if b is None:  # a shared bias was refused when the site was built
        return
    idx.set(site.bias, b + shift.reshape(b.shape) if b.size == shift.size else b + shift)


def _means(
    model: onnx.ModelProto, batches: Sequence[Batch], tensors: list[str], axes: list[int]
) -> list[np.ndarray]:
    """Per-channel means of ``tensors`` over all batches (every position of each sample)."""
    session = probe(model, tensors)
    sums: list[np.ndarray | None] = [None] * len(tensors)
    count = 0
    for batch in batches:
        values = session.run(tensors, feed(model, batch))
        count += 1
        for i, (v, axis) in enumerate(zip(values, axes, strict=True)):
            m = _channel_means(v, axis)
            sums[i] = m if sums[i] is None else sums[i] + m
    return [s / count for s in sums]


def _channel_means(values: np.ndarray, axis: int) -> np.ndarray:
    axis %= values.ndim
    v = np.moveaxis(values.astype(np.float64), axis, 0)
    return v.reshape(v.shape[0], -1).mean(1)


@register_pass
class CorrectBias(OnnxPass):
    """Fold the mean output shift of int8-rounded weights into each layer's bias (see the
    module docstring)."""

    name = "correct-bias"
    numerics = Numerics.lossy("cosine", 0.99)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        stage_run(ctx).say(
            "bias correction: measuring the output shift of each layer's int8 weights"
        )
        batches = stage_batches(ctx, model)
        corrected, decisions, shifts = bias_correction(model, batches, skip=float_marks(model))
        # each refusal's reason is in its decision
        stats = Counter("corrected" if d.applied else "refused" for d in decisions)
        return PassResult(corrected, bool(shifts), stats, list(decisions))

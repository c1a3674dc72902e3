"""insert-qdq: calibrated int8 — the decision on the FX graph, the QDQ pairs on the ONNX export.

This pass checks the calibration data against the graph's inputs, counts the layers that can
become int8 kernels, and records the quantisation options in ``gm.meta["graphopt.int8"]``; the
lowering to ONNX Runtime (:func:`graphopt.optimize` with ``precision="int8"``, or any pipeline
holding this pass) then runs :func:`graphopt.quant.improve.quantize_int8` on the exported model::

    export(gm) -> SmoothQuant (Y = (X diag(s)^-1)(diag(s) W), exact in float)
               -> bias correction (b += E[y_float] - E[y_int8-weights], per channel)
               -> quantize_onnx (QDQ pairs, calibration `method`, per-channel int8 weights)
               -> mixed-precision fallback until the metric drop <= max_drop

Why the pairs go on the ONNX graph and not into FX: whether ONNX Runtime fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` depends on the graph it sees after export (Relu
removal, Flatten/Reshape sharing scales, Gemm vs MatMul), so placement is decided there; and a
fake-quant node in FX would export as whatever the exporter emits, not what ORT fuses. The
improvers also act on the exported graph, so the layers they correct are exactly the nodes that
become integer kernels and a layer kept in float by the search keeps its float bias.

Order (decided for the user by ``optimize(precision="int8")``): ``fold-conv-bn`` and
``reparameterize`` first — a re-parameterised conv is quantised once, on its merged weights,
instead of rounding every branch and rounding their sum again — then ``equalize-layers``
(per-channel weight ranges evened out), then this pass, last.

The FX graph is not changed (``modified`` is false); the report line of this pass gets the
per-layer int8 / float decisions with reasons once the lowering has quantised.
Numerics: lossy; the contract ``cosine >= 0.95`` of the int8 artifact against the float model
on the sample inputs is a guard against a broken lowering; ``max_drop`` is the accuracy control.

Refused (the pass fails with the reason): no calibration data; calibration batches with NaN /
inf, a wrong number of inputs or a wrong shape; an unknown ``method`` or ``activations``.
Not handled: TVM lowering of the QDQ model, int4 / int16, per-channel activations.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt._util import close_matches
from graphopt.core.numerics import Numerics
from graphopt.core.pass_infra import Pass, PassContext, PassResult
from graphopt.core.registry import register_pass
from graphopt.errors import InputError
from graphopt.quant.calibration import validate_calibration_batches
from graphopt.quant.qdq import METHODS

META_KEY = "graphopt.int8"
ACTIVATIONS = ("uint8", "int8")
_LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LAYER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.bmm}


@dataclass
class Int8Plan:
    """What the lowering will do: options, candidate layers, calibration data seen."""

    method: str
    activations: str
    smoothquant: bool
    alpha: float
    bias_correction: bool
    max_drop: float | None
    candidates: int
    batches: int
    samples: int

    def __str__(self) -> str:
        improvers = [
            f"SmoothQuant alpha={self.alpha:g}" if self.smoothquant else "",
            "bias correction" if self.bias_correction else "",
            f"mixed precision max_drop={self.max_drop:g}" if self.max_drop is not None else "",
        ]
        return (
            f"int8 at lowering on the ONNX export: {self.candidates} Conv/Linear candidates, "
            f"{self.method} calibration on {self.batches} batches ({self.samples} samples), "
            f"{self.activations} activations; " + ", ".join(i for i in improvers if i)
        )


def candidate_layers(gm: fx.GraphModule) -> int:
    """Conv / Linear / matmul nodes of ``gm`` (what may become an integer kernel)."""

    def is_layer(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(gm.get_submodule(node.target), _LAYER_MODULES)
        return node.op == "call_function" and node.target in _LAYER_FUNCTIONS

    return sum(is_layer(node) for node in gm.graph.nodes)


def _example_inputs(gm: fx.GraphModule, ctx: PassContext) -> tuple[torch.Tensor, ...] | None:
    if ctx.sample_inputs is not None:
        return tuple(ctx.sample_inputs)
    metas = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None  # no shapes known: the lowering checks the batches against the export
        metas.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(metas)


@register_pass
class InsertQDQ(Pass):
    """Calibrated int8: check the data, record the plan; QDQ placed on the ONNX export."""

    name = "insert-qdq"
    numerics = Numerics.lossy("cosine", 0.95)

    @dataclass(frozen=True)
    class Options:
        method: str = "auto"  # minmax | percentile | entropy | mse | auto (per tensor)
        activations: str = "uint8"  # uint8 (asymmetric) | int8 (symmetric)
        smoothquant: bool = True
        alpha: float = 0.5
        bias_correction: bool = True
        max_drop: float | None = None  # metric drop allowed; None: no float fallback

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        o = self.options
        if o.method not in METHODS:
            raise InputError(
                f"insert-qdq: unknown calibration method {o.method!r}; use one of "
                f"{', '.join(METHODS)}." + close_matches(o.method, METHODS)
            )
        if o.activations not in ACTIVATIONS:
            raise InputError(
                f"insert-qdq: activations must be 'uint8' or 'int8', not {o.activations!r}."
            )
        if not 0.0 <= o.alpha <= 1.0:
            raise InputError(f"insert-qdq: alpha must be in [0, 1], got {o.alpha}.")
        if o.max_drop is not None and o.max_drop < 0:
            raise InputError(f"insert-qdq: max_drop must be >= 0, got {o.max_drop}.")
        if ctx.calibration_data is None:
            raise InputError(
                "insert-qdq needs calibration data: pass calibration_data=[(x,), ...] to "
                "optimize() (batches of representative inputs, a few hundred samples), or set "
                "PassContext.calibration_data."
            )
        batches = list(ctx.calibration_data)
        example = _example_inputs(gm, ctx)
        checked = list(validate_calibration_batches(batches, example)) if example else []
        if example is not None and not checked:
            raise InputError(
                "the calibration data is empty; pass a few hundred representative samples."
            )
        samples = sum(int(b[0].shape[0]) if b[0].dim() else 1 for b in checked)
        plan = Int8Plan(
            o.method,
            o.activations,
            o.smoothquant,
            o.alpha,
            o.bias_correction,
            o.max_drop,
            candidate_layers(gm),
            len(batches),
            samples,
        )
        gm.meta[META_KEY] = dataclasses.asdict(plan)
        stats = Counter({"candidates": plan.candidates, "calibration-batches": plan.batches})
        return PassResult(gm, modified=False, stats=stats, decisions=[plan])

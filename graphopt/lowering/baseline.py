"""What the user has without graphopt: the ground truth of every check and the baseline of the
latency comparison.

For an ``nn.Module`` that is an eval-mode copy of the module itself (the reference outputs) and
``torch.onnx.export`` of it in ONNX Runtime (the baseline latency); for an ONNX file, the file
itself in ONNX Runtime (both).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from graphopt.backends import Artifact, Backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.measure import time_interleaved
from graphopt.backends.onnxruntime import ort_optimized_model
from graphopt.backends.quiet import quiet
from graphopt.core.numerics import rounding_error, run_module
from graphopt.errors import BackendError
from graphopt.frontends.onnx import from_numpy, load_onnx
from graphopt.frontends.torch import Captured
from graphopt.lowering.context import Lowering
from graphopt.pipeline import Snapshots

# the latency comparison stops once each median is known within 2% (95%): on an idle machine
# after 10 rounds, where 30 took ResNet-50's int8 run 28 s
MEDIAN_PRECISION = 0.02


@dataclass
class Baseline:
    """The user's model as it is: ``module`` an eval-mode copy of their ``nn.Module`` (None for
    an ONNX model, or when nothing needs it), ``onnx`` their ONNX file in ONNX Runtime."""

    module: nn.Module | None = None
    onnx: Artifact | None = None
    unoptimized: Any = None  # ONNX Runtime on the file without graph optimizations (rounding)

    @classmethod
    def of(cls, model: Any, captured: Captured, ort: Backend, *, needed: bool) -> Baseline:
        """The baseline of ``model`` as ``captured``; ``needed=False`` (neither verifying nor
        measuring) copies no module."""
        if captured.method == "onnx":  # the ground truth: ONNX Runtime on the user's file
            return cls(onnx=load_original_onnx(ort, model) if needed else None)
        # one eval-mode copy of the user's module serves as reference and as the baseline export
        return cls(module=copy.deepcopy(model).eval() if needed else None)

    def reference_outputs(self, samples: list[tuple]) -> list[torch.Tensor]:
        """Outputs of the user's model itself (its eval copy / ONNX Runtime on the user's
        file) on every check sample, concatenated."""
        if self.onnx is not None:
            try:
                return [
                    from_numpy(o)
                    for sample in samples
                    for o in self.onnx.run([to_numpy(x) for x in sample])
                ]
            except BackendError as exc:
                raise BackendError(
                    "ONNX Runtime cannot run the original ONNX model on these inputs, and every "
                    f"check compares with it: {exc} (optimize(..., verify=False) skips the "
                    "checks)"
                ) from exc
        # copies: a model that writes to its inputs was refused at capture; these are ours anyway
        return [
            t for sample in samples for t in run_module(self.module, [x.clone() for x in sample])
        ]

    def rounding(self, module: nn.Module, sample: Any, outputs: list[torch.Tensor]) -> Any:
        """The reference's own float32 error per output, for the exact contract's allowance
        (a :class:`~graphopt.core.numerics.Rounding` measure): ``module``'s float32 run against
        float64 (:func:`rounding_error`); for an ONNX model, where the reference is ONNX
        Runtime, the larger of that and how far ONNX Runtime moves the outputs between its
        optimization levels (its fused kernels and approximations; PP-OCRv4 det on a text page:
        1.2e-5 against torch's 3.9e-6). Neither involves graphopt's import, so a wrong import is
        not excused by it."""
        torch_error = rounding_error(module, sample, outputs)
        if self.onnx is None:
            return torch_error
        spread = self._onnx_spread(sample, outputs)
        if torch_error is None or spread is None:
            return torch_error or spread
        return [max(a, b) for a, b in zip(torch_error, spread, strict=True)]

    def _onnx_spread(self, sample: Any, outputs: list[torch.Tensor]) -> list[float] | None:
        try:
            if self.unoptimized is None:
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                with quiet():  # the user's file: ONNX Runtime's warnings go to the report
                    self.unoptimized = ort.InferenceSession(
                        self.onnx.proto.SerializeToString(),
                        opts,
                        providers=["CPUExecutionProvider"],
                    )
            names = [i.name for i in self.unoptimized.get_inputs()]
            feeds = {n: to_numpy(x) for n, x in zip(names, sample, strict=True)}
            got = self.unoptimized.run(None, feeds)
        except Exception:  # noqa: BLE001 - no second opinion: the torch measure alone
            return None
        spread = []
        for o, ref in zip(got, outputs, strict=True):
            o = from_numpy(o)
            same = o.shape == ref.shape and o.dtype == ref.dtype and o.is_floating_point()
            err = float((o.double() - ref.double()).abs().max()) if same and o.numel() else 0.0
            spread.append(err if math.isfinite(err) else 0.0)
        return spread

    def reference_module(self, captured: Captured) -> nn.Module:
        """What computes the reference outputs in torch (for the model's float32 rounding): the
        module, or for an ONNX model the imported graph."""
        return self.module if self.module is not None else copy.deepcopy(captured.graph)

    def measure(
        self, lowering: Lowering, ort: Backend, runtime: Backend, artifact: Artifact
    ) -> None:
        """Latency of ONNX Runtime on the unrewritten model and of graphopt's artifact,
        interleaved, into the report.

        The baseline is what a user gets without graphopt: ``torch.onnx.export`` of their
        module (or their ONNX file) in ONNX Runtime, whichever backend graphopt lowered to. A
        phone or board is measured through its RPC device when there is one, without a baseline.
        """
        report, inputs = lowering.report, lowering.inputs
        if runtime.rpc is not None:
            lowering.say(f"measuring on the RPC device {runtime.rpc.describe()}")
            report.latency_optimized = runtime.measure(artifact, inputs)
            report.baseline_name = f"measured on {runtime.rpc.describe()}, no local baseline"
            return
        if lowering.target.device == "mobile":
            report.warnings.append(
                f"latency not measured: {lowering.target} is a phone or board; measure there "
                "with backend='tvm' and rpc='host:port/key' (see the README)."
            )
            return
        lowering.say("measuring latency against the unrewritten export")
        arrays = [to_numpy(x) for x in inputs]
        baseline, report.baseline_name = self._artifact(lowering, ort)
        after = _after_passes(lowering, runtime, baseline)
        runners = {"baseline": baseline, **after, "optimized": artifact}
        timings = time_interleaved(
            {k: (lambda a=a: a.run(arrays)) for k, a in runners.items()},
            warmup=5,
            runs=30,
            max_time_s=20.0 + 5.0 * (len(runners) - 2),
            precision=MEDIAN_PRECISION,
        )
        report.latency_baseline = timings.pop("baseline")
        report.latency_optimized = timings.pop("optimized")
        report.pass_latencies = timings

    def _artifact(self, lowering: Lowering, ort: Backend) -> tuple[Artifact, str]:
        """The baseline in ONNX Runtime and its name in the report."""
        if self.onnx is not None:
            return self.onnx, "onnxruntime on the original ONNX file"
        names = {"input_names": lowering.input_names, "dynamic_axes": lowering.dynamic_axes}
        try:  # what a user gets from torch.onnx.export of their own model
            baseline = ort.compile(self.module, lowering.inputs, **names)
        except BackendError:
            baseline = ort.compile(lowering.original, lowering.inputs, **names)
        return baseline, "onnxruntime on the unrewritten export"


def load_original_onnx(runtime: Backend, model: Any) -> Artifact:
    """The user's ONNX model (a path or a ``ModelProto``) loaded as it is."""
    try:
        return runtime.load(load_onnx(model))
    except BackendError as exc:
        raise BackendError(
            f"ONNX Runtime cannot run the original ONNX model, and every check compares with "
            f"it: {exc} (optimize(..., verify=False, measure=False) skips the checks)"
        ) from exc


def _after_passes(lowering: Lowering, runtime: Backend, baseline: Artifact) -> dict[str, Artifact]:
    """The model after each pass that changed its structure (but the last, for fp32), on
    ``runtime`` (ONNX Runtime or OpenVINO: a compile is seconds; TVM's minutes are not spent on
    it), keyed ``after <pass>``: where the speed-up came from. The artifact is the model after
    the last. A pass that changed weights only is not timed (:class:`Snapshots`), nor, in ONNX
    Runtime, a model whose optimized graph is the baseline's or an earlier one's
    (:func:`_ort_graph`: ResNet-50 after fold-conv-bn, which ONNX Runtime folds itself): the
    report's notes say so."""
    snapshots = next(
        (i for i in getattr(lowering.context, "instruments", ()) if isinstance(i, Snapshots)), None
    )
    if snapshots is None or runtime.name == "tvm" or len(snapshots.graphs) < 1:
        return {}
    names = {"input_names": lowering.input_names, "dynamic_axes": lowering.dynamic_axes}
    out = {}
    seen = {_ort_graph(baseline): "the baseline"} if runtime.name == "onnxruntime" else {}
    seen.pop(None, None)  # an unreadable baseline is compared with nothing
    # int8: the float model after the last FX pass too (the artifact is the int8 one)
    kept = snapshots.graphs if lowering.onnx_stage else snapshots.graphs[:-1]
    for spec, gm in kept:
        try:
            artifact = runtime.compile(gm, lowering.inputs, **names)
        except BackendError:  # a graph in between may not export: only the figure is lost
            continue
        if runtime.name == "onnxruntime" and (graph := _ort_graph(artifact)) is not None:
            if graph in seen:
                lowering.report.notes.append(
                    f"latency after {spec}: ONNX Runtime runs the same graph as for "
                    f"{seen[graph]} (operators, attributes, weight shapes): not timed again"
                )
                continue
            seen[graph] = f"the model after {spec}"
        out[f"after {spec}"] = artifact
    return out


def _ort_graph(artifact: Artifact) -> tuple | None:
    """What decides an ONNX Runtime artifact's speed, comparable: per node of the graph ONNX
    Runtime runs after its extended optimizations, its operator, attributes and the shapes of
    its constant inputs (the weights' values are left out). None where it cannot be read."""
    proto = getattr(artifact, "proto", None)
    if proto is None:
        return None
    try:
        graph = ort_optimized_model(proto, "extended").graph
    except BackendError:
        return None
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return tuple(
        (
            n.op_type,
            n.domain,
            tuple((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute),
            tuple(shapes.get(i) for i in n.input),
        )
        for n in graph.node
    )

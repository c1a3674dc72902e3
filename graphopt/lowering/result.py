"""What :func:`graphopt.optimize` returns: :class:`OptimizedModel`, the artifact with its
interface, report and graph; :func:`result_of` builds it at the end of a run and stamps the
ONNX artifact with what made it (``metadata_props``) and its tensors' shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from graphopt._util import VERSION
from graphopt.backends import Artifact, Backend
from graphopt.backends.arrays import to_numpy
from graphopt.backends.export import add_value_info
from graphopt.backends.quiet import collecting, summarize
from graphopt.errors import ArgumentError, GraphoptError, InputError, graphopt_errors_only
from graphopt.frontends.torch import Captured, InputSpec, set_eval
from graphopt.lowering.context import Lowering
from graphopt.report import Report

SAVE_SUFFIXES = {"onnxruntime": (".onnx", ".ort"), "tvm": (".so",), "openvino": (".xml", ".onnx")}


def result_of(
    artifact: Artifact,
    lowering: Lowering,
    captured: Captured,
    runtime: Backend,
    quantization: Any,
) -> OptimizedModel:
    """The run's :class:`OptimizedModel`: inputs with their dynamic axes named (static where
    the artifact is: TVM, or an export that had to fix them), the ONNX artifact stamped."""
    specs = captured.inputs
    if runtime.name == "tvm" or artifact.static_shape_reason:
        specs = [
            dataclasses.replace(s, shape=tuple(x.shape))
            for s, x in zip(specs, captured.example_inputs, strict=True)
        ]
    proto = getattr(artifact, "proto", None)
    if isinstance(proto, onnx.ModelProto):
        stamp(proto, lowering.report)
    set_eval(lowering.graph)  # what graphopt returns is in eval mode, whatever the input was
    return OptimizedModel(artifact, lowering.graph, lowering.report, specs, runtime, quantization)


def stamp(proto: onnx.ModelProto, report: Report) -> None:
    """``metadata_props`` that say what made the model: graphopt's version, the pipeline, the
    target and backend, and how far the artifact is from the original model; and every
    tensor's dtype and shape (``value_info``)."""
    add_value_info(proto)
    error = report.artifact_error
    props = {
        "producer": "graphopt",
        "graphopt_version": VERSION,
        "graphopt_pipeline": report.pipeline,
        "graphopt_target": report.target,
        "graphopt_backend": report.backend,
        "graphopt_error": error.describe() if error is not None else "not verified",
    }
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})


class OptimizedModel:
    """The result of :func:`optimize`: callable like the original model, savable, with a report.

    Call it with torch tensors (returns tensors) or numpy arrays (returns arrays). Its dynamic
    axes (``inputs[i].shape`` names them: ``batch`` by default, every symbolic dimension of an
    ONNX model) take any size; every other dimension and the dtype must match the example
    inputs.
    With ``precision="int8"`` the artifact (what runs and what ``save`` writes) is the int8 QDQ
    ONNX model, ``quantization`` its :class:`~graphopt.quant.improve.Int8Report` (which layers
    are int8, which stayed float and why, the metric drop), and ``graph_module`` the float graph
    it was quantised from.
    """

    def __init__(
        self,
        artifact: Any,
        graph_module: fx.GraphModule,
        report: Report,
        inputs: list[InputSpec],
        backend: Any,
        quantization: Any = None,
    ) -> None:
        self.artifact = artifact
        self.graph_module = graph_module
        self.report = report
        self.inputs = inputs
        self.backend = backend
        self.quantization = quantization

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise :class:`InputError` unless ``args`` fit the optimized model's inputs."""
        if len(args) != len(self.inputs):
            raise InputError(
                f"the model takes {len(self.inputs)} input(s) "
                f"({'; '.join(s.describe() for s in self.inputs)}), got {len(args)}."
            )
        for i, (spec, x) in enumerate(zip(self.inputs, args, strict=True)):
            if not isinstance(x, torch.Tensor | np.ndarray):
                raise InputError(
                    f"input {i} is a {type(x).__name__}; pass a torch tensor or a numpy array."
                )
            shape = tuple(x.shape)
            ok = len(shape) == len(spec.shape) and all(
                isinstance(want, str) or want == got
                for want, got in zip(spec.shape, shape, strict=True)
            )
            dtype = (
                x.dtype
                if isinstance(x, torch.Tensor)
                else torch.from_numpy(np.empty(0, dtype=x.dtype)).dtype
            )
            if not ok or dtype != spec.dtype:
                got = f"{str(dtype).replace('torch.', '')}{list(shape)}"
                free = [d for d in spec.shape if isinstance(d, str)]
                free = f" ({', '.join(free)}: any size)" if free else ""
                raise InputError(
                    f"input {i} should be {spec.describe()}{free}, got {got}. The model was "
                    "optimized for that shape; re-run optimize() with example inputs of the new "
                    "shape."
                )

    @graphopt_errors_only
    def __call__(self, *args: Any) -> Any:
        self.check_inputs(args)
        as_torch = any(isinstance(x, torch.Tensor) for x in args)
        arrays = [to_numpy(x) for x in args]
        outputs = self.artifact.run(arrays)
        if as_torch:
            outputs = [torch.from_numpy(np.asarray(o)) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @graphopt_errors_only
    def save(self, path: str | Path) -> Path:
        """Write the deployable artifact.

        ONNX Runtime: ``.onnx``, or ``.ort`` (ONNX Runtime's mobile format, with the operator
        list and XNNPACK session settings beside it). TVM: ``.so``, a shared library with the
        weights embedded that ``tvm.runtime.load_module`` + ``relax.VirtualMachine`` run.
        OpenVINO: ``.xml`` (OpenVINO IR, its weights in ``.bin`` beside it, which
        ``openvino.Core().read_model`` loads) or ``.onnx``.
        """
        if not isinstance(path, str | Path):
            raise ArgumentError(
                f"save() takes a file path (str or pathlib.Path), got {type(path).__name__}."
            )
        path = Path(path)
        suffixes = SAVE_SUFFIXES[self.report.backend]
        if path.suffix not in suffixes:
            raise GraphoptError(
                f"the {self.report.backend} backend saves {' or '.join(suffixes)} files; name "
                f"the output accordingly (got {path.name!r})."
            )
        try:
            with collecting() as lines:
                saved = self.artifact.save(path)
            self.report.notes += [f"save(): {note}" for note in summarize(lines)]
            return saved
        except OSError as exc:  # every backend: an unwritable place is the user's to fix
            raise GraphoptError(
                f"cannot write {path}: {exc.strerror or exc}; choose a writable directory."
            ) from exc

    def __repr__(self) -> str:
        return (
            f"<OptimizedModel {self.report.model} on {self.report.target} ({self.report.backend})>"
        )

"""``compile()`` of the backends that run graphopt's ONNX export (ONNX Runtime, OpenVINO): export
with the asked dynamic axes, load, run once on the example; where that fails, export again with
the example's shapes and say why (``artifact.static_shape_reason``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch

from graphopt._util import first_line
from graphopt.backends.arrays import to_numpy
from graphopt.backends.export import export_onnx, output_shapes
from graphopt.errors import BackendError, InputError

__all__ = ["compile_exported"]

log = logging.getLogger(__name__)


def compile_exported(
    load: Callable[[onnx.ModelProto], Any],
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    runtime: str,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    output_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Any:
    """Export ``module`` and ``load`` it (the backend's own loader; ``runtime`` names it in
    messages).

    ``dynamic_axes`` stay symbolic (None: the batch; ``{}``: a static model, see
    :func:`~graphopt.backends.export.export_onnx`). A valid model that cannot be exported,
    loaded or run on its example that way (a model whose code fixes the batch, a split of a 1-D
    input along its only axis...) is exported again with the example's shapes, and
    ``artifact.static_shape_reason`` says why. Only when both fail is it a ``BackendError``,
    which gives both reasons.
    """
    names = {"input_names": input_names, "output_names": output_names}
    if dynamic_axes is not None and not any(dynamic_axes.values()):
        return load(export_onnx(module, example_inputs, dynamic_axes={}, **names))
    shapes = output_shapes(module, example_inputs)
    asked = {"dynamic_axes": dynamic_axes, "output_axes": output_axes}
    try:
        artifact = load(export_onnx(module, example_inputs, **asked, **names))
        _runs_on(artifact, example_inputs, shapes)
    except BackendError as exc:
        dynamic_exc = exc
    else:
        if fixed := _fixed_axes(artifact.proto, example_inputs, dynamic_axes):
            # the dynamo exporter specializes an axis the model's code fixes, silently
            artifact.static_shape_reason = (
                f"{fixed} fixed at the example's size: the exporter specialized it (the "
                "model's code fixes it, e.g. a reshape to a constant size). Run the artifact "
                "at that size, or make that code read the size from the input (x.shape[i])."
            )
            log.warning("%s: %s", runtime, artifact.static_shape_reason)
        return artifact
    try:
        artifact = load(export_onnx(module, example_inputs, dynamic_axes={}, **names))
        _runs_on(artifact, example_inputs, shapes)
    except BackendError as exc:
        raise BackendError(f"{exc} With dynamic axes it failed too: {dynamic_exc}") from exc
    artifact.static_shape_reason = (
        f"the shapes are fixed at the example's ({_shapes(example_inputs)}): with dynamic "
        f"axes, {_as_clause(dynamic_exc)}. Run the artifact at those shapes (or change "
        "what fixes them in the model and optimize again)."
    )
    log.warning("%s: %s", runtime, artifact.static_shape_reason)
    return artifact


def _runs_on(
    artifact: Any, example_inputs: Sequence[torch.Tensor], shapes: list[tuple[int, ...]]
) -> None:
    """Run ``artifact`` once on the example: a lowering that cannot run its own example (a
    runtime refusing a kernel's attributes for a dynamic shape, say), or that gives outputs of
    other shapes than the model's ``shapes`` (an exporter that froze a runtime value into a
    constant), is no lowering: ``BackendError``."""
    try:
        arrays = [to_numpy(x) for x in example_inputs]
    except (TypeError, InputError):  # a dtype numpy cannot hold: the end-to-end check runs it
        return
    got = [tuple(np.shape(out)) for out in artifact.run(arrays)]
    if got != shapes:
        raise BackendError(
            f"the ONNX export gives outputs of shapes {got} on the example, the "
            f"model {shapes}: the exporter froze or dropped part of the computation."
        )


def _fixed_axes(
    proto: onnx.ModelProto,
    inputs: Sequence[torch.Tensor],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
) -> str:
    """The inputs' axes asked dynamic that the export declares as numbers (``"x axis 0"``)."""
    fixed = []
    for vi, x in zip(proto.graph.input, inputs, strict=False):
        asked = dynamic_axes.get(vi.name, {}) if dynamic_axes is not None else {0: "batch"}
        dims = vi.type.tensor_type.shape.dim
        for axis in asked if x.dim() > 0 else ():
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{vi.name} axis {axis}")
    return ", ".join(fixed)


def _shapes(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(list(x.shape)) for x in inputs)


def _as_clause(exc: Exception) -> str:
    """The first line of ``exc``'s message to go mid-sentence: no final period, lower case."""
    text = first_line(exc).rstrip(". ")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text  # not "oNNX"

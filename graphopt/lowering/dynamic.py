"""Dynamic axes through lowering: the outputs' symbolic axes, and the artifact checked at a
second size of every dynamic axis.

:func:`plan` runs the user's model (or ONNX Runtime on their file) on inputs where every
dynamic axis is twice the example's (:func:`graphopt.core.dynamic_axes.other_sizes`): the
outputs' axes whose size changed are the outputs' dynamic axes, named after the input axis of
the same sizes (``batch``), else after the ONNX file's own output dim, else
``<output>_dim<axis>``. :func:`check` runs the artifact at that second size against those
outputs, under the artifact's contract: a size only the example had can not be frozen
silently. A model that does not run at the second size itself cannot be checked there; the
report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt._util import first_line
from graphopt.backends import Artifact
from graphopt.backends.arrays import to_numpy
from graphopt.backends.quiet import quiet
from graphopt.core.dynamic_axes import other_sizes, sizes
from graphopt.core.numerics import Comparison, Numerics, Rounding
from graphopt.frontends.onnx import from_numpy
from graphopt.lowering.context import Lowering


@dataclass
class OtherSize:
    """One dim at its second size: the inputs, the model's outputs there, what compares them."""

    dim: str
    inputs: tuple[torch.Tensor, ...]
    reference: list[torch.Tensor]
    rounding: Rounding = field(default_factory=Rounding)


def plan(
    lowering: Lowering,
    reference: Callable[[list[tuple]], list[torch.Tensor]],
    module: Any,
    declared_outputs: Sequence[Sequence[Any]] | None = None,
) -> None:
    """Set ``lowering.output_axes`` and ``lowering.other_sizes`` (one per dim the model runs
    with at twice the example's size; a report warning names those it does not run with).

    ``reference(samples)`` is the model's outputs (the user's module, or ONNX Runtime on their
    file); ``module`` computes them in torch for the rounding; ``declared_outputs`` the ONNX
    file's output shapes (dims: ints, dim_param strings or None).
    """
    axes, names = lowering.dynamic_axes, lowering.input_names
    base = sizes(axes, names, lowering.inputs)
    failed = []
    lowering.output_axes, lowering.other_sizes = {}, []
    for dim, inputs in other_sizes(axes, names, lowering.inputs).items():
        try:
            # ONNX Runtime's error line for a size the user's file refuses goes to the notes
            with torch.no_grad(), quiet():
                outputs = reference([inputs])
        except Exception as exc:  # noqa: BLE001 - the model's own failure: nothing to check
            failed.append(f"{dim} ({first_line(exc, with_type=True)[:200]})")
            continue
        _output_axes(lowering, dim, base[dim], outputs, declared_outputs)
        rounding = Rounding(measure=lowering.check.rounding.measure)
        rounding.module, rounding.samples, rounding.reference = module, [inputs], outputs
        lowering.other_sizes.append(OtherSize(dim, inputs, outputs, rounding))
    if failed:
        lowering.report.warnings.append(
            f"the model itself does not run with these dynamic axes at twice the example's "
            f"size: {'; '.join(failed)}. They stay symbolic, as declared, but the artifact "
            "was checked at the example's size only along them."
        )


def _output_axes(
    lowering: Lowering,
    dim: str,
    size: int,
    outputs: list[torch.Tensor],
    declared: Sequence[Sequence[Any]] | None,
) -> None:
    """The outputs' axes that changed with ``dim``: named ``dim`` where they have its sizes,
    else the ONNX file's own output dim name, else ``<output>_dim<axis>``."""
    first = lowering.reference[: len(outputs)] if lowering.reference is not None else outputs
    out_names = lowering.output_names or [f"output{i}" for i in range(len(outputs))]
    for k, (name, a, b) in enumerate(zip(out_names, first, outputs, strict=False)):
        file_dims = declared[k] if declared and k < len(declared) and declared[k] else ()
        for axis, (m, n) in enumerate(zip(a.shape, b.shape, strict=False)):
            if m == n or axis in lowering.output_axes.get(name, {}):
                continue
            file_dim = file_dims[axis] if axis < len(file_dims) else None
            named = file_dim if isinstance(file_dim, str) and file_dim.isidentifier() else None
            same = (m, n) == (size, 2 * size)
            lowering.output_axes.setdefault(name, {})[axis] = (
                dim if same else named or f"{name}_dim{axis}"
            )


def check(lowering: Lowering, artifact: Artifact, numerics: Numerics, backend: str) -> None:
    """The artifact at the second size of every dynamic dim, against the model there."""
    if artifact.static_shape_reason:
        return
    for other in lowering.other_sizes:
        where = f"with {other.dim!r} at twice the example's size ({_shapes(other.inputs)})"
        try:
            got = [from_numpy(o) for o in artifact.run([to_numpy(x) for x in other.inputs])]
        except Exception as exc:  # noqa: BLE001 - the artifact cannot run where the model can
            lowering.check.fail(
                "export",
                f"the {backend} artifact fails {where}, where the model runs: "
                f"{first_line(exc)}. The export froze that size (report it with the model); "
                f"leave {other.dim!r} out of dynamic_axes to make it static.",
                Comparison(False, "runs", float("inf"), 0.0, "all outputs"),
            )
            continue
        error = other.rounding.compare(other.reference, got, numerics)
        if not error.ok:
            lowering.check.fail(
                "export",
                f"the {backend} artifact differs from the model {where}: {error.describe()}. "
                "It agrees at the example's size: the export froze that size (report it with "
                "the model).",
                error,
            )


def _shapes(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(list(x.shape)) for x in inputs)

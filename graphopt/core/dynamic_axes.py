"""Dynamic axes: which axes of a model's inputs may take any size, and their names.

``DynamicAxes`` maps an input's name to ``{axis: dim name}``, as ``torch.onnx.export``'s
``dynamic_axes`` does: ``{"x": {0: "batch", 2: "height", 3: "width"}}``. Axes that share a name
share a size (an image's batch and its mask's batch). Where they come from:

* an ONNX model: every dimension its inputs declare symbolic (a ``dim_param`` such as
  ``"batch"`` or ``"width"``, or an unnamed dimension), at whatever axis;
* an ``nn.Module``: ``optimize(..., dynamic_axes=...)``, by default the batch, axis 0 of every
  input (:func:`resolve` checks and normalizes what the user gives).

Every export keeps these axes symbolic, and the artifact is verified at a second size of each,
one dimension at a time (:func:`other_sizes`): a size that only the example had cannot be
frozen silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import ArgumentError

DynamicAxes = dict[str, dict[int, str]]


def batch_axes(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> DynamicAxes:
    """The default: axis 0 of every input with at least one axis is the batch."""
    return {n: {0: "batch"} for n, x in zip(names, inputs, strict=True) if x.dim() > 0}


def resolve(
    given: Mapping[Any, Any] | None, names: Sequence[str], inputs: Sequence[torch.Tensor]
) -> DynamicAxes:
    """``given`` (``{input: {axis: name}}`` or ``{input: [axis, ...]}``, an input named or
    by position) checked against the inputs and normalized; None gives :func:`batch_axes`.

    An unnamed axis is called ``<input>_dim<axis>``; a negative axis counts from the end.
    """
    if given is None:
        return batch_axes(names, inputs)
    if not isinstance(given, Mapping):
        raise ArgumentError(
            "dynamic_axes maps an input's name to its dynamic axes, e.g. "
            f"{{'x': {{0: 'batch', 2: 'height'}}}} or {{'x': [0, 2]}}; got {given!r:.80}."
        )
    axes: DynamicAxes = {}
    for key, spec in given.items():
        name = _input_name(key, names)
        rank = inputs[names.index(name)].dim()
        items = spec.items() if isinstance(spec, Mapping) else ((a, None) for a in spec)
        resolved: dict[int, str] = {}
        for axis, dim in items:
            if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
                raise ArgumentError(
                    f"dynamic_axes[{key!r}]: {axis!r} is not an axis of input {name!r}, which "
                    f"has {rank} axes (0..{rank - 1})."
                )
            axis %= rank
            resolved[axis] = str(dim) if dim is not None else f"{name}_dim{axis}"
        if resolved:
            axes[name] = dict(sorted(resolved.items()))
    return axes


def _input_name(key: Any, names: Sequence[str]) -> str:
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
        return names[key]
    if isinstance(key, str) and key in names:
        return key
    raise ArgumentError(
        f"dynamic_axes names {key!r}, which is not an input of the model; its inputs are "
        f"{list(names)} (give a name or a position)."
    )


def sizes(axes: DynamicAxes, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict:
    """The example's size of every named dim, ``{dim name: size}``; a name whose axes have
    different sizes in the example is an error (they must be the same dimension)."""
    found: dict[str, int] = {}
    for name, x in zip(names, inputs, strict=True):
        for axis, dim in axes.get(name, {}).items():
            size = int(x.shape[axis])
            if found.setdefault(dim, size) != size:
                raise ArgumentError(
                    f"dynamic axis {dim!r} has size {found[dim]} in one input and {size} in "
                    f"{name!r} (axis {axis}): axes that share a name share a size. Give them "
                    "different names, or example inputs of one size."
                )
    return found


def other_sizes(
    axes: DynamicAxes, names: Sequence[str], inputs: Sequence[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per dim name, inputs where that dim (every axis of that name) has another size, twice
    the example's, and every other axis keeps the example's: one dimension varied at a time,
    so that a model whose height is fixed still shows whether its batch and width are free.

    Each input is the example concatenated along the axis with its own reversal along it:
    values of the example's own kind and distribution (token ids stay in the vocabulary, a mask
    stays 0/1, an image stays an image, so a lossy contract such as int8's holds there as at
    the example), in another order where the axis has more than one item, so that a model that
    mixes batch items or positions shows it.
    """
    varied: dict[str, tuple[torch.Tensor, ...]] = {}
    for dim in sizes(axes, names, inputs):  # consistent names, or a clear error
        changed = []
        for name, x in zip(names, inputs, strict=True):
            for axis, d in axes.get(name, {}).items():
                if d == dim:
                    x = torch.cat([x, x.flip(axis)], dim=axis)
            changed.append(x)
        varied[dim] = tuple(changed)
    return varied


def describe(axes: DynamicAxes) -> str:
    """``x[0: batch, 2: height]; mask[0: batch]``, or ``none`` (for reports and messages)."""
    parts = [
        f"{name}[{', '.join(f'{a}: {d}' for a, d in dims.items())}]"
        for name, dims in axes.items()
        if dims
    ]
    return "; ".join(parts) or "none"

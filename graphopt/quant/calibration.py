"""Calibration data and the calibration method: batches checked against a model, and the
per-tensor choice between the observers.

:func:`validate_calibration_batches` checks batches against example inputs (torch's side);
:func:`calibration_batches` / :func:`iter_calibration_batches` check them against an ONNX
model's inputs and hand them over as numpy arrays in the model's input dtypes, cut to the batch
size a fixed-batch model takes. Calibration data with NaN or inf, of an inconsistent shape, or
not floating point raises :class:`~graphopt.errors.InputError` (integer model inputs, token ids
or masks, are checked as float64 and handed over in their own dtype).

:func:`choose_observer` measures, for one tensor, the fake-quantisation error each method
(:mod:`graphopt.quant.observers`) gives and keeps the lowest (the per-layer choice of issue 6).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from graphopt.core.progress import Progress
from graphopt.errors import GraphoptError, InputError
from graphopt.quant.graph import fixed_batch, input_dtype, input_names
from graphopt.quant.observers import Observer, make_observer, observe_all
from graphopt.quant.qparams import QParams, checked_tensor

__all__ = [
    "Batch",
    "MethodChoice",
    "calibration_batches",
    "choose_observer",
    "fake_quant_error",
    "iter_calibration_batches",
    "pick_method",
    "progress_batches",
    "to_fixed_batch",
    "validate_calibration_batches",
]

Batch = tuple[np.ndarray, ...]

# ------------------------------------------------------------------------------------------------
# batches


def validate_calibration_batches(
    batches: Iterable[Any], example_inputs: Sequence[torch.Tensor]
) -> Iterable[tuple[torch.Tensor, ...]]:
    """Yield the calibration batches as tuples of tensors, checking each as it arrives.

    Every batch must have as many inputs as ``example_inputs``, each with the same number of
    dimensions and the same sizes except the first (batch) one, floating point and finite.
    A batch that is a single tensor counts as a one-input tuple.
    """
    expected = tuple(example_inputs)
    for i, batch in enumerate(batches):
        items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if len(items) != len(expected):
            raise InputError(
                f"calibration batch {i} has {len(items)} inputs but the model takes "
                f"{len(expected)}; give each batch as a tuple of {len(expected)} tensors."
            )
        out = []
        for j, (x, ref) in enumerate(zip(items, expected, strict=True)):
            x = checked_tensor(x, f"input {j}", i)
            if x.dim() != ref.dim() or tuple(x.shape[1:]) != tuple(ref.shape[1:]):
                raise InputError(
                    f"calibration batch {i}, input {j} has shape {tuple(x.shape)}; the model "
                    f"expects (N, {', '.join(str(d) for d in ref.shape[1:])}) like its example "
                    "input. Resize or reshape the calibration data to the model's input shape."
                )
            out.append(x)
        yield tuple(out)


def to_fixed_batch(
    batches: Iterable[tuple[torch.Tensor, ...]], fixed: int | None
) -> Iterable[tuple[torch.Tensor, ...]]:
    """Cut each batch into pieces of ``fixed`` samples, the batch size a model's inputs fix
    (an ONNX file exported with batch 1 runs one sample at a time); ``None``: as they come."""
    for i, batch in enumerate(batches):
        n = int(batch[0].shape[0]) if batch and batch[0].dim() else 0
        if fixed is None or n == fixed:
            yield batch
            continue
        if n % fixed:
            raise InputError(
                f"the model's inputs have a fixed batch size of {fixed}, and calibration batch "
                f"{i} holds {n} samples, not a multiple of {fixed}. Give batches of a multiple "
                f"of {fixed} samples, or export the model with a dynamic batch dimension."
            )
        for k in range(0, n, fixed):
            yield tuple(x[k : k + fixed] for x in batch)


def calibration_batches(calibration: Iterable[Any] | None, model: onnx.ModelProto) -> list[Batch]:
    """The calibration data as a list of numpy tuples, checked against ``model``'s inputs
    (:func:`iter_calibration_batches`).

    Raises :class:`InputError` on missing or empty data, NaN / inf, a wrong input count or shape.
    """
    if calibration is None:
        raise InputError(
            "int8 quantisation needs calibration data: pass calibration_data=[(x,), ...], "
            "batches of inputs representative of deployment (a few hundred samples)."
        )
    return list(iter_calibration_batches(calibration, model))


def iter_calibration_batches(calibration: Iterable[Any], model: onnx.ModelProto) -> Iterator[Batch]:
    """Yield the batches of ``calibration`` (tuples of arrays or tensors in the order of the
    model's inputs; a lone array is a 1-tuple) as C-contiguous numpy arrays in the model's input
    dtypes, each checked as it arrives and cut into pieces of the batch size a fixed-batch
    model takes (:func:`to_fixed_batch`)."""
    names = input_names(model)
    dtypes = [input_dtype(model, name) for name in names]
    it = iter(calibration)
    try:
        first = next(it)
    except StopIteration:
        raise InputError(
            "the calibration data is empty; pass an iterable of input tuples (a few hundred "
            "samples representative of deployment)."
        ) from None
    items = tuple(first) if isinstance(first, (tuple, list)) else (first,)
    refs = _reference_inputs(model, items, names)
    # integer inputs (token ids, masks) are checked as float64, exact below 2**53, and handed
    # over in the model's own dtype
    integer = [j for j, dtype in enumerate(dtypes) if dtype != np.float32]
    checked = validate_calibration_batches(
        (_as_float(batch, integer) for batch in itertools.chain([first], it)), refs
    )
    for batch in to_fixed_batch(checked, fixed_batch(model)):
        yield tuple(
            np.ascontiguousarray(x.detach().cpu().numpy().astype(dtype, copy=False))
            for x, dtype in zip(batch, dtypes, strict=True)
        )


def _reference_inputs(model: onnx.ModelProto, first: Sequence[Any], names: list[str]) -> list:
    """Tensors shaped like the model's inputs (batch 1); unknown sizes taken from ``first``."""
    by_name = {i.name: i for i in model.graph.input}
    refs = []
    for j, name in enumerate(names):
        dims = by_name[name].type.tensor_type.shape.dim
        shape = [1]
        for k, d in enumerate(list(dims)[1:], start=1):
            x = first[j] if j < len(first) else None
            known = d.dim_value if d.HasField("dim_value") else None
            shape.append(known or (int(x.shape[k]) if x is not None and x.ndim > k else 1))
        refs.append(torch.zeros(shape if dims else []))
    return refs


def _as_float(batch: Any, integer: list[int]) -> tuple:
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(
        torch.as_tensor(x).double()
        if j in integer and isinstance(x, (np.ndarray, torch.Tensor))
        else x
        for j, x in enumerate(items)
    )


def progress_batches(
    batches: Sequence[Batch], label: str | None, say: Callable[[str], None] | None, after: str = ""
) -> Iterable[Batch]:
    """Yield ``batches`` with progress through ``say``, then say ``after``: a live bar where
    ``say`` is a :class:`~graphopt.core.progress.Progress` on a terminal, else a text bar in
    about 10 lines (``calibrating [####......] 4/10 batches``)."""
    if isinstance(say, Progress) and say.enabled and say.tty:
        yield from say.track(batches, label or "calibrating", unit="batch")
    else:
        n = len(batches)
        every = max(1, n // 10)
        for i, batch in enumerate(batches, start=1):
            yield batch
            if say is not None and (i % every == 0 or i == n):
                done = round(20 * i / n)
                say(f"{label} [{'#' * done}{'.' * (20 - done)}] {i}/{n} batches")
    if say is not None and after:
        say(after)


# ------------------------------------------------------------------------------------------------
# choosing a method per tensor


def fake_quant_error(batches: Sequence[torch.Tensor], qparams: QParams) -> float:
    """Mean squared error of ``qparams.fake_quantize`` over all elements of ``batches``."""
    total, count = 0.0, 0
    for x in batches:
        total += qparams.squared_error(x)  # float32 as ORT quantises (float64 sum)
        count += x.numel()
    return total / max(count, 1)


@dataclass
class MethodChoice:
    """The calibration method kept for one tensor, and the error each candidate measured."""

    method: str
    qparams: QParams
    errors: dict[str, float] = field(default_factory=dict)
    name: str = ""

    def __str__(self) -> str:
        errs = ", ".join(f"{m}={e:.3g}" for m, e in sorted(self.errors.items(), key=lambda i: i[1]))
        label = f"{self.name}: " if self.name else ""
        return f"{label}{self.method} ({self.qparams}); fake-quant MSE {errs}"


def choose_observer(
    tensor: torch.Tensor | Sequence[torch.Tensor],
    candidates: Sequence[str | Observer] = ("minmax", "percentile", "entropy", "mse"),
    *,
    symmetric: bool = True,
    name: str = "",
) -> MethodChoice:
    """Calibrate ``tensor`` (one tensor or its calibration batches) with every candidate and keep
    the method whose quantisation parameters give the lowest fake-quantisation MSE on it.

    Candidates are method names or fresh observers; ties go to the earlier candidate.

        >>> choice = choose_observer(acts, ("minmax", "percentile"))  # doctest: +SKIP
        >>> choice.method, choice.errors                               # doctest: +SKIP
    """
    batches = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
    if not batches:
        raise InputError("choose_observer needs at least one calibration batch; got none.")
    if not candidates:
        raise GraphoptError("choose_observer needs at least one candidate method.")
    observers = [make_observer(c) if isinstance(c, str) else c for c in candidates]
    for x in batches:
        observe_all(observers, x)  # one histogram for percentile, entropy and mse
    return pick_method(
        observers, lambda qp: fake_quant_error(batches, qp), symmetric=symmetric, name=name
    )


def pick_method(
    observers: Sequence[Observer],
    error: Callable[[QParams], float],
    *,
    symmetric: bool = True,
    name: str = "",
) -> MethodChoice:
    """The observer (fed already) whose parameters give the lowest ``error(qparams)``, the
    fake-quantisation MSE (of all of the tensor, or an estimate); ties go to the earlier one."""
    best: MethodChoice | None = None
    errors: dict[str, float] = {}
    for observer in observers:
        qp = observer.qparams(symmetric=symmetric)
        label = observer.name if observer.name not in errors else f"{observer.name}#{len(errors)}"
        errors[label] = error(qp)
        if best is None or errors[label] < errors[best.method]:
            best = MethodChoice(label, qp, errors, name)
    return best

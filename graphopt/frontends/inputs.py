"""Example inputs: made tensors and checked (count, dtypes, finite values), the model run once
on copies of them (it must run, return tensors and leave its inputs alone), and where one is
constant, a seeded random sample of the same shapes beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphopt._util import first_line
from graphopt.core.numerics import flatten_outputs
from graphopt.errors import CaptureError, InputError
from graphopt.frontends.onnx import from_numpy


def as_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of tensors; an InputError saying what to pass otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, list | tuple):
        raise InputError(
            f"example_inputs must be a tuple of tensors, e.g. (x,); got "
            f"{type(example_inputs).__name__}."
        )
    out = []
    for i, x in enumerate(example_inputs):
        # copies: graphopt runs models many times and never on the caller's own tensors
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                raise InputError(
                    f"example input {i} is on the 'meta' device and holds no values; pass "
                    "a real tensor."
                )
            out.append(_clone(x.detach().cpu()))
        elif type(x).__module__ == "numpy":
            out.append(from_numpy(x))  # a copy; ml_dtypes' bfloat16/float8 too
        else:
            raise InputError(
                f"example input {i} is a {type(x).__name__}; graphopt takes "
                "torch tensors or numpy arrays."
            )
    return tuple(out)


def _clone(t: torch.Tensor) -> torch.Tensor:
    # an inference tensor (made under torch.inference_mode()) cloned outside inference mode is
    # a normal tensor, which every later step (tracing, passes, autograd in fine-tuning) takes
    with torch.inference_mode(False):
        return t.clone()


def check_example_inputs(inputs: Sequence[torch.Tensor]) -> None:
    """Refuse example inputs that cannot tell a right graph from a wrong one.

    Empty tensors (batch 0) compare nothing; NaN/inf make every comparison meaningless.
    """
    for i, x in enumerate(inputs):
        if x.dim() > 0 and x.numel() == 0:
            raise InputError(
                f"example input {i} is empty (shape {tuple(x.shape)}): checks on it compare "
                "nothing. Pass at least one sample, e.g. batch size 1."
            )
        if x.is_floating_point() or x.is_complex():
            # float8 is storage only in torch: isfinite works on its float32 values
            finite = torch.isfinite(x.float() if x.element_size() == 1 else x)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise InputError(
                    f"example input {i} holds {bad} NaN/inf value(s): checks on it would "
                    "compare NaN with NaN. Pass finite, representative inputs."
                )


def is_constant(x: torch.Tensor) -> bool:
    """Every element equal (all zeros, all ones...): such an input hides most rewrite bugs."""
    if x.numel() <= 1:
        return False
    flat = x.reshape(-1)
    return bool((flat == flat[0]).all())


def discriminating_inputs(inputs: Sequence[torch.Tensor], seed: int = 0) -> tuple | None:
    """A second sample where some floating input is constant: each constant floating input
    replaced by seeded random values of its shape and dtype (``None`` when none is constant)."""
    if not any(x.is_floating_point() and is_constant(x) for x in inputs):
        return None
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
        if x.is_floating_point() and is_constant(x)
        else x.clone()
        for x in inputs
    )


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``model`` once on copies of ``inputs``: it must run, return tensors and leave its
    inputs alone (a model that updates its input in place cannot be captured faithfully:
    tracing turns ``x += 1`` on an input into an out-of-place add)."""
    check_example_inputs(inputs)
    copies = tuple(_clone(x) for x in inputs)
    state = _state(model)
    try:
        with torch.no_grad():
            out = model(*copies)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise InputError(
            f"the model raised on the example inputs ({shapes}): "
            f"{type(exc).__name__}: {first_line(exc)}. Pass inputs of the shape "
            "and dtype the model expects."
        ) from exc

    if not flatten_outputs(out):
        raise CaptureError(
            f"the model returned {_describe_value(out)}, not tensors; graphopt optimizes "
            "models whose forward() returns a tensor or a tuple/list/dict of tensors."
        )
    if updated := [name for name, t in _state(model).items() if not _same(state[name], t)]:
        shown = ", ".join(updated[:3]) + (
            f" and {len(updated) - 3} more" if len(updated) > 3 else ""
        )
        raise CaptureError(
            f"the model changes its own state in forward() ({shown} differ after one call); an "
            "optimized artifact is a pure function of its inputs and cannot carry such updates "
            "(a running average, a step counter, a cache). Optimize a module whose forward "
            "leaves its parameters and buffers alone, and update the state outside it."
        )
    changed = [
        i for i, (x, c) in enumerate(zip(inputs, copies, strict=True)) if not torch.equal(x, c)
    ]
    if not changed and (probe := discriminating_inputs(inputs)) is not None:
        # `x.mul_(2)` leaves an all-zero input as it was: look again on random values
        copies = tuple(_clone(x) for x in probe)
        try:
            with torch.no_grad():
                model(*copies)
        except Exception:  # noqa: BLE001 - the random probe is ours; the user's inputs ran
            copies = probe
        changed = [
            i for i, (x, c) in enumerate(zip(probe, copies, strict=True)) if not torch.equal(x, c)
        ]
    if changed:
        raise CaptureError(
            f"the model updates its input(s) {', '.join(map(str, changed))} in place (e.g. "
            "`x += 1` or `x.mul_(2)` on an argument of forward()); a captured graph cannot "
            "reproduce that effect on the caller's tensor. Work on a copy in forward() "
            "(`x = x + 1`, `x = x.mul(2)`)."
        )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, by name."""
    with torch.inference_mode(False):
        return {
            name: t.detach().clone()
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


def _describe_value(out: Any) -> str:
    if out is None:
        return "None"
    if isinstance(out, int | float | bool | str):
        return f"a {type(out).__name__} ({out!r})"
    return f"a {type(out).__name__} holding no tensor"

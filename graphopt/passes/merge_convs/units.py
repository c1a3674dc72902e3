"""The units merge-convs times: each candidate span as a one-conv module at its real input
shape (with the residual add it keeps, and in depth mode the activation after it), keyed in
the latency cache by its structure."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

import graphopt.algebra.conv_merge as algebra
from graphopt.backends.measure import UnitTimer
from graphopt.fx.names import layer_path
from graphopt.passes.merge_convs.candidates import Candidate, StretchPlan, candidates
from graphopt.passes.merge_convs.stretches import Stretch, value_shape

_UNIT_VERSION = "merge-convs/1"  # bump when a unit's exported form changes


class Unit(nn.Module):
    """A conv as the backend times it; with ``add``, followed by the residual add; with
    ``act``, followed by the activation (depth compression times each span with the
    activation after it, which the backend fuses into the conv)."""

    def __init__(self, conv: nn.Module, add: bool, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.add = add
        self.act = act

    def forward(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y + residual[0] if self.add else y
        return self.act(y) if self.act is not None else y


def conv_module(spec: algebra.ConvSpec, dtype: torch.dtype) -> nn.Module:
    return spec.module(dtype).eval().requires_grad_(False)


class _Apply(nn.Module):
    """A functional activation as a module (for timing units)."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict, method: bool) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs, self.method = fn, args, kwargs, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method:
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, args={self.args}, kwargs={self.kwargs}"


def activation_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    if node.op == "call_module":
        return copy.deepcopy(gm.get_submodule(str(node.target)))
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    return _Apply(node.target, tuple(node.args[1:]), kwargs, node.op == "call_method")


def time_stretch(
    stretch: Stretch,
    timer: UnitTimer,
    stats: Counter,
    gm: fx.GraphModule,
    options: Any,
    depth: bool,
) -> tuple[StretchPlan, dict[Candidate, algebra.ConvSpec]]:
    """The stretch's candidates, timed (``layer.reason`` says why nothing was timed). In
    depth mode padding moves to each span's first conv and every unit ends in the
    activation after its last position."""
    opts = options
    shape = value_shape(stretch.values[0])
    layer = StretchPlan(stretch.label, tuple(map(layer_path, stretch.convs)), shape or ())
    meta = stretch.values[0].meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    if shape is None or any(value_shape(v) is None for v in stretch.values):
        layer.reason = "no-shape"
        stats["skipped:no-shape"] += 1
        return layer, {}
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        layer.reason = "dtype"
        stats["skipped:dtype"] += 1
        return layer, {}
    built = candidates(stretch, opts.max_kernel, opts.max_span, move_padding=depth)
    for cand, spec in built:
        if spec is None:
            stats[f"skipped:{cand.refusal.reason}"] += 1
    if not any(spec is not None and cand.merges for cand, spec in built):
        layer.candidates = [cand for cand, _ in built]  # nothing to time: all refused
        layer.reason = "all-refused"
        stats["skipped:all-refused"] += 1
        if not depth:
            return layer, {}
    units: dict[str, tuple[Unit, list[tuple[int, ...]]]] = {}
    keys: dict[int, str] = {}
    for n, (cand, spec) in enumerate(built):
        if spec is None:
            continue
        act = stretch.acts.get(cand.j) if depth else None
        unit = Unit(
            conv_module(spec, dtype),
            cand.keeps_add,
            activation_module(gm, act) if act is not None else None,
        )
        shapes = [value_shape(stretch.values[cand.i])]
        if cand.keeps_add:
            a = next(a for a, b, _ in stretch.residuals if b + 1 == cand.j)
            shapes.append(value_shape(stretch.values[a]))
        keys[n] = timer.key(
            unit=_UNIT_VERSION,
            module=repr(unit.conv),
            add=unit.add,
            act=repr(unit.act) if unit.act is not None else None,
            shapes=[list(s) for s in shapes],
            dtype=str(dtype),
        )
        units.setdefault(keys[n], (unit, shapes))
    latencies = timer.latencies(units, dtype)
    timed, specs = [], {}
    for n, (cand, spec) in enumerate(built):
        if n in keys:
            cand = Candidate(
                cand.i, cand.j, cand.folded, cand.keeps_add, latencies[keys[n]].median_ms
            )
            specs[cand] = spec
        timed.append(cand)
    layer.candidates = timed
    return layer, specs

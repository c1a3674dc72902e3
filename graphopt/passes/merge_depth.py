"""Depth compression for ``merge-convs{budget=...}``: remove activations under a latency budget
and merge what becomes linear (the second stage of Kim et al., ICML 2023; algorithms.md §3).

The stretches are found *through* activations (``find_stretches(through_activations=True)``)
and numbered end to end as one chain whose positions carry the activations that may go (every
activation between or after the stretch's convs; a position without one keeps none -- a linear
bottleneck stays linear). Spans never cross from one stretch into the next.

Tables, all from the target and the user's data:

* ``T(i, j)``: every valid span ``(i, j]`` merged into one conv -- padding moved to its first
  conv (``move_padding``), residual bodies folded -- followed by its activation, timed on the
  target's backend at its real input shape (the exact mode's units and cache: a second run
  measures nothing).
* ``h(i, j, a_i, a_j)``: the importance of segment ``(i, j]`` with its inner activations removed
  and the one at ``j`` kept or not: the negated relative output error
  ``-sum||y' - y||^2 / sum||y||^2`` over the calibration batches, or, given a ``metric``
  (``metric(predict) -> float``, higher is better, e.g. accuracy on a held-out split;
  ``predict(*arrays)`` runs the network on numpy inputs), the change of the metric. Each distinct set of removed activations is evaluated once, on one copy
  of the graph whose activations are switched off and on.

:func:`graphopt.merge_plan.plan` then keeps the activations of the largest summed importance
whose predicted latency fits the budget. The budget is ``budget`` times the model's latency, or
``budget_ms``. The model is timed whole and predicted as ``scale * sum T`` over the chosen spans,
``scale = T_model / sum of the single convs`` (algorithms.md §6.2: units timed alone are not
the model; on ONNX Runtime MobileNetV2 takes about 1.6x its convs timed alone, the layout
changes between them and the head growing with the convs), so the spans' budget is
``budget * sum of single convs``, or ``budget_ms / scale``.

Then the architecture is fixed: the removed activations become identities and each chosen span
becomes a :class:`MergedSpan` -- its convs with the zero padding moved to the span's input, the
residual skips centre-cropped -- which trains like the convs it holds. The fine-tuning hook
(``finetune``, a constructor argument or ``PassContext.finetune``) trains that graph; then each
span becomes the one conv it computes (exact up to float rounding). Lossy: removing activations
and moving padding change the function; the pass declares ``cosine >= min_cosine``.

:class:`DepthPlan` (in ``PassResult.decisions``) holds the budget, the activations kept and
removed, the spans, the predicted latency against the model measured before and after.

Not handled: inserting an activation where the network had none (the reference does at block
boundaries), importance refined by a short fine-tune per entry (the reference's
``measure_imp``; here the error of the unmerged network without those activations, which
fine-tuning later recovers).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

import graphopt.merge_algebra as algebra
from graphopt.backends.measure import UnitTimer
from graphopt.errors import InputError
from graphopt.merge_plan import plan
from graphopt.report import Progress

log = logging.getLogger(__name__)

_MODEL_UNIT = "merge-convs/model/1"


# ------------------------------------------------------------------------------------------------
# the fine-tunable form of a merged span


class MergedSpan(nn.Module):
    """Convs applied in order as the one conv they merge into, in a form that trains: the
    input is zero-padded once by the span's moved padding, every conv runs unpadded, and a
    residual ``x + body(x)`` inside the span adds ``x`` centre-cropped to the body's output.
    :meth:`spec` is the merged conv (exact up to float rounding: both compute the same valid
    convs of the padded input).

    ``convs``: ConvSpecs with their original padding; ``bodies``: ``(a, b)``, convs ``a..b``
    (0-based) with the skip around them.
    """

    def __init__(
        self,
        convs: list[algebra.ConvSpec],
        bodies: list[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = True,
    ) -> None:
        super().__init__()
        dims = convs[0].dims
        self.paddings = [tuple(c.padding) for c in convs]
        self.bodies = sorted(bodies)
        self.convs = nn.ModuleList(
            c.module(dtype, padding=0).requires_grad_(requires_grad) for c in convs
        )
        moved = [0] * dims  # p = p1 + p2*s1 + p3*s1*s2 ...
        stride = [1] * dims
        for spec in convs:
            for d in range(dims):
                moved[d] += spec.padding[d] * stride[d]
                stride[d] *= spec.stride[d]
        self.padding = tuple(moved)
        self._pad = tuple(p for m in reversed(moved) for p in (m, m))
        for a, b in self.bodies:
            if any(s != 1 for c in convs[a : b + 1] for s in c.stride):
                raise InputError(f"residual body {a}..{b} has a strided conv: x + f(x) cannot hold")
        # the skip of a stride-1 body is cropped by the body's own padding on each side
        self._crops = {
            b: (a, [sum(convs[k].padding[d] for k in range(a, b + 1)) for d in range(dims)])
            for a, b in self.bodies
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self._pad) if any(self._pad) else x
        starts = {a for a, _ in self.bodies}
        saved: dict[int, torch.Tensor] = {}
        for k, conv in enumerate(self.convs):
            if k in starts:
                saved[k] = x
            x = conv(x)
            if k in self._crops:
                a, crop = self._crops[k]
                skip = saved.pop(a)
                index = (...,) + tuple(
                    slice(c, skip.shape[-len(crop) + d] - c) for d, c in enumerate(crop)
                )
                x = x + skip[index]
        return x

    def specs(self) -> list[algebra.ConvSpec]:
        """The convs as they are now (after fine-tuning), with their original padding."""
        return [
            algebra.ConvSpec(c.weight.detach(), c.bias.detach(), c.stride, p, c.dilation, c.groups)
            for c, p in zip(self.convs, self.paddings, strict=True)
        ]

    def spec(self) -> algebra.ConvSpec:
        """The one conv this span computes."""
        from graphopt.passes.merge_convs import merge_specs

        merged = merge_specs(self.specs(), self.bodies, None, move_padding=True)
        if isinstance(merged, algebra.Refusal):  # the plan only holds spans the algebra merged
            raise InputError(f"the fixed span no longer merges: {merged}")
        return merged


# ------------------------------------------------------------------------------------------------
# importance


class _Switch(nn.Module):
    """``on``: the activation's output; off: its input (the activation removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = True

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y if self.on else x


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _outputs(v)]
    return []


class Importance:
    """Evaluates sets of removed activations on one switchable copy of the graph.

    ``acts``: the activation nodes of ``gm`` by any key; ``score(removed)`` is the importance
    of removing those keys (0 for none): ``-relative output error`` over ``batches``, or the
    change of ``metric(predict) -> float`` (higher is better; ``predict(*arrays)`` runs the
    graph on numpy inputs and returns numpy outputs -- the same form ``optimize(metric=...)``
    gives int8 quantisation).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        acts: dict[Any, fx.Node],
        batches: list[tuple[Any, ...]],
        metric: Callable[[nn.Module], float] | None = None,
    ) -> None:
        self.batches = batches
        self.metric = metric
        self.evaluated = 0
        names = {node.name: key for key, node in acts.items()}
        self.copy = copy.deepcopy(gm)
        self.switches: dict[Any, _Switch] = {}
        for node in list(self.copy.graph.nodes):
            key = names.get(node.name)
            if key is None:
                continue
            switch = _Switch()
            name = f"_importance_switch_{len(self.switches)}"
            self.copy.add_submodule(name, switch)
            with self.copy.graph.inserting_after(node):
                new = self.copy.graph.call_module(name, (node, node.args[0]))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            self.switches[key] = switch
        self.copy.recompile()
        self.copy.eval()
        self.memo: dict[frozenset, float] = {frozenset(): 0.0}
        with torch.no_grad():
            self.reference = [_outputs(self.copy(*b)) for b in batches]
        self.base = float(metric(self.predict)) if metric is not None else 0.0

    def predict(self, *arrays: Any) -> Any:
        """The switchable graph on numpy (or torch) inputs, numpy outputs: what the user's
        ``metric(predict)`` calls."""
        with torch.no_grad():
            out = self.copy(*(torch.as_tensor(a) for a in arrays))
        outs = [t.numpy() for t in _outputs(out)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def score(self, removed: Iterable[Any]) -> float:
        key = frozenset(removed)
        if key not in self.memo:
            for k, switch in self.switches.items():
                switch.on = k not in key
            with torch.no_grad():
                if self.metric is not None:
                    value = float(self.metric(self.predict)) - self.base
                else:
                    err = ref = 0.0
                    for batch, expected in zip(self.batches, self.reference, strict=True):
                        for y, y0 in zip(_outputs(self.copy(*batch)), expected, strict=True):
                            err += float(((y.double() - y0.double()) ** 2).sum())
                            ref += float((y0.double() ** 2).sum())
                    value = -err / ref if ref > 0 else -err
            for switch in self.switches.values():
                switch.on = True
            if not math.isfinite(value):
                raise InputError(
                    f"the importance of removing {sorted(map(str, key))} is {value}; "
                    "check the calibration data and the metric"
                )
            self.memo[key] = value
            self.evaluated += 1
        return self.memo[key]


# ------------------------------------------------------------------------------------------------
# the plan over all stretches


@dataclass
class DepthPlan:
    """What depth compression decided: the budget, kept and removed activations, merged spans,
    predicted and measured latency."""

    budget_ms: float
    model_ms: float | None = None
    scale: float = 1.0
    unmerged_ms: float = 0.0
    predicted_ms: float = 0.0
    measured_before_ms: float | None = None
    measured_after_ms: float | None = None
    importance: float = 0.0
    importance_source: str = "output error"
    planning_s: float = 0.0
    evaluated_sets: int = 0
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    finetuned: str = ""
    attempts: list[tuple[float, float, float]] = field(default_factory=list)
    reason: str = ""  # why nothing was changed ("not-faster": no plan measured faster)

    def __str__(self) -> str:
        lines = [
            f"depth compression: budget {self.budget_ms:.4f} ms; convs timed alone "
            f"{self.unmerged_ms:.4f} ms unmerged -> {self.predicted_ms:.4f} ms planned (model = "
            f"{self.scale:.2f} x convs); importance ({self.importance_source}) "
            f"{self.importance:.6g} from {self.evaluated_sets} evaluated sets; planned in "
            f"{self.planning_s:.2f} s"
        ]
        if self.measured_before_ms is not None and self.measured_after_ms is not None:
            predicted = self.scale * self.predicted_ms
            lines.append(
                f"  model measured {self.measured_before_ms:.4f} -> {self.measured_after_ms:.4f} "
                f"ms ({self.measured_before_ms / self.measured_after_ms:.2f}x); predicted "
                f"{predicted:.4f} ms"
            )
        for n, (predicted, measured, ratio) in enumerate(self.attempts, start=1):
            lines.append(
                f"  plan {n}: predicted {predicted:.4f} ms, measured {measured:.4f} ms = "
                f"{ratio:.3f} x the model"
            )
        lines.append(f"  activations removed ({len(self.removed)}): {', '.join(self.removed)}")
        lines.append(f"  activations kept ({len(self.kept)})")
        lines += [f"  {s}" for s in self.spans]
        if self.refusals:
            why = ", ".join(f"{k} {v}" for k, v in sorted(self.refusals.items()))
            lines.append(f"  spans refused by the merge algebra: {why}")
        if self.finetuned:
            lines.append(f"  fine-tuned with {self.finetuned} before the final merge")
        if self.reason:
            lines.append(f"  left as it is ({self.reason}): no plan was measured faster whole")
        return "\n".join(lines)


@dataclass
class Chain:
    """The stretches numbered end to end: stretch ``s`` holds positions
    ``offsets[s] .. offsets[s] + length``."""

    stretches: list[Any]
    offsets: list[int]

    @classmethod
    def of(cls, stretches: list[Any]) -> Chain:
        offsets, total = [], 0
        for s in stretches:
            offsets.append(total)
            total += s.length
        return cls(stretches, offsets)

    @property
    def length(self) -> int:
        return self.offsets[-1] + self.stretches[-1].length if self.stretches else 0

    def acts(self) -> dict[int, fx.Node]:
        return {
            off + p: node
            for s, off in zip(self.stretches, self.offsets, strict=True)
            for p, node in s.acts.items()
            if p > 0
        }

    def local(self, i: int, j: int) -> tuple[int, int, int]:
        """Virtual span ``(i, j]`` as ``(stretch index, i, j)`` in that stretch."""
        for s in range(len(self.stretches) - 1, -1, -1):
            if self.offsets[s] <= i:
                return s, i - self.offsets[s], j - self.offsets[s]
        raise IndexError(i)


def importance_table(
    chain: Chain,
    spans: Iterable[tuple[int, int]],
    importance: Importance,
    say: Progress,
) -> dict[tuple[int, int, int, int], float]:
    """``h(i, j, a_i, a_j)`` for the virtual spans ``spans`` (independent of ``a_i``: the
    activation at ``i`` is the previous segment's)."""
    acts = chain.acts()
    sets: dict[tuple[int, int, int], frozenset] = {}
    for i, j in spans:
        inner = frozenset(p for p in range(i + 1, j) if p in acts)
        for aj in (0, 1):
            sets[i, j, aj] = inner | ({j} if aj == 0 and j in acts else set())
    distinct = sorted(set(sets.values()), key=lambda s: (len(s), sorted(s)))
    for n, removed in enumerate(distinct, start=1):
        if n % 25 == 0 or n == len(distinct):
            say(f"importance: {n}/{len(distinct)} sets of removed activations")
        importance.score(removed)
    return {
        (i, j, ai, aj): importance.score(sets[i, j, aj])
        for i, j in spans
        for ai in (0, 1)
        for aj in (0, 1)
    }


def model_latency(timer: UnitTimer, modules: dict[str, nn.Module], inputs: tuple[Any, ...]) -> dict:
    """Whole graphs timed interleaved on the timer's backend, through its cache (keyed by the
    graphs' structure, weights aside, and by what they were timed beside: a second run finds
    every measurement the first made)."""
    graphs = {name: str(m) for name, m in modules.items()}
    keys = {  # a graph timed beside others is stored apart from it timed alone
        name: timer.key(
            unit=_MODEL_UNIT,
            graph=graph,
            beside=sorted(g for n, g in graphs.items() if n != name),
            shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        )
        for name, graph in graphs.items()
    }
    modules_by_key = {keys[name]: (m, inputs) for name, m in modules.items()}
    runs = max(timer.runs, 20)
    by_key = timer.cached(list(modules_by_key), lambda: timer.time_modules(modules_by_key, runs))
    return {name: by_key[key] for name, key in keys.items()}


def plan_depth(
    length: int,
    table: dict[tuple[int, int], float],
    h: dict[tuple[int, int, int, int], float],
    candidates: set[int],
    budget_ms: float,
    resolution: int,
) -> Any:
    """Stage 2 over the virtual chain (raises InputError when nothing fits)."""
    return plan(
        length,
        table,
        h,
        budget_ms,
        candidates=candidates,
        resolution=budget_ms / resolution,
    )

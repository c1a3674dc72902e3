"""The two-stage dynamic program of Kim et al. (ICML 2023) that decides which convs to merge.

Pure planning, no torch: the inputs are tables, the output a printable :class:`Plan`. Convs are
numbered ``1..L``; position ``i`` is "after conv ``i``" and position 0 the input. A span
``(i, j]`` is the convs ``i+1..j`` merged into one conv.

Inputs:

* ``latency``: ``T(i, j)`` for every valid span (a mapping ``{(i, j): t}`` or a callable; an
  invalid span is absent, ``None`` or ``inf``). Spans that cut a residual body, or that the merge
  algebra refuses, are simply left out.
* ``importance`` (depth-compression mode), in one of three forms:
  ``h(i, j, a_i, a_j)`` -- the importance of segment ``(i, j]`` with every activation inside it
  removed and the boundary activations present or not (``a in {0, 1}``; the reference code's
  ``measure_imp``; a callable of four ints or a mapping with 4-tuple keys);
  ``I(i, j)`` -- a mapping with 2-tuple keys: the paper's form, both boundaries keep their
  activation (the input and the network's end count as kept);
  ``{position: value}`` -- additive per-activation importance, the sum over kept activations.
* ``budget``: the latency ``T0``, in the unit of ``latency``.

Stage 1 (``optimal_time_table``), the best split of an activation-free stretch into merged
spans::

    T_opt(i, j) = min( T(i, j),  min_{i<k<j} T_opt(i, k) + T(k, j) )

Ties: the split with more spans (a merge is chosen only when strictly faster), then the
smallest ``k``.

Importance extension (max-plus closure over split points whose activation is removed, so that
importance is additive over segments, like ``T_opt``)::

    I(i, j, a_i, a_j) = max( h(i, j, a_i, a_j),  max_{i<k<j} I(i, k, a_i, 0) + h(k, j, 0, a_j) )

Stage 2, over time discretised into bins of ``resolution`` (``tau = ceil(T_opt / resolution)``,
``B = floor(budget / resolution)``; rounding up makes every plan meet the real budget)::

    D[0, a=1, t] = 0                 (the input behaves as "activation present")
    D[m, a, t]   = max( D[m, a, t-1],  max_{i<m, j} D[i, j, t - tau(i, m)] + I(i, m, j, a) )
    answer         max_a D[L, a, B]

which maximises ``sum I`` over segments subject to ``sum tau <= B``. Kept activations are the
positions with ``a = 1``; the merge boundaries are the segment ends plus stage 1's splits inside
each segment. Ties: the larger importance (compared on a grid ``2**-40`` of the largest
importance, so that sums in different orders agree), then the smaller time in bins, then keeping
the last activation, then a fixed order of predecessors. With latencies that are multiples of
``resolution`` the plan is optimal for the exact problem: among all choices of kept activations
``A``, merge boundaries ``S ⊇ A`` and importance split points, the largest total importance
whose latency ``sum_{spans of S} T`` fits the budget.

Exact mode (``plan_exact``): every activation is kept and each activation-free stretch is split
by stage 1 alone, so a merge is kept only where ``T`` says it is faster.

Complexity: stage 1 ``O(L^3)``, extension ``O(L^3)``, stage 2 ``O(L^2 * B)`` (vectorised over
``t``); ``L = 50`` with 1000 bins plans in well under a second.

>>> t = {(0, 1): 2.0, (1, 2): 2.0, (2, 3): 2.0, (0, 2): 3.0, (1, 3): 3.0, (0, 3): 3.5}
>>> print(plan(3, t, {1: 1.0, 2: 0.5}, budget=5.0, resolution=0.5))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import InputError


class NoPlan(InputError):
    """No plan meets the latency budget: the budget is below the fastest cover of the chain."""


__all__ = ["NoPlan", "Plan", "optimal_time_table", "plan", "plan_exact"]

_INF = math.inf
Latency = Mapping[tuple[int, int], float | None] | Callable[[int, int], float | None]


@dataclass(frozen=True)
class Plan:
    """What to merge: ``spans`` partition ``(0, L]``, each becoming one conv; ``activations``
    are the positions whose activation is kept (``removed``: dropped candidates). ``latency`` is
    the predicted sum of ``T`` over the spans; ``objective`` the total importance (None in exact
    mode)."""

    num_layers: int
    activations: tuple[int, ...]
    removed: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    span_latency: tuple[float, ...]
    unmerged_latency: tuple[float, ...]
    latency: float
    objective: float | None
    budget: float | None

    @property
    def merged(self) -> tuple[tuple[int, int], ...]:
        """The spans of more than one conv."""
        return tuple((i, j) for i, j in self.spans if j - i > 1)

    def __str__(self) -> str:
        head = f"merge plan: {self.num_layers} convs, predicted latency {self.latency:.6g}"
        if self.budget is not None:
            head += f" (budget {self.budget:.6g})"
        if self.objective is not None:
            head += f", importance {self.objective:.6g}"
        lines = [head]
        lines.append(
            f"  activations kept at {list(self.activations)}; removed {list(self.removed)}"
        )
        for (i, j), t, alone in zip(
            self.spans, self.span_latency, self.unmerged_latency, strict=True
        ):
            if j - i == 1:
                lines.append(f"  conv {j}: {t:.6g}")
            else:
                why = f"one at a time {alone:.6g}" if math.isfinite(alone) else "singles not timed"
                lines.append(f"  convs {i + 1}..{j} merged: {t:.6g} ({why})")
        return "\n".join(lines)


def _latency_array(num_layers: int, latency: Latency) -> np.ndarray:
    if num_layers < 1:
        raise InputError(f"a chain needs at least one conv; got num_layers={num_layers}")
    table = np.full((num_layers + 1, num_layers + 1), _INF)
    get = latency if callable(latency) else lambda i, j: latency.get((i, j))
    for i in range(num_layers):
        for j in range(i + 1, num_layers + 1):
            t = get(i, j)
            if t is not None and math.isfinite(t):
                if t < 0:
                    raise InputError(f"latency T({i}, {j}) = {t} is negative; measure it again")
                table[i, j] = t
    return table


def _stage1(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``T_opt`` and the split point of each stretch (-1: one merged span)."""
    n = table.shape[0]
    best = np.full_like(table, _INF)
    pieces = np.zeros(table.shape, dtype=np.int64)
    split = np.full(table.shape, -1, dtype=np.int64)
    for i in range(n - 1):
        for j in range(i + 1, n):
            ks = np.arange(i + 1, j)
            times = best[i, ks] + table[ks, j]
            time, count, at = table[i, j], 1, -1
            if ks.size and np.isfinite(times).any():
                lowest = times.min()
                tied = ks[times == lowest]
                most = pieces[i, tied].max() + 1
                if lowest < time or (lowest == time and most > count):
                    time, count, at = lowest, most, int(tied[pieces[i, tied] + 1 == most][0])
            best[i, j], pieces[i, j], split[i, j] = time, count, at
    return best, split


def _spans(split: np.ndarray, i: int, j: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while split[i, j] >= 0:
        k = int(split[i, j])
        out.append((k, j))
        j = k
    out.append((i, j))
    return out[::-1]


def optimal_time_table(
    num_layers: int, latency: Latency
) -> dict[tuple[int, int], tuple[float, tuple[tuple[int, int], ...]]]:
    """Stage 1: ``{(i, j): (T_opt(i, j), spans)}`` for every stretch that can be covered by
    valid spans."""
    best, split = _stage1(_latency_array(num_layers, latency))
    return {
        (i, j): (float(best[i, j]), tuple(_spans(split, i, j)))
        for i in range(num_layers)
        for j in range(i + 1, num_layers + 1)
        if math.isfinite(best[i, j])
    }


def _make_plan(
    table: np.ndarray,
    split: np.ndarray,
    bounds: list[int],
    kept: list[int],
    candidates: set[int],
    objective: float | None,
    budget: float | None,
) -> Plan:
    spans = [s for i, j in zip(bounds, bounds[1:], strict=False) for s in _spans(split, i, j)]
    times = tuple(float(table[i, j]) for i, j in spans)
    alone = tuple(float(sum(table[k, k + 1] for k in range(i, j))) for i, j in spans)
    return Plan(
        num_layers=table.shape[0] - 1,
        activations=tuple(sorted(kept)),
        removed=tuple(sorted(candidates - set(kept))),
        spans=tuple(spans),
        span_latency=times,
        unmerged_latency=alone,
        latency=float(sum(times)),
        objective=objective,
        budget=budget,
    )


def plan_exact(num_layers: int, latency: Latency, activations: set[int] | list[int]) -> Plan:
    """Exact mode: keep every activation (positions ``activations``), merge inside each
    activation-free stretch only where ``T`` says it is faster."""
    table = _latency_array(num_layers, latency)
    best, split = _stage1(table)
    kept = sorted({int(a) for a in activations if 0 < a < num_layers})
    bounds = [0, *kept, num_layers]
    for i, j in zip(bounds, bounds[1:], strict=False):
        if not math.isfinite(best[i, j]):
            raise InputError(
                f"no valid spans cover convs {i + 1}..{j}; give T for each single conv at least"
            )
    return _make_plan(table, split, bounds, kept, set(kept), None, None)


def _flag_table(num_layers: int, importance: Any) -> np.ndarray:
    """``h(i, j, a_i, a_j)`` as an array ``[L+1, L+1, 2, 2]``, -inf where undefined."""
    n = num_layers + 1
    h = np.full((n, n, 2, 2), -_INF)
    if callable(importance):
        get = importance
    elif isinstance(importance, Mapping):
        keys = list(importance)
        if not keys:
            raise InputError("importance is empty; give at least one entry")
        if all(isinstance(k, int) for k in keys):  # per activation: the sum over kept ones
            values = {int(k): float(v) for k, v in importance.items()}

            def get(i: int, j: int, ai: int, aj: int) -> float:
                return values.get(j, 0.0) if aj else 0.0

        elif all(isinstance(k, tuple) and len(k) == 2 for k in keys):  # I(i, j): both kept

            def get(i: int, j: int, ai: int, aj: int) -> float | None:
                ok = ai == 1 and (aj == 1 or j == num_layers)
                return importance.get((i, j)) if ok else None

        elif all(isinstance(k, tuple) and len(k) == 4 for k in keys):

            def get(i: int, j: int, ai: int, aj: int) -> float | None:
                return importance.get((i, j, ai, aj))

        else:
            raise InputError(
                "importance keys must all be positions, (i, j) spans or (i, j, a_i, a_j) tuples"
            )
    else:
        raise InputError(f"importance must be a mapping or a callable; got {type(importance)}")
    for i in range(n - 1):
        for j in range(i + 1, n):
            for ai in (0, 1):
                for aj in (0, 1):
                    v = get(i, j, ai, aj)
                    if v is not None and not math.isnan(v):
                        h[i, j, ai, aj] = v
    return h


def _extend(h: np.ndarray) -> np.ndarray:
    ext = np.full_like(h, -_INF)
    n = h.shape[0]
    for i in range(n - 1):
        for j in range(i + 1, n):
            ks = np.arange(i + 1, j)
            best = h[i, j]
            if ks.size:
                via = ext[i, ks, :, 0][:, :, None] + h[ks, j, 0, :][:, None, :]  # [k, ai, aj]
                best = np.maximum(best, via.max(axis=0))
            ext[i, j] = best
    return ext


def plan(
    num_layers: int,
    latency: Latency,
    importance: Any,
    budget: float,
    *,
    candidates: set[int] | list[int] | None = None,
    resolution: float | None = None,
) -> Plan:
    """Depth compression: which activations to keep and which spans to merge so that the
    predicted latency fits ``budget`` and the total importance is largest (module docstring).

    ``candidates``: positions where an activation may be kept (default: every position between
    two convs, ``1..L-1``; include ``L`` if the chain ends in an activation). ``resolution``:
    the size of a time bin (default ``budget / 1000``). Raises :class:`InputError` when no plan
    meets the budget.
    """
    table = _latency_array(num_layers, latency)
    best, split = _stage1(table)
    cand = set(range(1, num_layers)) if candidates is None else {int(c) for c in candidates}
    if not cand <= set(range(1, num_layers + 1)):
        raise InputError(f"candidates must lie in 1..{num_layers}; got {sorted(cand)}")
    if budget <= 0:
        raise InputError(f"the latency budget must be positive; got {budget}")
    step = budget / 1000 if resolution is None else float(resolution)
    bins = int(math.floor(budget / step + 1e-9))
    h = _flag_table(num_layers, importance)
    h[0, :, 0, :] = -_INF  # the input counts as "activation present"
    for k in set(range(1, num_layers + 1)) - cand:
        h[:, k, :, 1] = -_INF
        h[k, :, 1, :] = -_INF
    ext = _extend(h)
    with np.errstate(invalid="ignore"):
        tau = np.where(np.isfinite(best), np.ceil(best / step), -1).astype(np.int64)
    stage2 = _stage2(ext, tau, bins)
    ends = [
        (stage2.value[num_layers, a, bins], -stage2.source[num_layers, a, bins], a) for a in (1, 0)
    ]
    score, _, last = max(ends)
    if not np.isfinite(score):
        fastest = best[0, num_layers]
        raise NoPlan(
            f"no plan meets the latency budget {budget:.6g} (the fastest cover of the chain "
            f"takes {fastest:.6g}, rounded up to bins of {step:.6g}); raise the budget, refine "
            f"the resolution, or give importance for more segments"
        )
    bounds, kept, total = _backtrack(stage2, ext, tau, last, bins)
    return _make_plan(table, split, bounds, kept, cand, total, budget)


@dataclass
class _Stage2:
    """The stage-2 tables: ``value[m, a, t]`` is ``D``; ``source`` the time at which the value
    was reached; ``choice`` an index into ``preds[m, a]``, the ``(i, j)`` it came from."""

    value: np.ndarray
    source: np.ndarray
    choice: np.ndarray
    preds: dict[tuple[int, int], list[tuple[int, int]]]


def _stage2(ext: np.ndarray, tau: np.ndarray, bins: int) -> _Stage2:
    """``D[m, a, t]`` for every position, flag and time bin (module docstring), vectorised
    over ``t``; importances compared on a grid of ``2**-40`` of the largest."""
    finite = np.abs(ext[np.isfinite(ext)])
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    grid = 2.0 ** (math.floor(math.log2(scale)) - 40)
    n, width = ext.shape[0], bins + 1
    value = np.full((n, 2, width), -_INF)
    value[0, 1, :] = 0.0
    source = np.zeros((n, 2, width), dtype=np.int64)  # the time at which the value was reached
    choice = np.zeros((n, 2, width), dtype=np.int64)  # index into preds[m][a]
    preds: dict[tuple[int, int], list[tuple[int, int]]] = {}
    times = np.arange(width)
    for m in range(1, n):
        for a in (1, 0):
            rows, pairs = [], []
            for i in range(m):
                t = int(tau[i, m])
                if t < 0 or t > bins:
                    continue
                for j in (1, 0):
                    if not np.isfinite(ext[i, m, j, a]):
                        continue
                    row = np.full(width, -_INF)
                    row[t:] = value[i, j, : width - t] + ext[i, m, j, a]
                    rows.append(row)
                    pairs.append((i, j))
            preds[m, a] = pairs
            if not rows:
                continue
            stack = np.round(np.stack(rows) / grid) * grid
            pick = stack.argmax(axis=0)
            top = stack[pick, times]
            running = np.maximum.accumulate(top)
            before = np.concatenate(([-_INF], running[:-1]))
            record = top > before
            reached = np.maximum.accumulate(np.where(record, times, 0))
            value[m, a] = running
            source[m, a] = reached
            choice[m, a] = pick[reached]
    return _Stage2(value, source, choice, preds)


def _backtrack(
    stage2: _Stage2, ext: np.ndarray, tau: np.ndarray, last: int, bins: int
) -> tuple[list[int], list[int], float]:
    """The segment bounds, kept activations and total importance of the best plan ending with
    flag ``last`` within ``bins``."""
    m = ext.shape[0] - 1
    bounds, kept, total = [m], [], 0.0
    a, t = last, bins
    while m > 0:
        t = int(stage2.source[m, a, t])
        i, j = stage2.preds[m, a][int(stage2.choice[m, a, t])]
        total += float(ext[i, m, j, a])
        if a:
            kept.append(m)
        t -= int(tau[i, m])
        m, a = i, j
        bounds.append(m)
    return bounds[::-1], kept, total

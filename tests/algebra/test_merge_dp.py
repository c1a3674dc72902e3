"""algebra.merge_dp: the two-stage DP equals brute-force enumeration of (kept activations, merge
boundaries, importance split points) on every chain up to length 8 that Hypothesis draws; hand
cases from the paper's formulation; exact mode; a length-50 chain plans fast."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.algebra.merge_dp import optimal_time_table, plan, plan_exact
from graphopt.errors import InputError

# --- brute force, straight from the definitions --------------------------------------------------


def supersets(base, universe):
    free = sorted(set(universe) - set(base))
    for r in range(len(free) + 1):
        for extra in itertools.combinations(free, r):
            yield sorted(set(base) | set(extra))


def cover_time(L, T, bounds):
    """sum of T over the spans between consecutive boundaries; inf if one is invalid."""
    points = [0, *bounds, L]
    return sum(T.get((i, j), math.inf) for i, j in zip(points, points[1:], strict=False))


def brute_time(L, T, kept):
    """min over merge boundaries S ⊇ kept of the latency."""
    return min(cover_time(L, T, s) for s in supersets(kept, range(1, L)))


def brute_score(L, h, kept, last):
    """max over importance split points Z ⊇ kept of sum h(segment, boundary flags)."""
    best = -math.inf
    for z in supersets(kept, range(1, L)):
        points = [0, *z, L]
        flag = {p: int(p in kept) for p in points} | {0: 1, L: last}
        total = 0.0
        for i, j in zip(points, points[1:], strict=False):
            v = h(i, j, flag[i], flag[j])
            total = -math.inf if v is None else total + v
        best = max(best, total)
    return best


def brute(L, T, h, candidates, budget):
    """(best importance, least latency among the best) over every choice, or None."""
    best = None
    interior = sorted(c for c in candidates if c < L)
    lasts = (0, 1) if L in candidates else (0,)
    for r in range(len(interior) + 1):
        for kept in itertools.combinations(interior, r):
            t = brute_time(L, T, kept)
            if t > budget:
                continue
            for last in lasts:
                s = brute_score(L, h, kept, last)
                if s > -math.inf and (best is None or (s, -t) > (best[0], -best[1])):
                    best = (s, t)
    return best


# --- importance in its three forms, as the module documents them --------------------------------


def as_h(form, table, L):
    if form == "flags":
        return lambda i, j, ai, aj: table.get((i, j, ai, aj))
    if form == "segments":
        return lambda i, j, ai, aj: table.get((i, j)) if ai == 1 and (aj == 1 or j == L) else None
    return lambda i, j, ai, aj: table.get(j, 0.0) if aj else 0.0


eighths = st.integers(-16, 32).map(lambda n: n / 8)


@st.composite
def problems(draw, max_layers=8):
    L = draw(st.integers(1, max_layers))
    spans = [(i, j) for i in range(L) for j in range(i + 1, L + 1)]
    T = {}
    for i, j in spans:
        present = draw(st.booleans()) if j - i > 1 else draw(st.integers(0, 9)) > 0
        if present:
            T[i, j] = draw(st.integers(1, 12))
    form = draw(st.sampled_from(["flags", "segments", "activations"]))
    if form == "flags":
        keys = [(i, j, a, b) for i, j in spans for a in (0, 1) for b in (0, 1)]
        table = {k: draw(eighths) for k in keys if draw(st.integers(0, 4)) > 0}
    elif form == "segments":
        table = {s: draw(eighths) for s in spans if draw(st.integers(0, 4)) > 0}
    else:
        table = {k: draw(eighths) for k in range(1, L + 1)}
    candidates = set(draw(st.sets(st.integers(1, L))))
    singles = sum(T.get((i, i + 1), 12) for i in range(L))
    budget = draw(st.integers(1, singles + 2))
    return L, T, form, table, candidates, budget


@given(problems())
def test_plan_equals_brute_force(problem):
    L, T, form, table, candidates, budget = problem
    h = as_h(form, table, L)
    expected = brute(L, T, h, candidates, budget)
    if expected is None:
        with pytest.raises(InputError, match="budget|empty"):
            plan(L, T, table, budget, candidates=candidates, resolution=1)
        return
    p = plan(L, T, table, budget, candidates=candidates, resolution=1)
    assert p.objective == pytest.approx(expected[0], abs=1e-9)
    assert p.latency == expected[1] <= budget
    # the plan is what it says: spans partition (0, L], all valid, kept activations on boundaries
    assert [i for i, _ in p.spans[1:]] == [j for _, j in p.spans[:-1]]
    assert p.spans[0][0] == 0 and p.spans[-1][1] == L
    assert sum(T[s] for s in p.spans) == p.latency
    bounds = {j for _, j in p.spans}
    assert set(p.activations) <= candidates & bounds
    assert set(p.removed) == candidates - set(p.activations)
    interior = [a for a in p.activations if a < L]
    score = brute_score(L, h, interior, int(L in p.activations))
    assert score == pytest.approx(p.objective, abs=1e-9)
    # ties are broken the same way every time
    assert plan(L, T, table, budget, candidates=candidates, resolution=1) == p


@given(problems(max_layers=7), st.floats(0.05, 3.0))
def test_discretised_plans_meet_the_real_budget(problem, scale):
    """Non-integer latencies: bins are rounded up, so a plan never exceeds the budget."""
    L, T, form, table, candidates, budget = problem
    T = {k: v * scale * (1 + 0.1 * ((k[0] * 7 + k[1]) % 5)) for k, v in T.items()}
    try:
        p = plan(L, T, table, budget * scale, candidates=candidates)
    except InputError:
        return
    assert p.latency <= budget * scale * (1 + 1e-12)


@given(problems())
def test_stage1_is_the_best_cover(problem):
    L, T = problem[:2]
    table = optimal_time_table(L, T)
    for i in range(L):
        for j in range(i + 1, L + 1):
            sub = {(a - i, b - i): t for (a, b), t in T.items() if i <= a and b <= j}
            best = brute_time(j - i, sub, ())
            if math.isinf(best):
                assert (i, j) not in table
                continue
            t, spans = table[i, j]
            assert t == best == sum(T[s] for s in spans)


@given(problems())
def test_exact_mode_keeps_every_activation(problem):
    L, T, _, _, activations, _ = problem
    interior = sorted(a for a in activations if a < L)
    expected = brute_time(L, T, interior)
    if math.isinf(expected):
        with pytest.raises(InputError, match="single conv"):
            plan_exact(L, T, activations)
        return
    p = plan_exact(L, T, activations)
    assert p.activations == tuple(interior) and p.removed == () and p.objective is None
    assert p.latency == expected
    assert set(interior) <= {j for _, j in p.spans}


# --- hand cases ------------------------------------------------------------------------------------

T3 = {(0, 1): 2.0, (1, 2): 2.0, (2, 3): 2.0, (0, 2): 3.0, (1, 3): 3.0, (0, 3): 3.5}


def test_budget_decides_which_activations_stay():
    imp = {1: 1.0, 2: 0.5}
    loose = plan(3, T3, imp, budget=6.0, resolution=0.5)
    assert (loose.activations, loose.spans, loose.latency) == ((1, 2), ((0, 1), (1, 2), (2, 3)), 6)
    mid = plan(3, T3, imp, budget=5.0, resolution=0.5)
    assert (mid.activations, mid.merged, mid.objective) == ((1,), ((1, 3),), 1.0)
    tight = plan(3, T3, imp, budget=3.5, resolution=0.5)
    assert (tight.activations, tight.spans, tight.removed) == ((), ((0, 3),), (1, 2))
    with pytest.raises(InputError, match="no plan meets"):
        plan(3, T3, imp, budget=3.0, resolution=0.5)
    assert "convs 2..3 merged: 3 (one at a time 4)" in str(mid)


def test_segment_importance_is_the_papers_form():
    """I(i, j): importance of the block between two kept activations (both ends kept)."""
    imp = {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (0, 2): 0.5, (1, 3): 1.5, (0, 3): 0.0}
    p = plan(3, T3, imp, budget=5.0, resolution=0.5)
    assert (p.activations, p.spans, p.objective) == ((1,), ((0, 1), (1, 3)), 2.5)


def test_zero_flag_split_extends_importance_not_latency():
    """h with an activation-free split: importance adds over (0,1]+(1,2], latency is one merge."""
    T = {(0, 1): 5.0, (1, 2): 5.0, (0, 2): 4.0}
    h = {(0, 2, 1, 0): 1.0, (0, 1, 1, 0): 2.0, (1, 2, 0, 0): 2.0, (0, 1, 1, 1): 10.0}
    h[1, 2, 1, 0] = 0.0
    p = plan(2, T, h, budget=4.0, resolution=1)
    assert (p.spans, p.activations, p.objective, p.latency) == (((0, 2),), (), 4.0, 4.0)
    assert plan(2, T, h, budget=10.0, resolution=1).activations == (1,)


def test_invalid_spans_are_never_chosen():
    """A residual body (1, 3]: spans that cut it are left out of T."""
    T = {(i, i + 1): 3.0 for i in range(4)} | {(1, 3): 1.0, (0, 3): 1.0, (0, 4): 1.5}
    p = plan(4, T, {1: 1.0, 2: 5.0, 3: 1.0}, budget=7.0, resolution=1)
    assert p.spans == ((0, 1), (1, 3), (3, 4)) and p.activations == (1, 3)


def test_exact_mode_merges_only_when_faster():
    T = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 2.0, (2, 3): 1.0, (1, 3): 1.5, (0, 3): 9.0}
    assert plan_exact(3, T, []).spans == ((0, 1), (1, 3))  # (0,2] is a tie: not merged
    assert plan_exact(3, T, [1]).spans == ((0, 1), (1, 3))
    assert plan_exact(3, T, [1, 2]).merged == ()
    assert optimal_time_table(3, T)[0, 2] == (2.0, ((0, 1), (1, 2)))


def test_bad_inputs_raise():
    with pytest.raises(InputError, match="negative"):
        plan_exact(2, {(0, 1): -1.0, (1, 2): 1.0}, [])
    with pytest.raises(InputError, match="candidates"):
        plan(2, T3, {1: 1.0}, 5.0, candidates=[7])
    with pytest.raises(InputError, match="keys"):
        plan(3, T3, {1: 1.0, (0, 1): 2.0}, 5.0)


def test_length_50_plans_fast():
    rng = random.Random(0)
    L = 50
    T = {
        (i, j): rng.uniform(0.1, 1.0) * (1 + 0.3 * (j - i))
        for i in range(L)
        for j in range(i + 1, L + 1)
        if j - i <= 12 or rng.random() < 0.2
    }
    h = {(i, j, a, b): rng.uniform(-1, 1) for i, j in T for a in (0, 1) for b in (0, 1)}
    budget = 0.7 * sum(T[i, i + 1] for i in range(L))
    start = time.perf_counter()
    p = plan(L, T, h, budget)
    assert time.perf_counter() - start < 1.0
    assert p.latency <= budget
    start = time.perf_counter()
    plan(L, T, {k: rng.random() for k in range(1, L)}, budget)
    plan_exact(L, T, range(1, L, 3))
    assert time.perf_counter() - start < 1.0


def test_planning_imports_no_torch():
    """plan() is pure: the module imports neither torch nor anything that does."""
    import ast
    from pathlib import Path

    import graphopt.algebra.merge_dp as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "math", "collections.abc", "dataclasses", "typing", "numpy"} | {
        "graphopt.errors"
    }

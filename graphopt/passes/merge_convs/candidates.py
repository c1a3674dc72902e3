"""Candidate spans of a stretch: every single conv and every span of convs that the merge
algebra turns into one conv (residual bodies folded or the add kept), and the plan that
records them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

import graphopt.algebra.conv_merge as algebra
from graphopt.passes.merge_convs.stretches import Stretch


@dataclass(frozen=True)
class Candidate:
    """One way to compute span ``(i, j]`` as one conv: ``folded`` residual adds inside it,
    ``keeps_add``: the unit ends in the residual add that stays in the graph. ``latency_ms`` is
    the measured median (None until timed); ``refusal`` why the merge algebra refused it."""

    i: int
    j: int
    folded: int = 0
    keeps_add: bool = False
    latency_ms: float | None = None
    refusal: algebra.Refusal | None = None

    @property
    def merges(self) -> bool:
        return self.j - self.i > 1 or self.folded > 0

    @property
    def label(self) -> str:
        convs = f"conv {self.j}" if self.j - self.i == 1 else f"convs {self.i + 1}..{self.j}"
        extra = " +residual" * self.folded + (" then add" if self.keeps_add else "")
        return convs + extra

    def __str__(self) -> str:
        if self.refusal is not None:
            return f"{self.label}: refused {self.refusal}"
        t = f"{self.latency_ms:.4f} ms" if self.latency_ms is not None else "not timed"
        return f"{self.label}: {t}"


def _span_kind(stretch: Stretch, i: int, j: int) -> tuple[str, list[tuple[int, int]]]:
    """("invalid" | "plain" | "exact-body" | "ends-at-add", residuals folded inside)."""
    folded, kind = [], "plain"
    for a, b, _ in stretch.residuals:
        lo, hi = a, b + 1  # the body is span (a, b+1]
        if i == lo and j == hi:
            kind = "exact-body"
        elif i <= lo and hi <= j:
            folded.append((a, b))
        elif lo <= i and j <= hi:
            if j == hi:
                kind = "ends-at-add"
        elif j <= lo or hi <= i:
            continue
        else:
            return "invalid", []
    return kind, folded


def _merge_span(
    stretch: Stretch,
    i: int,
    j: int,
    folded: list[tuple[int, int]],
    max_kernel: int,
    move_padding: bool = False,
) -> algebra.ConvSpec | algebra.Refusal:
    """Convs ``i+1..j`` as one conv, the residuals ``folded`` (whole bodies) folded in."""
    relative = [(a - i, b - i) for a, b in folded]
    return algebra.merge_specs(stretch.specs[i:j], relative, max_kernel, move_padding)


def candidates(
    stretch: Stretch, max_kernel: int, max_span: int, move_padding: bool = False
) -> list[tuple[Candidate, algebra.ConvSpec | None]]:
    """Every single conv and every span of at most ``max_span`` convs, with its merged conv
    (None for a refused one). ``move_padding``: depth compression's padding moved to the
    span's first conv (see :mod:`graphopt.algebra.conv_merge`)."""
    out: list[tuple[Candidate, algebra.ConvSpec | None]] = []
    for i in range(stretch.length):
        for j in range(i + 1, min(stretch.length, i + max_span) + 1):
            kind, folded = _span_kind(stretch, i, j)
            if kind == "invalid":
                continue
            variants = [(folded, kind == "ends-at-add")]
            if kind == "exact-body":  # fold the add, or keep it after the merged body
                body = next((a, b) for a, b, _ in stretch.residuals if a == i and b + 1 == j)
                variants = [([*folded, body], False), (folded, True)]
            for fold, keeps_add in variants:
                spec = _merge_span(stretch, i, j, fold, max_kernel, move_padding)
                cand = Candidate(i, j, len(fold), keeps_add)
                if isinstance(spec, algebra.Refusal):
                    out.append((Candidate(i, j, len(fold), keeps_add, refusal=spec), None))
                else:
                    out.append((cand, spec))
    return out


def folded_bodies(stretch: Stretch, cand: Candidate) -> list[tuple[int, int, fx.Node]]:
    """The residuals ``(a, b, add)`` of ``stretch`` that ``cand`` folds into its conv."""
    return [
        (a, b, add)
        for a, b, add in stretch.residuals
        if cand.i <= a
        and b + 1 <= cand.j
        and not (cand.keeps_add and (a, b + 1) == (cand.i, cand.j))
    ]


@dataclass
class StretchPlan:
    """What was decided for one stretch: its candidates, the chosen spans (one candidate per
    span of the partition), predicted and unmerged latency, or why nothing merges."""

    stretch: str
    convs: tuple[str, ...]
    input_shape: tuple[int, ...]
    candidates: list[Candidate] = field(default_factory=list)
    chosen: list[Candidate] = field(default_factory=list)
    predicted_ms: float | None = None
    unmerged_ms: float | None = None
    reason: str = ""

    @property
    def merged(self) -> list[Candidate]:
        return [c for c in self.chosen if c.merges]

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        head = f"stretch {self.stretch} [{len(self.convs)} convs, input {shape}]"
        if self.merged:
            spans = ", ".join(c.label for c in self.merged)
            verdict = (
                f"merged {spans}: predicted {self.predicted_ms:.4f} ms against "
                f"{self.unmerged_ms:.4f} ms unmerged ({self.unmerged_ms / self.predicted_ms:.2f}x)"
            )
        else:
            unmerged = f"{self.unmerged_ms:.4f} ms" if self.unmerged_ms is not None else "untimed"
            verdict = f"left as it is ({self.reason}); unmerged {unmerged}"
        tried = "; ".join(str(c) for c in self.candidates if c.merges)
        return f"{head}: {verdict}" + (f"  [candidates: {tried}]" if tried else "")

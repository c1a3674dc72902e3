"""What substitute-monarch decides, as plain printable data: each layer's candidates with their
errors and measured latencies (:class:`LayerPlan`), and the pure decision from those numbers
alone (:func:`decide`, :func:`plan`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Candidate", "LayerPlan", "decide", "plan"]


@dataclass(frozen=True)
class Candidate:
    """One substitute of a layer: label, weight parameter count, errors and measured latency.

    ``rel_error``: ``||Y^ - Y|| / ||Y||`` on the calibration rows; ``cosine_distance``:
    ``1 - mean row cosine similarity``. ``latency_ms``: the median on the target, ``None`` when
    not timed (over the error budget).
    """

    label: str
    kind: str  # monarch | block-diagonal | low-rank
    params: int
    rel_error: float
    cosine_distance: float
    latency_ms: float | None = None

    def error(self, metric: str) -> float:
        return self.rel_error if metric == "rel_error" else self.cosine_distance


@dataclass
class LayerPlan:
    """The decision for one layer: its candidates with their numbers, and the one kept (if any).

    ``reason`` says why nothing was kept (empty when ``chosen`` is set).
    """

    layer: str
    op: str  # "Linear", "F.linear", "Conv2d(1x1)"
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]
    dense_params: int
    dense_ms: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if self.chosen is None or not self.dense_ms or not self.chosen.latency_ms:
            return None
        return self.dense_ms / self.chosen.latency_ms

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        head = f"{self.layer} [{self.op} {self.in_features}->{self.out_features}, input {shape}]"
        dense = f"{self.dense_ms:.3f} ms" if self.dense_ms is not None else "not timed"
        if self.chosen is not None:
            c = self.chosen
            verdict = (
                f"kept {c.label}: rel_error {c.rel_error:.3g}, 1-cos {c.cosine_distance:.3g}, "
                f"{dense} -> {c.latency_ms:.3f} ms ({self.speedup:.2f}x), "
                f"params {self.dense_params} -> {c.params}"
            )
        else:
            verdict = f"not kept ({self.reason}); dense {dense}"
        tried = "; ".join(
            f"{c.label} rel_error {c.rel_error:.3g} "
            + (f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "not timed")
            for c in self.candidates
        )
        return f"{head}: {verdict}" + (f"  [tried: {tried}]" if tried else "")


def decide(layer: LayerPlan, *, metric: str, max_error: float, min_speedup: float) -> LayerPlan:
    """Pick the kept candidate of ``layer`` from its numbers alone (pure; returns a copy).

    Kept: the fastest candidate with ``error(metric) <= max_error`` whose latency is measured,
    strictly below the dense layer's, and ``dense / latency >= min_speedup``. A candidate that
    is not measured faster is never kept, whatever ``min_speedup`` says.
    """
    if layer.reason:  # refused before anything was measured (e.g. never reached)
        return dataclasses.replace(layer, chosen=None)
    result = dataclasses.replace(layer, chosen=None, reason="")
    if not layer.candidates:
        result.reason = "no-smaller-candidate"
        return result
    within = [c for c in layer.candidates if c.error(metric) <= max_error]
    if not within:
        result.reason = "over-error-budget"
        return result
    timed = [c for c in within if c.latency_ms is not None]
    if layer.dense_ms is None or not timed:
        result.reason = "not-measured"
        return result
    faster = [
        c
        for c in timed
        if c.latency_ms < layer.dense_ms and layer.dense_ms / c.latency_ms >= min_speedup
    ]
    if not faster:
        result.reason = "not-faster"
        return result
    result.chosen = min(faster, key=lambda c: (c.latency_ms, c.error(metric)))
    return result


def plan(
    layers: Sequence[LayerPlan], *, metric: str, max_error: float, min_speedup: float
) -> list[LayerPlan]:
    """:func:`decide` for every layer (layers are independent: each keeps or not on its own)."""
    return [
        decide(layer, metric=metric, max_error=max_error, min_speedup=min_speedup)
        for layer in layers
    ]

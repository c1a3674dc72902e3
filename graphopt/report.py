"""The report of an ``optimize`` run: per pass what changed, how long it took, how far the
numbers moved; end to end, the error of the artifact and its latency against the baseline.

Printing never fails on what a run left behind: a latency that is missing, NaN, infinite or not
positive prints as ``n/a`` (and gives no speedup), a comparison that cannot describe itself
prints its fields, a TVM task without a status counts as ``unknown``. ``to_json`` writes strict
JSON: non-finite numbers become ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from graphopt.backends.measure import Latency
from graphopt.backends.tvm import TVM_STATUSES
from graphopt.core.numerics import Comparison
from graphopt.pipeline import PassRecord


def op_counts(gm: fx.GraphModule) -> Counter:
    """Operations of a graph by kind: module class names, function and method names."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[type(gm.get_submodule(node.target)).__name__] += 1
        elif node.op == "call_function":
            counts[getattr(node.target, "__name__", str(node.target))] += 1
        elif node.op == "call_method":
            counts["." + node.target] += 1
    return counts


@dataclass
class Report:
    """What ``optimize`` did. ``str(report)`` is the table the CLI prints; ``to_dict`` is JSON."""

    model: str
    target: str
    backend: str
    backend_version: str
    pipeline: str
    capture_method: str
    capture_notes: list[str] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    graph_error: Comparison | None = None  # rewritten graph vs original, in torch
    artifact_error: Comparison | None = None  # backend artifact vs original model
    artifact_diagnosis: str = ""  # where a disagreement of the artifact comes from
    latency_baseline: Latency | None = None  # backend on the unrewritten export
    latency_optimized: Latency | None = None
    baseline_name: str = ""
    threads: int = 0
    # backend="auto": every candidate backend's latency (same run) and why the winner won
    backend_latencies: dict[str, Latency] = field(default_factory=dict)
    backend_choice: str = ""
    ort_settings: dict[str, Any] = field(default_factory=dict)  # chosen by measurement
    ort_settings_latencies: dict[str, Latency] = field(default_factory=dict)
    # TVM: how every fused task was scheduled (tuned/default/naive) and what tuning did
    tvm_tasks: list[dict[str, Any]] = field(default_factory=list)
    tvm_tuning: dict[str, Any] = field(default_factory=dict)
    mobile: str = ""  # a mobile package's description (ORT format, operators)
    warnings: list[str] = field(default_factory=list)
    # what TVM and ONNX Runtime printed during graphopt's calls, one line per kind with the
    # count and the first example (graphopt.backends.quiet), instead of on stderr
    notes: list[str] = field(default_factory=list)

    @property
    def untuned_tasks(self) -> list[str]:
        """TVM tasks running a schedule no measurement chose (default or naive loops)."""
        return [
            str(t.get("name", "?")) for t in self.tvm_tasks if t.get("status", "unknown") != "tuned"
        ]

    @property
    def speedup(self) -> float | None:
        """Baseline / optimized median latency; None unless both are real measurements."""
        base, opt = _median(self.latency_baseline), _median(self.latency_optimized)
        if base is None or opt is None:
            return None
        return base / opt

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.status in ("rolled-back", "failed")]

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "model",
                "target",
                "backend",
                "backend_version",
                "pipeline",
                "capture_method",
                "capture_notes",
                "artifact_diagnosis",
                "ops_before",
                "ops_after",
                "baseline_name",
                "threads",
                "backend_choice",
                "ort_settings",
                "tvm_tasks",
                "tvm_tuning",
                "mobile",
                "warnings",
                "notes",
            )
        }
        for key in ("backend_latencies", "ort_settings_latencies"):
            d[key] = {k: _asdict(v) for k, v in getattr(self, key).items()}
        d["untuned_tasks"] = self.untuned_tasks
        d["records"] = [r.to_dict() for r in self.records]
        for key in ("graph_error", "artifact_error", "latency_baseline", "latency_optimized"):
            d[key] = _asdict(getattr(self, key))
        d["speedup"] = self.speedup
        return d

    def to_json(self) -> str:
        """Strict JSON (NaN and infinities as ``null``; other objects as their ``str``)."""
        return json.dumps(_strict(self.to_dict()), indent=2, default=str, allow_nan=False)

    def __str__(self) -> str:
        lines = [
            f"graphopt report: {self.model} -> {self.target} "
            f"({self.backend} {self.backend_version})",
            f"captured with {self.capture_method}",
        ]
        lines += [f"  note: {n}" for n in self.capture_notes]
        lines.append(f"pipeline: {self.pipeline}")
        lines.append("")
        lines += self._pass_table()
        lines.append("")
        lines.append("operations: " + _ops_line(self.ops_before, self.ops_after))
        lines += self._errors_lines() + self._latency_lines() + self._tvm_lines()
        if self.mobile:
            lines.append(self.mobile)
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _pass_table(self) -> list[str]:
        header = (
            f" {'#':>2}  {'pass':<26} {'status':<11} {'changed':<7} {'time':>9}  "
            f"{'error vs before the pass':<52} stats"
        )
        lines = [header, "-" * len(header)]
        for r in self.records:
            err = (
                _describe(r.comparison)
                if r.comparison
                else ("not checked (no sample inputs)" if r.status == "unverified" else "-")
            )
            stats = " ".join(f"{k}={v}" for k, v in sorted((r.stats or {}).items(), key=str))
            lines.append(
                f" {r.position + 1:>2}  {r.spec:<26} {r.status:<11} "
                f"{'yes' if r.modified else 'no':<7} {_time_ms(r.time_s):>9}  "
                f"{err:<52} {stats}"
            )
            lines += [f"      {d}" for d in r.decisions]
            if r.message and r.status != "ok":
                lines.append(f"      {r.message}")
            if r.reproducer:
                lines.append(f"      reproducer: {r.reproducer}/repro.py")
        return lines

    def _errors_lines(self) -> list[str]:
        lines = []
        if self.graph_error:
            lines.append(f"end to end, rewritten graph vs original:  {_describe(self.graph_error)}")
        if self.artifact_error:
            lines.append(
                f"end to end, {self.backend} artifact vs original model: "
                f"{_describe(self.artifact_error)}"
            )
        if self.artifact_diagnosis:
            lines.append(f"  {self.artifact_diagnosis}")
        return lines

    def _latency_lines(self) -> list[str]:
        lines = []
        if self.latency_baseline is not None and self.latency_optimized is not None:
            speedup = self.speedup
            lines.append(
                f"latency (median [p10-p90], {self.threads} threads, same run): "
                f"{self.baseline_name} {_ms_spread(self.latency_baseline)} -> "
                f"graphopt {_ms_spread(self.latency_optimized)} "
                + (
                    f"({speedup:.2f}x)"
                    if speedup is not None
                    else "(no speedup: a latency is not a valid measurement)"
                )
            )
        elif self.latency_optimized is not None:
            lines.append(f"latency (median): graphopt {_ms(self.latency_optimized)}")
        if self.backend_latencies:
            lines.append(
                "backends measured (median, same run): "
                + ", ".join(f"{k} {_ms(v)}" for k, v in self.backend_latencies.items())
                + (f" -> {self.backend_choice}" if self.backend_choice else "")
            )
        if self.ort_settings_latencies:
            best = (self.ort_settings or {}).get("label", "")
            lines.append(
                "ONNX Runtime session settings (median, same run): "
                + ", ".join(
                    f"{'*' if k == best else ''}{k} {_ms(v)}"
                    for k, v in self.ort_settings_latencies.items()
                )
            )
        return lines

    def _tvm_lines(self) -> list[str]:
        lines = []
        if self.tvm_tuning:
            lines.append(f"TVM tuning: {self.tvm_tuning.get('summary', '')}")
        if self.tvm_tasks:
            statuses = [t.get("status", "unknown") for t in self.tvm_tasks]
            counts = {s: statuses.count(s) for s in (*TVM_STATUSES, *sorted(set(statuses)))}
            lines.append(
                f"TVM tasks: {len(self.tvm_tasks)} ("
                + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in TVM_STATUSES)
                + ")"
            )
            untuned = self.untuned_tasks
            if untuned:
                lines.append(
                    f"  UNTUNED ({len(untuned)}; default schedules, not measured): "
                    + ", ".join(untuned)
                )
        return lines


def _median(latency: Any) -> float | None:
    """A latency's median in ms when it is a real measurement (finite, > 0), else None."""
    value = getattr(latency, "median_ms", None)
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _ms(latency: Any) -> str:
    value = _median(latency)
    if value is not None:
        return f"{value:.3f} ms"
    raw = getattr(latency, "median_ms", None)
    return "n/a" if raw is None else f"n/a (measured {raw} ms)"


def _ms_spread(latency: Any) -> str:
    """``20.943 ms [20.1-22.5]``: the median and the p10-p90 range of the timed runs (a wide
    range says the machine was busy, and the ratio is less certain)."""
    text = _ms(latency)
    low, high = getattr(latency, "p10_ms", None), getattr(latency, "p90_ms", None)
    finite = all(isinstance(v, float | int) and math.isfinite(v) for v in (low, high))
    return f"{text} [{low:.3g}-{high:.3g}]" if finite and text.endswith(" ms") else text


def _time_ms(seconds: Any) -> str:
    if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
        return f"{seconds * 1e3:7.1f}ms"
    return "n/a"


def _describe(comparison: Any) -> str:
    """``comparison.describe()``, or its fields when a value it formats is missing or odd."""
    try:
        return comparison.describe()
    except (TypeError, ValueError, AttributeError, KeyError):
        fields = ("metric", "measured", "allowed", "output", "ok")
        shown = ", ".join(f"{f}={getattr(comparison, f, None)!r}" for f in fields)
        return f"{type(comparison).__name__}({shown})"


def _asdict(value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _strict(value: Any) -> Any:
    """``value`` made JSON-safe: NaN and infinite floats None, numpy scalars Python numbers,
    dict keys JSON can write (others as their ``str``)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy/torch scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            (k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _strict(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _ops_line(before: dict[str, int], after: dict[str, int]) -> str:
    keys = [
        k
        for k in sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
        if before.get(k, 0) != after.get(k, 0)
    ]
    total_b, total_a = sum(before.values()), sum(after.values())
    changed = ", ".join(f"{k} {before.get(k, 0)}->{after.get(k, 0)}" for k in keys[:8])
    return f"{total_b} -> {total_a}" + (f" ({changed})" if changed else " (unchanged)")

"""The report of an ``optimize`` run: per pass what changed, how long it took, how far the
numbers moved; end to end, the error of the artifact and its latency against the baseline.

``str(report)`` is the text the CLI prints (:mod:`graphopt.report.text`: a summary, then the
details with per-layer decisions folded); ``to_dict``/``to_json`` the structured fields, every
decision included. ``to_json`` writes strict JSON: non-finite numbers become ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

from graphopt.backends.measure import Latency
from graphopt.core.numerics import Comparison
from graphopt.errors import InputError
from graphopt.pipeline import PassRecord
from graphopt.report import html
from graphopt.report.text import advice, changes, median_ms, render


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
    # the model after each pass that changed it, timed in the same run (where it came from)
    pass_latencies: dict[str, Latency] = field(default_factory=dict)
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
    # int8: Int8Report.to_dict() (the metric in fp32 and int8, per-layer precision, ...)
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def untuned_tasks(self) -> list[str]:
        """TVM tasks running a schedule no measurement chose (default or naive loops)."""
        return [
            str(t.get("name", "?")) for t in self.tvm_tasks if t.get("status", "unknown") != "tuned"
        ]

    @property
    def speedup(self) -> float | None:
        """Baseline / optimized median latency; None unless both are real measurements."""
        base, opt = median_ms(self.latency_baseline), median_ms(self.latency_optimized)
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
                "quantization",
            )
        }
        d["summary"] = {"changed": changes(self), "speedup": self.speedup, "advice": advice(self)}
        for key in ("backend_latencies", "ort_settings_latencies", "pass_latencies"):
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

    def save(self, path: str | Path) -> Path:
        """Write the report: ``.html`` a self-contained page with tables and plots
        (:mod:`graphopt.report.html`), ``.json`` :meth:`to_json`. Returns the path."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm", ".json"):
            raise InputError(f"cannot save a report as {path.name}: give a .html or .json file.")
        data = self.to_json() if path.suffix.lower() == ".json" else html.render(self.to_dict())
        try:
            path.write_text(data, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write the report to {path}: {exc.strerror}.") from exc
        return path

    def __str__(self) -> str:
        return render(self)


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

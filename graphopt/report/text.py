"""The text of a report, as the CLI prints it: a summary a person reads first, then details.

The summary says what changed, how far the artifact is from the model, int8's metric in fp32
and int8, the latency against the baseline with its p10-p90 range, what was rolled back, and,
when nothing was gained, why and what to try. The details give one line per pass; a pass's
decisions (hundreds for int8 on a ResNet-50) are folded: a group of more than ``SHOWN`` of one
kind is one line of counts and the worst few, with the JSON path that holds all of them.

Printing never fails on what a run left behind: a latency that is missing, NaN, infinite or not
positive prints as ``n/a`` (and gives no speedup), a comparison that cannot describe itself
prints its fields, a TVM task without a status counts as ``unknown``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from graphopt.backends.tvm import TVM_STATUSES
from graphopt.quant.ort_policy import count_layers

if TYPE_CHECKING:
    from graphopt.report import Report

__all__ = ["advice", "changes", "describe", "median_ms", "ms", "render"]

SHOWN = 3  # decisions of one kind listed in full; more are folded into counts and the worst
GAIN = 1.05  # below this speedup, the summary says why nothing was gained and what to try


def render(report: Report) -> str:
    """The whole text: the summary, then the details."""
    return "\n".join([*summary_lines(report), "", *detail_lines(report)])


def summary_lines(report: Report) -> list[str]:
    lines = [
        f"graphopt report: {report.model} -> {report.target} "
        f"({report.backend} {report.backend_version})"
    ]
    changed = changes(report)
    lines.append(
        "  changed:     "
        + ("; ".join(f"{c['pass']} {_stats(c['stats'])}".strip() for c in changed) or "nothing")
    )
    lines.append("  operations:  " + _ops_line(report.ops_before, report.ops_after))
    if report.artifact_error:
        lines.append(
            f"  error:       {report.backend} artifact vs original model: "
            f"{describe(report.artifact_error)}"
        )
    elif report.graph_error:
        lines.append(f"  error:       rewritten graph vs original: {describe(report.graph_error)}")
    if report.quantization:
        lines.append("  int8:        " + int8_line(report.quantization))
    lines += ["  latency:     " + line for line in _latency_summary(report)]
    for r in report.rolled_back:
        lines.append(f"  {r.status}: {r.spec}: {_first_line(r.message)}")
        if r.reproducer:
            lines.append(f"    reproducer: {r.reproducer}/repro.py")
    lines += [f"  {line}" for line in advice(report)]
    lines += [f"  WARNING: {w}" for w in report.warnings]
    return lines


def detail_lines(report: Report) -> list[str]:
    lines = [
        "details (every decision is in the JSON report: --json FILE, report.to_json())",
        f"captured with {report.capture_method}",
    ]
    lines += [f"  note: {n}" for n in report.capture_notes]
    lines.append(f"pipeline: {report.pipeline}")
    lines += _pass_table(report)
    if report.graph_error and report.artifact_error:
        lines.append(f"rewritten graph vs original: {describe(report.graph_error)}")
    if report.artifact_diagnosis:
        lines.append(report.artifact_diagnosis)
    lines += _measured_lines(report) + _tvm_lines(report)
    if report.mobile:
        lines.append(report.mobile)
    lines += [f"note: {n}" for n in report.notes]
    return lines


def changes(report: Report) -> list[dict[str, Any]]:
    """The passes that changed the model, with their statistics."""
    return [
        {"pass": r.spec, "stats": dict(r.stats or {})}
        for r in report.records
        if r.modified and r.status in ("ok", "unverified")
    ]


def advice(report: Report) -> list[str]:
    """Why nothing was gained and what to try, when the speedup is below ``GAIN``."""
    speedup = report.speedup
    if speedup is None or speedup >= GAIN:
        return []
    names = {r.name for r in report.records}
    done = {r.name for r in report.records if r.modified}
    why = []
    if "reparameterize" in names and "reparameterize" not in done:
        why.append("this model has nothing to re-parameterize (no parallel branches)")
    if "fold-conv-bn" in done:
        why.append(f"folding BatchNorm gains nothing over {report.baseline_name}, which folds too")
    convs = any("Conv" in k for k in report.ops_before)
    # a transformer's worth of dense layers, not a classifier head
    linears = sum(n for k, n in report.ops_before.items() if k in ("Linear", "linear")) >= 4
    tries = []
    if not report.quantization:
        tries.append("--int8 --calibration data.npz (integer kernels; the metric drop is measured)")
    if convs and "merge-convs" not in names:
        tries.append("--pipeline '<target's>,merge-convs{budget=0.7}' (lossy, with --calibration)")
    if linears and "substitute-monarch" not in names:
        tries.append("substitute-monarch (lossy: Monarch factors for large Linear layers)")
    if report.backend != "tvm":
        tries.append("--backend tvm --tune-minutes 10 (schedules tuned for this CPU)")
    head = f"nothing to gain ({speedup:.2f}x)" + (": " + "; ".join(why) if why else "")
    return [head] + ([f"try: {t}" for t in tries[:3]])


def int8_line(q: dict[str, Any]) -> str:
    """int8's one line: layers, calibration, the metric in fp32 and int8 and the drop."""
    try:
        budget = f", allowed {q['max_drop']:g}" if q.get("max_drop") is not None else ""
        count, weighted = count_layers(q["layers"])
        return (
            f"{count} ({weighted}{q['method']} calibration, "
            f"{q['calibration_batches']} batches); {q['metric']}: fp32 {q['fp32']:.4g} -> int8 "
            f"{q['int8']:.4g} (drop {q['drop']:.4g}{budget})"
        )
    except (KeyError, TypeError, ValueError):
        return str(q)


def _latency_summary(report: Report) -> list[str]:
    base, opt = report.latency_baseline, report.latency_optimized
    if base is not None and opt is not None:
        speedup = report.speedup
        return [
            f"{report.baseline_name} {_ms_spread(base)} -> graphopt {_ms_spread(opt)} "
            + (
                f"({speedup:.2f}x"
                if speedup is not None
                else "(no speedup: a latency is not a valid measurement"
            )
            + f"; median [p10-p90], {report.threads} threads, same run)"
        ]
    if opt is not None:
        return [f"graphopt {_ms_spread(opt)} (median [p10-p90])"]
    return []


def _pass_table(report: Report) -> list[str]:
    header = (
        f" {'#':>2}  {'pass':<26} {'status':<11} {'changed':<7} {'time':>9}  "
        f"{'error vs before the pass':<52} stats"
    )
    lines = [header, "-" * len(header)]
    for i, r in enumerate(report.records):
        err = (
            describe(r.comparison)
            if r.comparison
            else ("not checked (no sample inputs)" if r.status == "unverified" else "-")
        )
        lines.append(
            f" {r.position + 1:>2}  {r.spec:<26} {r.status:<11} "
            f"{'yes' if r.modified else 'no':<7} {_time_ms(r.time_s):>9}  "
            f"{err:<52} {_stats(r.stats)}".rstrip()
        )
        lines += [f"      {d}" for d in fold(r.decisions, f"records[{i}].decisions")]
        if r.message and r.status != "ok":
            lines.append(f"      {r.message}")
        if r.reproducer:
            lines.append(f"      reproducer: {r.reproducer}/repro.py")
    return lines


def fold(decisions: list[Any], path: str) -> list[str]:
    """Decision lines, a kind of more than ``SHOWN`` folded into one line of counts and its
    worst few (by the decision's ``severity``, where it has one)."""
    groups: dict[str, list[Any]] = {}
    for d in decisions:
        groups.setdefault(type(d).__name__, []).append(d)
    lines = []
    for kind, items in groups.items():
        if len(items) <= SHOWN:
            lines += [str(d) for d in items]
            continue
        outcomes = Counter(str(getattr(d, "outcome", "")) for d in items)
        counts = ", ".join(f"{n} {o}" for o, n in outcomes.most_common() if o)
        severity = [float(getattr(d, "severity", 0.0)) for d in items]
        ranked = len(set(severity)) > 1  # else "worst" would be an arbitrary pick
        worst = sorted(items, key=lambda d: -float(getattr(d, "severity", 0.0)))[:SHOWN]
        lines.append(
            f"{len(items)} {kind}{': ' + counts if counts else ''} (all in the JSON at {path}); "
            f"{'worst' if ranked else 'first'} {len(worst)}:"
        )
        lines += [f"  {d}" for d in worst]
    return lines


def _measured_lines(report: Report) -> list[str]:
    lines = []
    if report.pass_latencies:
        lines.append(
            "latency after each pass (median [p10-p90], same run): "
            + ", ".join(f"{k} {_ms_spread(v)}" for k, v in report.pass_latencies.items())
        )
    if report.backend_latencies:
        lines.append(
            "backends measured (median, same run): "
            + ", ".join(f"{k} {ms(v)}" for k, v in report.backend_latencies.items())
            + (f" -> {report.backend_choice}" if report.backend_choice else "")
        )
    if report.ort_settings_latencies:
        best = (report.ort_settings or {}).get("label", "")
        lines.append(
            "ONNX Runtime session settings (median, same run): "
            + ", ".join(
                f"{'*' if k == best else ''}{k} {ms(v)}"
                for k, v in report.ort_settings_latencies.items()
            )
        )
    return lines


def _tvm_lines(report: Report) -> list[str]:
    lines = []
    if report.tvm_tuning:
        lines.append(f"TVM tuning: {report.tvm_tuning.get('summary', '')}")
    if report.tvm_tasks:
        statuses = [t.get("status", "unknown") for t in report.tvm_tasks]
        counts = {s: statuses.count(s) for s in (*TVM_STATUSES, *sorted(set(statuses)))}
        lines.append(
            f"TVM tasks: {len(report.tvm_tasks)} ("
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in TVM_STATUSES)
            + ")"
        )
        untuned = report.untuned_tasks
        if untuned:
            lines.append(
                f"  UNTUNED ({len(untuned)}; default schedules, not measured): "
                + ", ".join(untuned)
            )
    return lines


def median_ms(latency: Any) -> float | None:
    """A latency's median in ms when it is a real measurement (finite, > 0), else None."""
    value = getattr(latency, "median_ms", None)
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def ms(latency: Any) -> str:
    value = median_ms(latency)
    if value is not None:
        return f"{value:.3f} ms"
    raw = getattr(latency, "median_ms", None)
    return "n/a" if raw is None else f"n/a (measured {raw} ms)"


def _ms_spread(latency: Any) -> str:
    """``20.943 ms [20.1-22.5]``: the median and the p10-p90 range of the timed runs (a wide
    range says the machine was busy, and the ratio is less certain)."""
    text = ms(latency)
    low, high = getattr(latency, "p10_ms", None), getattr(latency, "p90_ms", None)
    finite = all(isinstance(v, float | int) and math.isfinite(v) for v in (low, high))
    return f"{text} [{low:.3g}-{high:.3g}]" if finite and text.endswith(" ms") else text


def _time_ms(seconds: Any) -> str:
    if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
        return f"{seconds * 1e3:7.1f}ms"
    return "n/a"


def describe(comparison: Any) -> str:
    """``comparison.describe()``, or its fields when a value it formats is missing or odd."""
    try:
        return comparison.describe()
    except (TypeError, ValueError, AttributeError, KeyError):
        fields = ("metric", "measured", "allowed", "output", "ok")
        shown = ", ".join(f"{f}={getattr(comparison, f, None)!r}" for f in fields)
        return f"{type(comparison).__name__}({shown})"


def _stats(stats: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted((stats or {}).items(), key=str))


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _ops_line(before: dict[str, int], after: dict[str, int]) -> str:
    keys = [
        k
        for k in sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
        if before.get(k, 0) != after.get(k, 0)
    ]
    total_b, total_a = sum(before.values()), sum(after.values())
    changed = ", ".join(f"{k} {before.get(k, 0)}->{after.get(k, 0)}" for k in keys[:8])
    return f"{total_b} -> {total_a}" + (f" ({changed})" if changed else " (unchanged)")

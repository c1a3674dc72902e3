"""What ``graphopt bench`` writes: the Markdown table of medians and ratios, and files written
whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphopt.bench.machine import BUSY
from graphopt.bench.runners import COMPILE, EAGER, GRAPHOPT, ORT, RUNNERS, TITLES

#: a ratio whose p10-p90 range (slow runner's p10 / fast runner's p90 to p90 / p10) spans more
#: than this factor is marked noisy: the machine was too busy for that figure to mean much
NOISY = 2.0

#: a runner whose output differs from eager's by more than this (relative) is flagged
MISMATCH = 1e-3


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (a reader never sees half of it),
    creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(x: float) -> str:
    """A latency at 3 significant digits, without exponent notation."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def markdown_table(
    results: Sequence[dict[str, Any]], *, machine: dict[str, Any] | None = None
) -> str:
    """Median latency per runner and model, with the ratios that matter, as Markdown.

    A runner whose output differs from eager's by more than 1e-3 (relative) is marked with
    ``!``; skipped runners and failures are listed under the table.
    """
    columns = [r for r in RUNNERS if any(r in res["runners"] for res in results)]
    header = (
        ["model"]
        + [f"{TITLES[r]} ms" for r in columns]
        + ["graphopt vs eager", "graphopt vs ORT", "torch.compile vs eager"]
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    notes: list[str] = []
    for res in results:
        lines.append("| " + " | ".join(_row(res, columns, notes)) + " |")
        for r, reason in res.get("skipped", {}).items():
            if not reason.startswith("disabled"):
                notes.append(f"{res['model']}, {r}: {reason}")
    notes += _notes(results)
    text = _intro(machine) + "\n\n" + "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def _row(res: dict[str, Any], columns: list[str], notes: list[str]) -> list[str]:
    """One model's cells; a runner whose output differs from eager's adds a note."""
    cells = [res["model"]]
    for r in columns:
        entry = res["runners"].get(r)
        if entry is None:
            cells.append("–")
            continue
        cell = _ms(entry["median_ms"])
        if entry.get("rel_error", 0.0) > MISMATCH:
            cell += " !"
            notes.append(
                f"{res['model']}, {r}: output differs from eager by "
                f"{entry['rel_error']:.2g} (relative to max |eager output|)"
            )
        cells.append(cell)
    ratios, runners = res["ratios"], res["runners"]
    return cells + [
        _ratio(ratios.get("graphopt vs eager")) + _noisy(runners, EAGER, GRAPHOPT),
        _ratio(ratios.get("graphopt vs onnxruntime")) + _noisy(runners, ORT, GRAPHOPT),
        _ratio(ratios.get("torch.compile vs eager")) + _noisy(runners, EAGER, COMPILE),
    ]


def ratio_range(runners: dict[str, Any], slow: str, fast: str) -> tuple[float, float] | None:
    """The range a speedup ``slow / fast`` spans over the runners' p10-p90 latencies."""
    a, b = runners.get(slow), runners.get(fast)
    try:
        low, high = a["p10_ms"] / b["p90_ms"], a["p90_ms"] / b["p10_ms"]
    except (TypeError, KeyError, ZeroDivisionError):
        return None
    return (low, high) if 0 < low <= high < float("inf") else None


def _noisy(runners: dict[str, Any], slow: str, fast: str) -> str:
    """`` (noisy: 12x-9000x)`` where the ratio's p10-p90 range is wider than ``NOISY``."""
    span = ratio_range(runners, slow, fast)
    if span is None or span[1] / span[0] <= NOISY:
        return ""
    return f" (noisy: {_ratio(span[0])}-{_ratio(span[1])})"


def _intro(machine: dict[str, Any] | None) -> str:
    intro = (
        "Batch 1, median of interleaved runs (all runners of a model timed in alternation "
        "in one process); ratios are speedups (>1 = faster)."
    )
    if machine:
        intro += (
            f" {machine.get('cpu')}, {machine.get('cores')} cores; torch "
            f"{machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}"
            + (f", openvino {machine['openvino']}" if machine.get("openvino") else "")
            + f"; {machine.get('date')}."
        )
    return intro


def _notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """The notes on all models: graphs graphopt left as exported, a busy machine."""
    notes = []
    same = [res["model"] for res in results if res.get("graphopt_changed_graph") is False]
    if same:
        notes.append(
            f"{', '.join(same)}: graphopt's ONNX graph has the same operators as the "
            "plain export (torch.onnx.export already folds BatchNorm into convolutions "
            'in eval mode), so "graphopt vs ORT" there measures noise'
        )
    busy = [res for res in results if (res.get("other_cpu_while_timing") or 0.0) > BUSY]
    if busy:
        worst = max(res["other_cpu_while_timing"] for res in busy)
        notes.append(
            f"other processes used up to {worst:.1f} cores while timing "
            f"{', '.join(r['model'] for r in busy)}: absolute latencies are noisy; "
            "the ratios, timed interleaved, less so"
        )
    if any(" (noisy: " in line for line in _all_ratio_cells(results)):
        notes.append(
            "a ratio marked noisy spans that range over the two runners' p10-p90 latencies: "
            "the machine was too busy for it; rerun with --wait-idle-s on an idle machine"
        )
    return notes


def _all_ratio_cells(results: Sequence[dict[str, Any]]) -> list[str]:
    pairs = ((EAGER, GRAPHOPT), (ORT, GRAPHOPT), (EAGER, COMPILE))
    return [_noisy(res["runners"], a, b) for res in results for a, b in pairs]

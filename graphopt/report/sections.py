"""The plots of the HTML report, each from the report's JSON fields (``Report.to_dict()``).

Each function returns ``""`` when its data is absent, so a plot appears only when there is
something to draw:

- :func:`latency_plots`: the baseline against graphopt, the candidate backends (``backend="auto"``)
  and the ONNX Runtime session settings tried, medians with p10-p90 whiskers;
- :func:`ops_plot`: the operations by kind whose count changed, before and after;
- :func:`pass_time_plot`: how long each pass ran;
- :func:`int8_plots`: per layer, the metric drop with only that layer in float (the
  sensitivity the ``max_drop`` search measured) and the bias shift of bias correction;
- :func:`merge_convs_plot`: merge-convs' spans, the merged conv against its convs one at a time
  (measured latencies; depth mode: convs timed alone, planned, the budget and the whole model);
- :func:`monarch_plot`: substitute-monarch's candidates per layer, error against speed-up.
"""

from __future__ import annotations

import re
from typing import Any

from graphopt.report.svg import Bar, Point, bar_chart, fmt, number, scatter

ROWS = 30  # layers in one per-layer plot; the table below it lists all

__all__ = [
    "int8_plots",
    "latency_plots",
    "merge_convs_plot",
    "monarch_plot",
    "ops_plot",
    "pass_time_plot",
    "span_label",
]


def _latency_bar(series: str, latency: Any) -> Bar:
    lat = latency if isinstance(latency, dict) else {}
    median, low, high = (number(lat.get(k)) for k in ("median_ms", "p10_ms", "p90_ms"))
    if median is not None and median <= 0:
        median = None  # not a measurement
    tip = (
        f"{series}: median {fmt(median)} ms, p10 {fmt(low)}, p90 {fmt(high)}, "
        f"{lat.get('runs', '?')} runs"
    )
    return Bar(series, median, low, high, tip)


def latency_plots(data: dict[str, Any]) -> str:
    """End to end (baseline vs graphopt), then the backends and ORT settings measured."""
    out = []
    base, opt = data.get("latency_baseline"), data.get("latency_optimized")
    if base or opt:
        groups = []
        if base:
            groups.append(("before (" + str(data.get("baseline_name") or "baseline") + ")",
                           [_latency_bar("before", base)]))  # fmt: skip
        for name, lat in (data.get("pass_latencies") or {}).items():  # after each pass
            groups.append((str(name), [_latency_bar("after a pass", lat)]))
        if opt:
            groups.append(("after (graphopt)", [_latency_bar("after", opt)]))
        speedup = number(data.get("speedup"))
        out.append(
            bar_chart(
                "latency",
                "Latency of one call, before graphopt, after each pass, and after graphopt",
                groups,
                axis="latency per call (ms): median, whiskers p10-p90",
                caption=(
                    f"Measured in the same run, {data.get('threads') or '?'} threads; "
                    + (f"speedup {speedup:.2f}x." if speedup else "no speedup: a latency is n/a.")
                ),
            )
        )
    for key, plot_id, title in (
        ("backend_latencies", "backends", "Latency of each candidate backend (auto)"),
        ("ort_settings_latencies", "ort-settings", "Latency of each ONNX Runtime setting tried"),
    ):
        measured = data.get(key) or {}
        if measured:
            choice = str(data.get("backend_choice") or "") if key == "backend_latencies" else ""
            # backend_choice names the winner first: "openvino latency threads=1: the lowest..."
            chosen = max((n for n in measured if choice.startswith(str(n))), key=len, default=None)
            chosen = chosen or (data.get("ort_settings") or {}).get("label")
            groups = [
                (str(name) + (" (chosen)" if name == chosen else ""),
                 [_latency_bar("chosen" if name == chosen else "tried", lat)])
                for name, lat in measured.items()
            ]  # fmt: skip
            axis = "latency per call (ms): median, whiskers p10-p90"
            out.append(bar_chart(plot_id, title, groups, axis=axis))
    return "".join(out)


def ops_plot(before: dict[str, Any], after: dict[str, Any], shown: int = 12) -> str:
    """The kinds of operation whose count changed, before and after (the largest first)."""
    kinds = [k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0)]
    kinds = sorted(kinds, key=lambda k: -max(number(before.get(k)) or 0, number(after.get(k)) or 0))
    if not kinds:
        return ""
    groups = [
        (str(k), [Bar("before", number(before.get(k, 0))), Bar("after", number(after.get(k, 0)))])
        for k in kinds[:shown]
    ]
    more = f" {len(kinds) - shown} more kinds changed (in the JSON)." * (len(kinds) > shown)
    return bar_chart(
        "ops",
        "Operations by kind, before and after (the kinds that changed)",
        groups,
        axis="operations in the graph (count)",
        caption=f"{sum(before.values())} operations before, {sum(after.values())} after." + more,
    )


def pass_time_plot(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    groups = [
        (f"{r.get('position', i) + 1 if isinstance(r.get('position'), int) else i + 1}. "
         f"{r.get('name', '?')}",
         [Bar(str(r.get("status", "?")), _ms(r.get("time_s")),
              tip=f"{r.get('spec', '')}: {fmt(_ms(r.get('time_s')))} ms, {r.get('status')}")])
        for i, r in enumerate(records)
    ]  # fmt: skip
    return bar_chart(
        "pass-time",
        "Time each pass took (its run and its check)",
        groups,
        axis="time (ms)",
        caption="Colour: the pass's status.",
    )


def _ms(seconds: Any) -> float | None:
    s = number(seconds)
    return None if s is None or s < 0 else s * 1e3


def int8_plots(q: dict[str, Any]) -> str:
    """Sensitivity (when the ``max_drop`` search measured it) and bias shifts per layer."""
    out = []
    sens = [s for s in q.get("sensitivity") or [] if isinstance(s, dict)]
    if sens:
        every = number(q.get("drop_all_int8"))
        groups = [
            (str(s.get("layer") or s.get("node", "?")),
             [Bar("drop", number(s.get("drop_without")),
                  tip=f"{s.get('op_type', '')} {s.get('layer') or s.get('node')}: drop "
                      f"{fmt(s.get('drop_without'))} with only this layer in float")])
            for s in sorted(sens, key=lambda s: number(s.get("drop_without")) or 0.0)[:ROWS]
        ]  # fmt: skip
        out.append(
            bar_chart(
                "int8-sensitivity",
                "int8 sensitivity: metric drop with only this layer kept in float",
                groups,
                axis=f"drop of {q.get('metric', 'the metric')} against fp32 (metric units)",
                caption=(
                    f"Every layer int8: drop {fmt(every)}; allowed {fmt(q.get('max_drop'))}. "
                    "The shortest bars are the most sensitive layers (float helps most)."
                    + _cut(len(sens), "most sensitive")
                ),
            )
        )
    every = [b for b in q.get("bias_correction") or [] if isinstance(b, dict)]
    if every:
        largest = sorted(every, key=lambda b: -(number(b.get("max_abs_shift")) or 0.0))[:ROWS]
        bias = [b for b in every if any(b is x for x in largest)]  # in the model's order
        groups = [
            (str(b.get("layer") or b.get("node", "?")),
             [Bar("mean |shift|", number(b.get("mean_abs_shift"))),
              Bar("max |shift|", number(b.get("max_abs_shift")))])
            for b in bias
        ]  # fmt: skip
        out.append(
            bar_chart(
                "int8-bias",
                "int8 bias correction: shift of each layer's bias",
                groups,
                axis="|bias shift| (units of the layer's output)",
                caption="The expected output error int8 added, removed from the bias."
                + _cut(len(every), "largest"),
            )
        )
    return "".join(out)


def _cut(total: int, which: str) -> str:
    """A caption's note when a per-layer plot shows only ``ROWS`` of ``total`` layers."""
    if total <= ROWS:
        return ""
    return f" Shown: the {ROWS} {which} of {total} layers; every layer is in the table below."


def span_label(convs: list[Any], c: dict[str, Any]) -> str:
    """``conv_a..conv_b +residual then add``: the convs of span ``(i, j]`` by name."""
    i, j = int(c.get("i", 0)), int(c.get("j", 0))
    names = [str(n) for n in convs] or [str(k + 1) for k in range(j)]
    if 0 <= i < j <= len(names):
        base = names[i] if j - i == 1 else f"{names[i]}..{names[j - 1]}"
    else:
        base = f"convs {i + 1}..{j}"
    return (
        base
        + " +residual" * int(c.get("folded") or 0)
        + (" then add" if c.get("keeps_add") else "")
    )


def _merges(c: dict[str, Any]) -> bool:
    return int(c.get("j", 0)) - int(c.get("i", 0)) > 1 or bool(c.get("folded"))


def _span_bars(plan: dict[str, Any]) -> list[tuple[str, list[Bar]]]:
    """Merged spans of one stretch against their convs one at a time; for a stretch left as it
    is, the fastest merge it tried (marked not kept)."""
    cands = [c for c in plan.get("candidates") or [] if isinstance(c, dict)]
    single = {
        int(c["j"]): number(c.get("latency_ms"))
        for c in cands
        if int(c.get("j", 0)) - int(c.get("i", 0)) == 1 and not c.get("folded")
        and not c.get("keeps_add")
    }  # fmt: skip
    chosen = [c for c in plan.get("chosen") or [] if isinstance(c, dict) and _merges(c)]
    kept = True
    if not chosen:
        timed = [c for c in cands if _merges(c) and number(c.get("latency_ms")) is not None]
        chosen, kept = sorted(timed, key=lambda c: number(c.get("latency_ms")) or 0.0)[:1], False
    groups = []
    for c in chosen:
        parts = [single.get(k) for k in range(int(c["i"]) + 1, int(c["j"]) + 1)]
        alone = sum(parts) if parts and all(p is not None for p in parts) else None
        label = span_label(plan.get("convs") or [], c) + ("" if kept else " (not kept)")
        groups.append((label, [Bar("one conv at a time", alone),
                               Bar("merged", number(c.get("latency_ms")))]))  # fmt: skip
    return groups


def merge_convs_plot(plans: list[dict[str, Any]]) -> str:
    groups: list[tuple[str, list[Bar]]] = []
    for p in plans:
        if "budget_ms" in p:  # depth mode: one plan for the model
            groups.append(("convs timed alone",
                           [Bar("one conv at a time", number(p.get("unmerged_ms"))),
                            Bar("merged", number(p.get("predicted_ms"))),
                            Bar("budget", number(p.get("budget_ms")))]))  # fmt: skip
            if p.get("measured_before_ms") is not None:
                groups.append(("whole model, measured",
                               [Bar("one conv at a time", number(p.get("measured_before_ms"))),
                                Bar("merged", number(p.get("measured_after_ms")))]))  # fmt: skip
        elif "stretch" in p:
            groups += _span_bars(p)
    if not groups:
        return ""
    return bar_chart(
        "merge-convs",
        "merge-convs: each merged span against its convs one at a time",
        groups,
        axis="latency (ms), measured on the target",
        caption="Each span's convs timed alone and summed, against the one conv that replaces "
        "them. A stretch left as it is shows the fastest merge it tried.",
    )


def monarch_plot(layers: list[dict[str, Any]], spec: str = "") -> str:
    """Each candidate of each layer: its error (the pass's metric) against dense / candidate
    latency; the kept ones filled and labelled; the error budget and 1x as lines."""
    options = dict(re.findall(r"(\w+)=([^,}]+)", spec))
    metric = "cosine_distance" if options.get("metric") == "cosine" else "rel_error"
    max_error = number(_float(options.get("max_error", "0.1")))
    points, untimed = [], 0
    for layer in layers:
        chosen = (layer.get("chosen") or {}).get("label")
        dense = number(layer.get("dense_ms"))
        for c in layer.get("candidates") or []:
            lat = number(c.get("latency_ms"))
            speedup = dense / lat if dense and lat else None
            untimed += speedup is None
            points.append(Point(
                number(c.get(metric)), speedup, str(c.get("kind", "?")),
                tip=f"{layer.get('layer')}: {c.get('label')}, {metric} {fmt(c.get(metric))}, "
                    f"{fmt(dense)} -> {fmt(lat)} ms ({fmt(speedup, 3)}x), params "
                    f"{layer.get('dense_params')} -> {c.get('params')}",
                label=str(layer.get("layer", "")), strong=c.get("label") == chosen,
            ))  # fmt: skip
    if not points:
        return ""
    largest = max([number(p.x) or 0.0 for p in points])
    beyond = max_error is not None and max_error > 1.5 * largest > 0  # would squash the points
    return scatter(
        "monarch",
        "substitute-monarch: per-layer error against speed-up of each candidate",
        points,
        x_axis=f"{metric} of the layer's output on calibration rows (relative, 0 = exact)",
        y_axis="speed-up: dense / candidate latency (x)",
        hlines=((1.0, "as fast as dense"),),
        vlines=((max_error, f"max_error {fmt(max_error)}"),)
        if max_error is not None and not beyond
        else (),
        caption="Filled and labelled: the candidate kept for that layer. Colour: the kind of "
        "substitute."
        + (
            f" {untimed} candidates not timed (over the error budget) are not drawn."
            * (untimed > 0)
        )
        + (f" max_error {fmt(max_error)} lies beyond the largest error drawn." * beyond),
    )


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None

"""The report as one self-contained HTML page: ``report.save("report.html")``, the CLI's
``--report report.html``, or :func:`render` on a dict read back from the JSON report.

The page holds its styles and its plots (inline SVG made in Python, :mod:`graphopt.report.svg`);
it loads nothing (a Content-Security-Policy forbids it) and needs no JavaScript to read: two
lines of script only record, on the ``<html>`` element, any script error (``data-js-errors``)
and that the page was read to its end (``data-rendered``: the plot marks laid out with a size,
of all marks), for tests that render it in a browser. Order: the summary, latency, passes (each
pass's decisions folded in ``<details>``), operations by kind, int8, merge-convs,
substitute-monarch, TVM, notes. Every string from the report is escaped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphopt.core.numerics import Comparison
from graphopt.errors import InputError
from graphopt.quant.ort_policy import count_layers
from graphopt.report.sections import (
    int8_plots,
    latency_plots,
    merge_convs_plot,
    monarch_plot,
    ops_plot,
    pass_time_plot,
    span_label,
)
from graphopt.report.svg import fmt, number, text

__all__ = ["render", "save_from_json"]

SHOWN_ROWS = 200  # rows of one decision table; the rest are in the JSON

CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#1d2330;margin:0 auto;max-width:1000px;
 padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef1f5}
tr:nth-child(even) td{background:#fafbfc}
table.summary{width:100%}
table.summary th{width:110px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.status-ok,.int8{color:#1e7b3c;font-weight:600}
.status-rolled-back,.status-failed,.bad{color:#b3261e;font-weight:600}
.status-unverified,.status-skipped,.float{color:#a86400;font-weight:600}
.warning{background:#fff4e5;border-left:4px solid #e07b28;padding:6px 10px;margin:6px 0}
.advice{background:#eef5ff;border-left:4px solid #2f6fbf;padding:6px 10px;margin:6px 0}
.headline{font-size:16px;margin:4px 0 10px}
.headline b{font-size:24px;color:#2f6fbf}
details{margin:4px 0}
summary{cursor:pointer;color:#2f4f7f}
code{font-size:12px}
figure.plot{margin:12px 0}
figcaption{font-size:12px;color:#555;max-width:820px}
svg text{font:12px system-ui,sans-serif;fill:#1d2330}
svg .plot-title{font-weight:600;font-size:13px}
svg .axis{stroke:#333}
svg .grid{stroke:#e3e6ea}
svg .whisker{stroke:#1d2330;stroke-width:1.4;fill:none}
svg .ref{stroke:#b3261e;stroke-dasharray:5 4}
svg .ref-label{fill:#b3261e}
svg .value,svg .tick{fill:#444}
svg .na{fill:#a86400}
div.wide{overflow-x:auto}
table.decisions{font-size:12px}
"""

# records any script error on <html data-js-errors>, for a browser test to read in the DOM
HEAD_SCRIPT = (
    "window.addEventListener('error',function(e){var h=document.documentElement;"
    "h.setAttribute('data-js-errors',(h.getAttribute('data-js-errors')||'')+e.message+';');});"
)
# "drawn/all" plot marks: drawn ones have a laid-out box (the browser rendered the SVG)
TAIL_SCRIPT = (
    "var m=document.querySelectorAll('svg .mark'),n=0;for(var i=0;i<m.length;i++){"
    "var r=m[i].getBoundingClientRect();if(r.width>0&&r.height>0)n++;}"
    "document.documentElement.setAttribute('data-rendered',n+'/'+m.length);"
)
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def render(data: dict[str, Any]) -> str:
    """The page for a report's ``to_dict()`` (or its JSON read back)."""
    title = (
        f"graphopt report: {data.get('model', '?')} -> {data.get('target', '?')} "
        f"({data.get('backend', '?')} {data.get('backend_version', '')})"
    )
    records = [r for r in data.get("records") or [] if isinstance(r, dict)]
    body = [
        f"<h1>{text(title)}</h1>",
        _summary(data),
        _section("Latency", latency_plots(data)),
        _section("Passes", _passes(data, records) + pass_time_plot(records)),
        _section("Graph", ops_plot(data.get("ops_before") or {}, data.get("ops_after") or {})),
        _section("int8", _int8(data.get("quantization") or {})),
        _section("merge-convs", _merge_convs(records)),
        _section("substitute-monarch", _monarch(records)),
        _section("TVM", _tvm(data)),
        _section("Notes", _notes(data)),
        "<footer><p>Every decision is in the JSON report (<code>--json FILE</code>, "
        "<code>report.to_json()</code>).</p></footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{text(title)}</title><style>{CSS}</style><script>{HEAD_SCRIPT}</script>"
        "</head><body>" + "\n".join(b for b in body if b) + f"<script>{TAIL_SCRIPT}</script>"
        "</body></html>\n"
    )


def save_from_json(json_path: str | Path, html_path: str | Path | None = None) -> Path:
    """The page of a JSON report (``--json FILE``, ``report.save("r.json")``), written to
    ``html_path`` (default: beside it, ``.html``). Returns the page's path."""
    source = Path(json_path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}.") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{source} is not JSON ({exc}); give a report written by --json.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise InputError(f"{source} is not a graphopt report (no records); write one with --json.")
    target = Path(html_path) if html_path is not None else source.with_suffix(".html")
    if target.resolve() == source.resolve():
        raise InputError(f"{target} is the JSON report itself; give the page another name.")
    try:
        target.write_text(render(data), encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the page to {target}: {exc.strerror}.") from exc
    return target


def _section(title: str, content: str) -> str:
    if not content:
        return ""
    slug = title.lower().replace(" ", "-")
    return f'<section id="section-{text(slug)}"><h2>{text(title)}</h2>{content}</section>'


def _table(table_id: str, header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table (no header row when ``header`` is empty); ``rows`` hold HTML already escaped."""
    head = "".join(f"<th>{text(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<table id="{text(table_id)}"{cls_attr}>{head}<tbody>{body}</tbody></table>'


def _td(value: Any, cls: str = "") -> str:
    """A cell of escaped text that may break after a comma and before a brace (a pipeline
    spec has no spaces)."""
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}>{text(value).replace(',', ',<wbr>').replace('{', '<wbr>{')}</td>"


def _num(value: Any, digits: int = 4) -> str:
    return f'<td class="num">{text(fmt(value, digits))}</td>'


def describe(comparison: Any) -> str:
    """A comparison's dict (or None) as ``Comparison.describe()`` says it."""
    if not isinstance(comparison, dict):
        return "-"
    try:
        return Comparison(**comparison).describe()
    except (TypeError, ValueError, KeyError):
        return json.dumps(comparison, default=str)[:200]


def _latency_text(data: dict[str, Any]) -> str:
    def one(lat: Any) -> str:
        lat = lat if isinstance(lat, dict) else {}
        median = number(lat.get("median_ms"))
        if median is None or median <= 0:
            return "n/a"
        return f"{median:.3f} ms [{fmt(lat.get('p10_ms'), 3)}-{fmt(lat.get('p90_ms'), 3)}]"

    base, opt = data.get("latency_baseline"), data.get("latency_optimized")
    if base is None and opt is None:
        return ""
    speedup = number(data.get("speedup"))
    return (
        (f"{data.get('baseline_name') or 'baseline'} {one(base)} -> " if base is not None else "")
        + f"graphopt {one(opt)}"
        + (f" ({speedup:.2f}x)" if speedup else "")
        + "; median [p10-p90]"
    )


def _summary(data: dict[str, Any]) -> str:
    summary = data.get("summary") or {}
    changed = "; ".join(
        f"{c.get('pass')} "
        + " ".join(f"{k}={v}" for k, v in sorted((c.get("stats") or {}).items()))
        for c in summary.get("changed") or []
        if isinstance(c, dict)
    )
    before, after = data.get("ops_before") or {}, data.get("ops_after") or {}
    error = data.get("artifact_error") or data.get("graph_error")
    q = data.get("quantization") or {}
    rows = [
        ("changed", changed or "nothing"),
        ("operations", f"{sum(before.values())} -> {sum(after.values())}" if before else ""),
        ("error", describe(error) if error else ""),
        ("int8", _int8_line(q) if q else ""),
        ("latency", _latency_text(data)),
        ("pipeline", data.get("pipeline", "")),
    ]
    out = [_headline(data)]
    out += [_table("summary", [], [[f"<th>{text(k)}</th>", _td(v)] for k, v in rows if v],
                  "summary")]  # fmt: skip
    for r in data.get("records") or []:
        if isinstance(r, dict) and r.get("status") in ("rolled-back", "failed"):
            msg = (r.get("message") or "").strip().splitlines()[:1]
            out.append(f'<div class="warning">{text(r.get("status"))}: {text(r.get("spec"))}: '
                       f"{text(msg[0] if msg else '')}</div>")  # fmt: skip
    out += [f'<div class="advice">{text(a)}</div>' for a in summary.get("advice") or []]
    out += [f'<div class="warning">WARNING: {text(w)}</div>' for w in data.get("warnings") or []]
    return '<section id="section-summary"><h2>Summary</h2>' + "".join(out) + "</section>"


def _headline(data: dict[str, Any]) -> str:
    """The speedup in large type, when both latencies are measurements."""
    speedup = number(data.get("speedup"))
    if not speedup:
        return ""
    word = "faster" if speedup >= 1 else "slower"
    base, opt = data.get("latency_baseline") or {}, data.get("latency_optimized") or {}
    ranges = [number(x.get(k)) for x in (base, opt) for k in ("p10_ms", "p90_ms")]
    noise = (
        "; the p10-p90 ranges overlap: within the noise of this machine"
        if None not in ranges and ranges[0] <= ranges[3] and ranges[2] <= ranges[1]
        else ""
    )
    return (
        f'<p class="headline"><b>{speedup:.2f}x</b> {word} than '
        f"{text(data.get('baseline_name') or 'the baseline')} (median latency, same run{noise})"
        "</p>"
    )


def _int8_line(q: dict[str, Any]) -> str:
    count, weighted = count_layers(q.get("layers") or [])
    return (
        f"{count} int8 ({weighted}{q.get('method', '?')} "
        f"calibration, {q.get('calibration_batches', '?')} batches); {q.get('metric', 'metric')}: "
        f"fp32 {fmt(q.get('fp32'))} -> int8 {fmt(q.get('int8'))} (drop {fmt(q.get('drop'))}"
        + (f", allowed {fmt(q.get('max_drop'))}" if q.get("max_drop") is not None else "")
        + ")"
    )


def _passes(data: dict[str, Any], records: list[dict[str, Any]]) -> str:
    rows = []
    for i, r in enumerate(records):
        status = str(r.get("status", "?"))
        err = describe(r.get("comparison")) if r.get("comparison") else (
            "not checked (no sample inputs)" if status == "unverified" else "-")  # fmt: skip
        stats = " ".join(f"{k}={v}" for k, v in sorted((r.get("stats") or {}).items()))
        rows.append([
            _td(i + 1), _td(r.get("spec", r.get("name", "?"))), _td(status, f"status-{status}"),
            _td("yes" if r.get("modified") else "no"), _num(_ms(r.get("time_s")), 4),
            _td(err), _td(stats),
        ])  # fmt: skip
    table = _table("passes", ["#", "pass", "status", "changed", "time (ms)", "error vs before "
                              "the pass", "statistics"], rows)  # fmt: skip
    folded = []
    for i, r in enumerate(records):
        decisions = r.get("decisions") or []
        message = r.get("message") if r.get("status") != "ok" else ""
        if not decisions and not message and not r.get("reproducer"):
            continue
        inner = f"<pre>{text(message)}</pre>" if message else ""
        if r.get("reproducer"):
            inner += f"<p>reproducer: <code>{text(r['reproducer'])}/repro.py</code></p>"
        inner += decision_table(f"decisions-{i}", decisions, f"records[{i}].decisions")
        folded.append(f"<details><summary>{i + 1}. {text(r.get('spec', '?'))}: "
                      f"{len(decisions)} decisions</summary>{inner}</details>")  # fmt: skip
    return table + "".join(folded)


def _ms(seconds: Any) -> float | None:
    s = number(seconds)
    return None if s is None or s < 0 else s * 1e3


def decision_table(table_id: str, items: list[Any], path: str) -> str:
    """Decisions as a table (one column per field; nested values as compact JSON), or a list
    when they are text; over ``SHOWN_ROWS`` rows, the rest are named by their JSON path."""
    if not items:
        return ""
    dicts = [d for d in items if isinstance(d, dict)]
    others = [d for d in items if not isinstance(d, dict)]
    out = ""
    if dicts:
        columns = list(dict.fromkeys(k for d in dicts for k in d))
        rows = [[_cell(d.get(k)) for k in columns] for d in dicts[:SHOWN_ROWS]]
        out += '<div class="wide">' + _table(table_id, columns, rows, "decisions") + "</div>"
    if others:
        out += "<ul>" + "".join(f"<li>{text(o)}</li>" for o in others[:SHOWN_ROWS]) + "</ul>"
    if len(dicts) > SHOWN_ROWS or len(others) > SHOWN_ROWS:
        out += f"<p>{len(items)} in all; the rest are in the JSON at <code>{text(path)}</code>.</p>"
    return out


def _cell(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        dumped = json.dumps(_rounded(value), default=str)
        return _td(dumped if len(dumped) <= 160 else dumped[:157] + "...")
    if isinstance(value, float):
        return _num(value)
    return _td("" if value is None else value)


def _rounded(value: Any) -> Any:
    """Nested values with floats to 4 significant digits (a cell shows ``0.2704``, not
    ``0.27093238166308126``)."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if number(value) is not None else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _int8(q: dict[str, Any]) -> str:
    if not q:
        return ""
    metric = _table("int8-metric", ["metric", "fp32", "int8", "drop", "allowed drop",
                                    "every layer int8: drop"],
                    [[_td(q.get("metric", "")), _num(q.get("fp32")), _num(q.get("int8")),
                      _num(q.get("drop")), _num(q.get("max_drop")),
                      _num(q.get("drop_all_int8"))]])  # fmt: skip
    bias = {b.get("layer") or b.get("node"): b for b in q.get("bias_correction") or []
            if isinstance(b, dict)}  # fmt: skip
    sens = {s.get("layer") or s.get("node"): s for s in q.get("sensitivity") or []
            if isinstance(s, dict)}  # fmt: skip
    header = ["layer", "op", "precision", "why float"]
    header += ["drop with only it in float"] * bool(sens) + ["max |bias shift|"] * bool(bias)
    rows = []
    for layer in q.get("layers") or []:
        if not isinstance(layer, dict):
            continue
        name = layer.get("layer") or layer.get("node", "?")
        precision = "int8" if layer.get("quantized") else "float"
        row = [_td(name), _td(layer.get("op_type", "")), _td(precision, precision),
               _td(layer.get("reason", ""))]  # fmt: skip
        row += [_num((sens.get(name) or {}).get("drop_without"))] * bool(sens)
        row += [_num((bias.get(name) or {}).get("max_abs_shift"))] * bool(bias)
        rows.append(row)
    layers = _table("int8-layers", header, rows)
    smooth = q.get("smoothquant") or []
    folded = (f"<details><summary>SmoothQuant: {len(smooth)} decisions</summary>"
              + decision_table("smoothquant", smooth, "quantization.smoothquant")
              + "</details>") if smooth else ""  # fmt: skip
    return metric + int8_plots(q) + "<h3>Layers</h3>" + layers + folded


def _decisions_of(records: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], str]:
    decisions, spec = [], ""
    for r in records:
        if r.get("name") == name:
            decisions += [d for d in r.get("decisions") or [] if isinstance(d, dict)]
            spec = str(r.get("spec", ""))
    return decisions, spec


def _merge_convs(records: list[dict[str, Any]]) -> str:
    plans, _ = _decisions_of(records, "merge-convs")
    if not plans:
        return ""
    rows = []
    for p in plans:
        if "stretch" not in p:
            continue
        merged = [span_label(p.get("convs") or [], c) for c in p.get("chosen") or []
                  if int(c.get("j", 0)) - int(c.get("i", 0)) > 1 or c.get("folded")]  # fmt: skip
        unmerged, predicted = number(p.get("unmerged_ms")), number(p.get("predicted_ms"))
        rows.append([
            _td(p.get("stretch")), _td(len(p.get("convs") or [])),
            _td(", ".join(merged) or f"left as it is ({p.get('reason', '')})"),
            _num(unmerged), _num(predicted if merged else None),
            _num(unmerged / predicted if merged and unmerged and predicted else None, 3),
        ])  # fmt: skip
    header = ["stretch", "convs", "merged spans", "one at a time (ms)", "merged (ms)",
              "speed-up (x)"]  # fmt: skip
    table = _table("merge-convs-stretches", header, rows) if rows else ""
    return merge_convs_plot(plans) + _depth_table(plans) + table


def _depth_table(plans: list[dict[str, Any]]) -> str:
    """merge-convs' depth mode: the budget, the plan and the model measured before and after."""
    rows = [
        [_num(p.get("budget_ms")), _num(p.get("unmerged_ms")), _num(p.get("predicted_ms")),
         _num(p.get("measured_before_ms")), _num(p.get("measured_after_ms")),
         _td(f"{len(p.get('removed') or [])} removed, {len(p.get('kept') or [])} kept"),
         _td("; ".join(str(s) for s in p.get("spans") or []) or p.get("reason", ""))]
        for p in plans
        if "budget_ms" in p
    ]  # fmt: skip
    header = ["budget (ms)", "convs alone (ms)", "planned (ms)", "model before (ms)",
              "model after (ms)", "activations", "merged spans"]  # fmt: skip
    return _table("merge-convs-depth", header, rows) if rows else ""


def _monarch(records: list[dict[str, Any]]) -> str:
    layers, spec = _decisions_of(records, "substitute-monarch")
    layers = [d for d in layers if "candidates" in d]
    if not layers:
        return ""
    rows = []
    for d in layers:
        chosen = d.get("chosen") or {}
        dense, lat = number(d.get("dense_ms")), number(chosen.get("latency_ms"))
        rows.append([
            _td(d.get("layer")), _td(f"{d.get('op', '')} {d.get('in_features')}->"
                                     f"{d.get('out_features')}"),
            _td(chosen.get("label") or f"not kept ({d.get('reason', '')})"),
            _num(chosen.get("rel_error"), 3), _num(dense), _num(lat),
            _num(dense / lat if dense and lat else None, 3),
            _td(f"{d.get('dense_params')} -> {chosen.get('params')}" if chosen else ""),
        ])  # fmt: skip
    table = _table("monarch-layers", ["layer", "op", "kept", "rel_error", "dense (ms)",
                   "kept (ms)", "speed-up (x)", "parameters"], rows)  # fmt: skip
    return monarch_plot(layers, spec) + table


def _tvm(data: dict[str, Any]) -> str:
    tasks = [t for t in data.get("tvm_tasks") or [] if isinstance(t, dict)]
    tuning = data.get("tvm_tuning") or {}
    if not tasks and not tuning:
        return ""
    out = f"<p>tuning: {text(tuning.get('summary', ''))}</p>" if tuning else ""
    if tasks:
        untuned = len(data.get("untuned_tasks") or [])
        out += (f"<details><summary>{len(tasks)} TVM tasks, {untuned} untuned (default "
                "schedules, not measured)</summary>"
                + decision_table("tvm-tasks", tasks, "tvm_tasks") + "</details>")  # fmt: skip
    return out


def _notes(data: dict[str, Any]) -> str:
    items = [("warning", w) for w in data.get("warnings") or []]
    items += [("capture", n) for n in data.get("capture_notes") or []]
    items += [("note", n) for n in data.get("notes") or []]
    if data.get("artifact_diagnosis"):
        items.append(("diagnosis", data["artifact_diagnosis"]))
    if data.get("mobile"):
        items.append(("mobile", data["mobile"]))
    if not items:
        return ""
    return (
        '<ul id="notes">'
        + "".join(
            f'<li><span class="{"bad" if kind == "warning" else ""}">{text(kind)}</span>: '
            f"{text(value)}</li>"
            for kind, value in items
        )
        + "</ul>"
    )

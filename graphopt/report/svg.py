"""Plots as inline SVG, made in Python: no JavaScript library, nothing fetched.

Two kinds, enough for a report: :func:`bar_chart` (horizontal bars in groups, each bar with an
optional p10-p90 whisker) and :func:`scatter` (points with optional reference lines). Every
plot is a ``<figure class="plot" id="plot-...">`` holding one ``<svg>`` with a title, labelled
axes and, where there is more than one series, a legend; each bar or point carries the class
``mark`` and a ``<title>`` tooltip. A value that is missing or not finite draws no mark and
says ``n/a``. Every string is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

__all__ = ["Bar", "Point", "bar_chart", "number", "scatter", "text"]

WIDTH = 820
PALETTE = ("#8a8f98", "#2f6fbf", "#e07b28", "#3a9a5b", "#9b59b6", "#c0392b", "#16a0a0")
ROW = 18  # height of one bar
GAP = 10  # between groups


@dataclass(frozen=True)
class Bar:
    """One bar: its series (colour and legend), value, optional p10-p90 range and tooltip."""

    series: str
    value: float | None
    low: float | None = None
    high: float | None = None
    tip: str = ""


@dataclass(frozen=True)
class Point:
    """One point of a scatter plot; ``strong`` draws it filled and labelled."""

    x: float | None
    y: float | None
    series: str
    tip: str = ""
    label: str = ""
    strong: bool = False


def text(value: object) -> str:
    """``value`` as escaped text, quotes included (safe in element text and attributes)."""
    return escape(str(value), quote=True)


def number(value: object) -> float | None:
    """A finite float, or None for anything else (None, NaN, infinities, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: object, digits: int = 4) -> str:
    """A number as a reader wants it: ``digits`` significant digits, no exponent from 1000 to
    a billion (``26385``, not ``2.639e+04``), ``n/a`` when it is not a finite number."""
    v = number(value)
    if v is None:
        return "n/a"
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e9 else f"{v:.{digits}g}"


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (1, 2 or 5 times a power of ten apart)."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    if out[-1] < hi:
        out.append(round(v, 12))
    return out


def _series_colors(names: list[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(names))}


def _legend(colors: dict[str, str], x: float, y: float) -> list[str]:
    if len(colors) < 2:
        return []
    out = []
    for name, color in colors.items():
        out.append(
            f'<rect class="legend-key" x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" '
            f'fill="{color}"/><text x="{x + 14:.1f}" y="{y:.1f}">{text(name)}</text>'
        )
        x += 24 + 7 * len(name)
    return out


def _figure(plot_id: str, title: str, height: float, body: list[str], caption: str) -> str:
    cap = f"<figcaption>{text(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="plot" id="plot-{text(plot_id)}">'
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" '
        f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'aria-labelledby="title-{text(plot_id)}">'
        f'<title id="title-{text(plot_id)}">{text(title)}</title>'
        f'<text class="plot-title" x="8" y="18">{text(title)}</text>'
        + "".join(body)
        + f"</svg>{cap}</figure>"
    )


def _x_axis(scale, ticks_: list[float], y: float, top: float, label: str, mid: float) -> list[str]:
    out = [f'<line class="axis" x1="{scale(ticks_[0]):.1f}" x2="{scale(ticks_[-1]):.1f}" '
           f'y1="{y:.1f}" y2="{y:.1f}"/>']  # fmt: skip
    for t in ticks_:
        x = scale(t)
        out.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle">'
            f"{fmt(t, 3)}</text>"
        )
    out.append(
        f'<text class="axis-label" x="{mid:.1f}" y="{y + 32:.1f}" text-anchor="middle">'
        f"{text(label)}</text>"
    )
    return out


def bar_chart(
    plot_id: str,
    title: str,
    groups: list[tuple[str, list[Bar]]],
    *,
    axis: str,
    caption: str = "",
) -> str:
    """Horizontal bars, one row per bar, grouped under a label per group; p10-p90 whiskers
    where a bar has them. ``axis`` names the quantity and its unit."""
    bars = [b for _, bs in groups for b in bs]
    values = [v for b in bars for v in (number(b.value), number(b.high)) if v is not None]
    colors = _series_colors([b.series for b in bars])
    longest = max([len(label) for label, _ in groups] + [4])
    left = min(320.0, 16 + 6.6 * longest)
    right = WIDTH - 90
    top = 30 + (18 if len(colors) > 1 else 0)
    ticks_ = ticks(min(0.0, *values) if values else 0.0, max(values) if values else 1.0)
    span = ticks_[-1] - ticks_[0]

    def scale(v: float) -> float:
        return left + (v - ticks_[0]) / span * (right - left)

    body, y = _legend(colors, left, top - 8), top
    for label, group in groups:
        h = ROW * max(1, len(group))
        body.append(
            f'<text class="group-label" x="{left - 6:.1f}" y="{y + h / 2 + 4:.1f}" '
            f'text-anchor="end">{text(label)}</text>'
        )
        for i, b in enumerate(group):
            body += _bar(b, scale, y + i * ROW, colors[b.series])
        y += h + GAP
    body += _x_axis(scale, ticks_, y, top, axis, (left + right) / 2)
    return _figure(plot_id, title, y + 44, body, caption)


def _bar(b: Bar, scale, y: float, color: str) -> list[str]:
    v = number(b.value)
    tip = f"<title>{text(b.tip or f'{b.series}: {fmt(b.value)}')}</title>"
    if v is None:
        return [f'<text class="na" x="{scale(0) + 4:.1f}" y="{y + 13:.1f}">{text(b.series)}: '
                f"n/a{tip}</text>"]  # fmt: skip
    x0, x1 = sorted((scale(0.0), scale(v)))
    out = [
        f'<rect class="mark bar" x="{x0:.1f}" y="{y + 2:.1f}" width="{max(x1 - x0, 1.0):.1f}" '
        f'height="{ROW - 4}" fill="{color}">{tip}</rect>'
    ]
    end = x1
    low, high = number(b.low), number(b.high)
    if low is not None and high is not None:
        xl, xh, mid = scale(low), scale(high), y + ROW / 2
        out.append(
            f'<path class="whisker" d="M{xl:.1f},{mid:.1f}H{xh:.1f}M{xl:.1f},{mid - 4:.1f}'
            f'V{mid + 4:.1f}M{xh:.1f},{mid - 4:.1f}V{mid + 4:.1f}"/>'
        )
        end = max(end, xh)
    out.append(f'<text class="value" x="{end + 4:.1f}" y="{y + 13:.1f}">{fmt(v)}</text>')
    return out


def scatter(
    plot_id: str,
    title: str,
    points: list[Point],
    *,
    x_axis: str,
    y_axis: str,
    hlines: tuple[tuple[float, str], ...] = (),
    vlines: tuple[tuple[float, str], ...] = (),
    caption: str = "",
) -> str:
    """Points on linear axes (``x_axis``/``y_axis`` name the quantity and unit), reference
    lines at ``hlines`` (y) and ``vlines`` (x); points with a missing coordinate are left out
    (say so in the caption)."""
    shown = [p for p in points if number(p.x) is not None and number(p.y) is not None]
    colors = _series_colors([p.series for p in points])
    xs = [p.x for p in shown] + [v for v, _ in vlines]
    ys = [p.y for p in shown] + [v for v, _ in hlines]
    xt = ticks(min([0.0, *xs]), max(xs or [1.0]))
    yt = ticks(min([0.0, *ys]), max(ys or [1.0]))
    left, right, top, bottom = 70.0, WIDTH - 30.0, 30.0 + (18 if len(colors) > 1 else 0), 330.0

    def sx(v: float) -> float:
        return left + (v - xt[0]) / (xt[-1] - xt[0]) * (right - left)

    def sy(v: float) -> float:
        return bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)

    body = _legend(colors, left, top - 8) + _x_axis(sx, xt, bottom, top, x_axis, (left + right) / 2)
    body += _y_axis(sy, yt, left, right, y_axis, (top + bottom) / 2)
    for v, label in hlines:
        body.append(f'<line class="ref" x1="{left}" x2="{right}" y1="{sy(v):.1f}" '
                    f'y2="{sy(v):.1f}"/><text class="ref-label" x="{right - 4}" '
                    f'y="{sy(v) - 4:.1f}" text-anchor="end">{text(label)}</text>')  # fmt: skip
    for v, label in vlines:
        end = sx(v) > (left + right) / 2  # the label on the side with room
        body.append(f'<line class="ref" x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" '
                    f'y2="{bottom}"/><text class="ref-label" x="{sx(v) + (-4 if end else 4):.1f}" '
                    f'y="{top + 12}" text-anchor="{"end" if end else "start"}">{text(label)}'
                    "</text>")  # fmt: skip
    for p in sorted(shown, key=lambda p: p.strong):
        color = colors[p.series]
        fill = color if p.strong else "white"
        body.append(
            f'<circle class="mark point{" strong" if p.strong else ""}" cx="{sx(p.x):.1f}" '
            f'cy="{sy(p.y):.1f}" r="{6 if p.strong else 4.5}" fill="{fill}" stroke="{color}" '
            f'stroke-width="2"><title>{text(p.tip or p.label)}</title></circle>'
        )
        if p.strong and p.label:
            body.append(f'<text class="point-label" x="{sx(p.x) + 8:.1f}" '
                        f'y="{sy(p.y) - 6:.1f}">{text(p.label)}</text>')  # fmt: skip
    return _figure(plot_id, title, bottom + 46, body, caption)


def _y_axis(scale, ticks_: list[float], left: float, right: float, label: str, mid: float):
    out = [f'<line class="axis" x1="{left}" x2="{left}" y1="{scale(ticks_[0]):.1f}" '
           f'y2="{scale(ticks_[-1]):.1f}"/>']  # fmt: skip
    for t in ticks_:
        y = scale(t)
        out.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{fmt(t, 3)}</text>"
        )
    out.append(
        f'<text class="axis-label" transform="translate(16,{mid:.1f}) rotate(-90)" '
        f'text-anchor="middle">{text(label)}</text>'
    )
    return out

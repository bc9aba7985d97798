"""Charts for the dashboard, drawn on the server as inline SVG: no script, no font, nothing fetched, so the
page works in a browser with no internet and in a text-only screenshot test alike.

Every drawn data point is an element with class `pt` (a line chart's circle, a bar chart's rect) carrying
`data-series`, `data-x` and `data-y`, and a `<title>` a browser shows on hover: the tests count those, and a
reader can check a plot against `devtune status --json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import TypeVar

# Eight colours that stay apart for the common kinds of colour blindness (Okabe and Ito, 2008).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 165, 14, 34  # margins: y labels left, the legend right, x labels below

Point = tuple[float, float]
T = TypeVar("T")


def line_chart(series: Mapping[str, Sequence[Point]], *, x_labels: Mapping[float, str] | None = None,
               x_range: tuple[float, float] | None = None, y_format: str = "{:.3g}", y_from_zero: bool = False,
               title: str = "") -> str:
    """One polyline per series over numeric x (steps, day numbers, run numbers); `x_labels` names some x
    values on the axis (dates), else ticks are numbers; `x_range` fixes the axis (a whole 30-day window)."""
    points = [p for pts in series.values() for p in pts if _finite(p)]
    if not points:
        return _empty(title)
    x0, x1 = x_range or _span([x for x, _ in points])
    y0, y1 = _span([y for _, y in points], from_zero=y_from_zero)
    if not y_from_zero:  # 5% of air above and below: a point on the axis line is hard to see
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
    sx, sy = _scale(x0, x1, LEFT, WIDTH - RIGHT), _scale(y0, y1, HEIGHT - BOTTOM, TOP)
    parts = [_axes(y0, y1, sy, y_format)]
    ticks = x_labels or {x: f"{x:g}" for x in _ticks(x0, x1)}
    parts += [_x_tick(sx(x), label) for x, label in _thin(sorted(ticks.items()))]
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        good = sorted(p for p in pts if _finite(p))
        if len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        # A dense series (a loss curve of 2,000 steps) keeps every point as data, drawn small.
        radius = 2.5 if len(good) <= 60 else 1.2
        for x, y in good:
            label = (x_labels or {}).get(x, f"{x:g}")
            parts.append(f'<circle class="pt" data-series="{escape(name)}" data-x="{x:g}" data-y="{y:.6g}" '
                         f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{colour}">'
                         f'<title>{escape(name)}: {escape(label)} = {y_format.format(y)}</title></circle>')
        parts.append(_legend(i, name, colour))
    return _svg(parts, title)


def bar_chart(categories: Sequence[str], stacks: Mapping[str, Sequence[float]], *, title: str = "",
              y_format: str = "{:,.0f}") -> str:
    """Stacked bars: one bar per category (a day, a developer), one coloured stack per series."""
    totals = [sum(values[i] for values in stacks.values()) for i in range(len(categories))]
    if not categories or not any(totals):
        return _empty(title)
    y1 = _span([0.0, max(totals)], from_zero=True)[1]
    sy = _scale(0.0, y1, HEIGHT - BOTTOM, TOP)
    slot = (WIDTH - RIGHT - LEFT) / len(categories)
    width = max(1.0, slot * 0.8)
    parts = [_axes(0.0, y1, sy, y_format, integer=True)]
    parts += [_x_tick(LEFT + slot * (i + 0.5), c) for i, c in _thin(list(enumerate(categories)))]
    for j, (name, values) in enumerate(stacks.items()):
        colour = PALETTE[j % len(PALETTE)]
        for i, category in enumerate(categories):
            below = sum(list(stacks.values())[k][i] for k in range(j))
            value = values[i]
            if value <= 0:
                continue
            top, bottom = sy(below + value), sy(below)
            parts.append(f'<rect class="pt" data-series="{escape(name)}" data-x="{escape(category)}" '
                         f'data-y="{value:g}" x="{LEFT + slot * i + (slot - width) / 2:.1f}" y="{top:.1f}" '
                         f'width="{width:.1f}" height="{max(bottom - top, 0.5):.1f}" fill="{colour}">'
                         f'<title>{escape(name)}, {escape(category)}: {y_format.format(value)}</title></rect>')
        parts.append(_legend(j, name, colour))
    return _svg(parts, title)


# -- pieces ----------------------------------------------------------------------------------------------------

def _svg(parts: list[str], title: str) -> str:
    head = f'<figcaption>{escape(title)}</figcaption>' if title else ""
    return (f'<figure class="chart">{head}<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">{"".join(parts)}</svg>'
            '</figure>')


def _empty(title: str) -> str:
    return (f'<figure class="chart empty"><figcaption>{escape(title)}</figcaption>'
            '<p class="nodata">no data yet</p></figure>')


def _axes(y0: float, y1: float, sy: _Scale, y_format: str, integer: bool = False) -> str:
    out = [f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="#888"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#888"/>']
    for y in _ticks(y0, y1, integer=integer):
        out.append(f'<line x1="{LEFT - 3}" y1="{sy(y):.1f}" x2="{WIDTH - RIGHT}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">'
                   f'{escape(y_format.format(y))}</text>')
    return "".join(out)


def _x_tick(x: float, label: str) -> str:
    return (f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11">'
            f'{escape(label)}</text>')


def _legend(i: int, name: str, colour: str) -> str:
    y = TOP + 14 * i + 6
    short = name if len(name) <= 26 else name[:25] + "…"
    return (f'<rect x="{WIDTH - RIGHT + 10}" y="{y - 8}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{WIDTH - RIGHT + 24}" y="{y + 1}" font-size="11">{escape(short)}</text>')


class _Scale:
    def __init__(self, d0: float, d1: float, r0: float, r1: float):
        self.d0, self.r0 = d0, r0
        self.k = (r1 - r0) / (d1 - d0) if d1 != d0 else 0.0

    def __call__(self, v: float) -> float:
        return self.r0 + (v - self.d0) * self.k


def _scale(d0: float, d1: float, r0: float, r1: float) -> _Scale:
    return _Scale(d0, d1, r0, r1)


def _span(values: list[float], from_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if from_zero:
        lo = min(lo, 0.0)
    if hi == lo:  # one value: a band around it, so the point sits mid-chart
        pad = abs(hi) * 0.1 or 1.0
        return lo - (0 if from_zero and lo == 0 else pad), hi + pad
    return lo, hi


def _ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round numbers across [lo, hi] (1, 2 or 5 times a power of ten apart; whole numbers for counts)."""
    raw = (hi - lo) / count
    if raw <= 0:
        return [lo]
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(step, 1.0)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step) + 1)]


def _thin(items: list[T], most: int = 10) -> list[T]:
    """At most `most` axis labels, evenly picked, so 30 dates do not overprint each other."""
    every = max(1, math.ceil(len(items) / most))
    return items[::every]


def _finite(p: Point) -> bool:
    return math.isfinite(p[0]) and math.isfinite(p[1])

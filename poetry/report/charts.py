"""The run's curves as inline SVG, one chart per PNG that poetry.runlog draws, so the page needs no image files.
A point at step 0 (the evaluation before the first optimizer step, eval.at_start) is ringed: where training began."""
from __future__ import annotations

import math
from html import escape

from ..runlog import CURVES

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 420, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 10, 34  # margins for the axis labels: steps, then the axis name below them
MARKERS_BELOW = 30  # points, as in runlog's PNGs: fewer get a dot each

Series = dict[str, list[tuple[int, float]]]


def series_of(records: list[dict], keys: tuple[str, ...]) -> Series:
    """key -> (step, value) of each finite value logged, for the keys that have any."""
    found = {key: [(r["step"], float(r[key])) for r in records
                   if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                   and math.isfinite(r[key])] for key in keys}
    return {key: points for key, points in found.items() if points}


def _colors(series: Series) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(len(series))]


def _label(value: float) -> str:
    return f"{value:.3g}"


def _chart(series: Series) -> str:
    steps = [step for points in series.values() for step, _ in points]
    values = [value for points in series.values() for _, value in points]
    first, last = min(steps), max(steps)
    x0, x1 = (first, last) if last > first else (first - 1, last + 1)  # one step alone sits in the middle
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12 * max(1.0, abs(y1)):
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)  # so that no point sits on the frame
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return TOP + (y1 - value) / (y1 - y0) * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">']
    for fraction in (0.0, 0.5, 1.0):
        value = y0 + fraction * (y1 - y0)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="tick" x="{LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{_label(value)}</text>')
    for step in sorted({first, last}):
        parts.append(f'<text class="tick" x="{x(step):.1f}" y="{HEIGHT - 20}" text-anchor="middle">{step}</text>')
    parts.append(f'<text class="tick" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">'
                 f'optimizer step</text>')
    for color, (key, points) in zip(_colors(series), series.items(), strict=True):
        coordinates = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in points)
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coordinates}"/>')
        for step, value in points:
            tip = f"<title>{escape(key)} at step {step}: {value:.4g}</title>"
            if step == 0:
                parts.append(f'<circle class="start" cx="{x(step):.1f}" cy="{y(value):.1f}" r="5.5" '
                             f'stroke="{color}">{tip}</circle>')
            elif len(points) < MARKERS_BELOW:
                parts.append(f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="2.5" fill="{color}">{tip}</circle>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: Series) -> str:
    keys = "".join(f'<span class="entry"><i style="background:{color}"></i>{escape(key)}</span>'
                   for color, key in zip(_colors(series), series, strict=True))
    start = any(step == 0 for points in series.values() for step, _ in points)
    ring = '<span class="entry"><i class="ring"></i>step 0: before training (zero-shot)</span>'
    return keys + (ring if start else "")


def curves_html(records: list[dict]) -> str:
    """A figure per curve that has data, and a note when no evaluation ran at step 0."""
    figures = []
    for curve in CURVES.values():
        series = series_of(records, curve.keys)
        if series:
            figures.append(f'<figure><figcaption><b>{curve.title}</b> {_legend(series)}</figcaption>'
                           f'{_chart(series)}</figure>')
    if not figures:
        return '<p class="note">metrics.jsonl holds no curve to draw.</p>'
    evaluated = [r["step"] for r in records if any(key.startswith("val/") for key in r)]
    note = "" if 0 in evaluated else (
        '<p class="note">No evaluation at step 0 in metrics.jsonl (the run had eval.at_start=false), so the curves '
        "do not show the zero-shot start; the score table does, when its first submission is the untrained model."
        "</p>")
    return f'<div class="charts">{"".join(figures)}</div>{note}'

"""Inline SVG charts of the agents' load (no script, no external library). Pure functions of their samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from frontend.live import Sample


@dataclass(frozen=True)
class Line:
    """One series of a chart: its name, CSS class and (time, percent) points."""

    label: str
    css: str
    points: Sequence[tuple[float, float]]


def lines_of(samples: Sequence[Sample]) -> list[Line]:
    """CPU and memory always; GPU utilisation and GPU memory when the agent has GPUs."""
    out = [
        Line("CPU", "cpu", [(s.at, s.cpu_percent) for s in samples]),
        Line("Memory", "mem", [(s.at, s.memory_percent) for s in samples]),
    ]
    gpu = [(s.at, s.gpu_percent) for s in samples if s.gpu_percent is not None]
    if gpu:
        out.append(Line("GPU", "gpu", gpu))
        out.append(Line("GPU memory", "gpumem",
                        [(s.at, s.gpu_memory_percent) for s in samples if s.gpu_memory_percent is not None]))
    return out


MAX_POINTS = 160  # a chart is a few hundred pixels wide: more points only make the page heavier
SPARK_POINTS = 40


def thin(points: Sequence[tuple[float, float]], most: int) -> Sequence[tuple[float, float]]:
    """At most `most` points: the means of consecutive runs of points, the last point kept as it is."""
    n = len(points)
    if n <= most:
        return points
    out = []
    for i in range(most - 1):
        run = points[i * (n - 1) // (most - 1):(i + 1) * (n - 1) // (most - 1)]
        out.append((sum(p[0] for p in run) / len(run), sum(p[1] for p in run) / len(run)))
    out.append(points[-1])
    return out


def _polyline(points: Sequence[tuple[float, float]], now: float, window_s: float, x0: float, w: float,
              y0: float, h: float, most: int = MAX_POINTS) -> str:
    scale_x, scale_y = w / window_s, h / 100
    right, bottom = x0 + w, y0 + h
    return " ".join(
        f"{right - (now - at) * scale_x:.0f},{bottom - min(max(value, 0.0), 100.0) * scale_y:.0f}"
        for at, value in thin(points, most)
    )


MIN_SPAN_S = 60.0


def span_of(lines: Sequence[Line], now: float, window_s: float) -> float:
    """The time the chart spans: since the oldest sample (at least a minute), at most the window."""
    oldest = min((ln.points[0][0] for ln in lines if ln.points), default=now)
    return min(window_s, max(MIN_SPAN_S, now - oldest))


def _ago(seconds: float) -> str:
    return f"−{seconds / 60:.0f} min" if seconds >= 120 else f"−{seconds:.0f} s"


def chart(lines: Sequence[Line], now: float, window_s: float, title: str, width: int = 640,
          height: int = 180) -> Markup:
    """A line chart of percentages (0–100) since the oldest sample (up to `window_s` seconds), with the latest
    values in its accessible name."""
    left, right, top, bottom = 36, 8, 8, 22
    w, h = width - left - right, height - top - bottom
    latest = ", ".join(f"{ln.label} {ln.points[-1][1]:.0f}%" for ln in lines if ln.points) or "no samples yet"
    window_s = span_of(lines, now, window_s)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}: {latest}" '
        f'preserveAspectRatio="none" width="100%" height="{height}">',
    ]
    for pct in (0, 50, 100):
        y = top + h * (1 - pct / 100)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{pct}%</text>')
    parts.append(f'<text class="axis" x="{left}" y="{height - 6}">{_ago(window_s)}</text>')
    parts.append(f'<text class="axis" x="{left + w}" y="{height - 6}" text-anchor="end">now</text>')
    for ln in lines:
        if len(ln.points) == 1:
            x = left + w * (1 - (now - ln.points[0][0]) / window_s)
            y = top + h * (1 - min(max(ln.points[0][1], 0.0), 100.0) / 100)
            parts.append(f'<circle class="line line-{ln.css}" cx="{x:.1f}" cy="{y:.1f}" r="2"/>')
        elif ln.points:
            pts = _polyline(ln.points, now, window_s, left, w, top, h)
            parts.append(f'<polyline class="line line-{ln.css}" points="{pts}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def sparkline(points: Sequence[tuple[float, float]], now: float, window_s: float, css: str, label: str,
              width: int = 120, height: int = 28) -> Markup:
    """A small line of one percentage, for a table cell."""
    if not points:
        return Markup('<span class="muted">—</span>')
    latest = points[-1][1]
    window_s = min(window_s, max(MIN_SPAN_S, now - points[0][0]))
    pts = _polyline(points, now, window_s, 1, width - 2, 2, height - 4, SPARK_POINTS)
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)} {latest:.0f}%"><polyline class="line line-{css}" points="{pts}"/></svg>'
    )

"""Inline SVG charts (curves, histograms, bars) and the points of ROC and precision-recall
curves, for the self-contained HTML reports."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from reporting.columns import finite

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def roc_points(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of the image scores."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve([r["label"] for r in records], [r["score"] for r in records])
    return fpr, tpr


def pr_points(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision of the image scores."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(
        [r["label"] for r in records], [r["score"] for r in records]
    )
    return recall, precision


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect width="100%" height="100%" fill="white"/>{body}</svg>'
    )


def _axes(x0: int, y0: int, w: int, h: int, xlabel: str, ylabel: str, xr, yr) -> str:
    parts = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    for i in range(6):
        fx, fy = x0 + w * i / 5, y0 + h - h * i / 5
        vx = xr[0] + (xr[1] - xr[0]) * i / 5
        vy = yr[0] + (yr[1] - yr[0]) * i / 5
        parts.append(
            f'<text x="{fx:.1f}" y="{y0 + h + 14}" font-size="10" text-anchor="middle">{vx:.3g}</text>'
        )
        parts.append(
            f'<text x="{x0 - 4}" y="{fy + 3:.1f}" font-size="10" text-anchor="end">{vy:.3g}</text>'
        )
        parts.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{fy:.1f}" y2="{fy:.1f}" stroke="#eee"/>')
    parts.append(
        f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    parts.append(
        f'<text x="12" y="{y0 + h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {y0 + h / 2})">{html.escape(ylabel)}</text>'
    )
    return "".join(parts)


def line_chart(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    xlabel: str,
    ylabel: str,
    x_max: float = 1.0,
    marks: dict[str, float] | None = None,
) -> str:
    """Curves in [0, ``x_max``] x [0, 1] (ROC, PR, miss rate against false alarms), one
    colour per series, with a legend; ``marks``: labelled vertical lines (a budget)."""
    x0, y0, w, h = 50, 25, 300, 240
    body = [f'<text x="{x0}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    body.append(_axes(x0, y0, w, h, xlabel, ylabel, (0, x_max), (0, 1)))
    for label, x in (marks or {}).items():
        fx = x0 + w * min(float(x) / x_max, 1.0)
        body.append(
            f'<line x1="{fx:.1f}" x2="{fx:.1f}" y1="{y0}" y2="{y0 + h}" stroke="#555" '
            'stroke-dasharray="4 3"/>'
        )
        body.append(
            f'<text x="{fx + 3:.1f}" y="{y0 + 12}" font-size="10">{html.escape(label)}</text>'
        )
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        # Only the points within the x range are drawn.
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        inside = xs <= x_max
        points = " ".join(
            f"{x0 + w * float(x) / x_max:.1f},{y0 + h - h * float(y):.1f}"
            for x, y in zip(xs[inside], ys[inside])
        )
        body.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.6"/>'
        )
        body.append(
            f'<rect x="{x0 + w + 12}" y="{y0 + 14 * i}" width="10" height="10" fill="{colour}"/>'
        )
        body.append(
            f'<text x="{x0 + w + 26}" y="{y0 + 9 + 14 * i}" font-size="10">{html.escape(name)}</text>'
        )
    return _svg(x0 + w + 220, y0 + h + 40, "".join(body), title)


def _histogram_svg(
    groups: Sequence[tuple[Sequence[float], str, str]],
    title: str,
    xlabel: str,
    bins: int,
    w: int,
    h: int,
) -> str:
    """Overlaid histograms of ``groups`` (values, colour, legend label; an empty label draws no
    legend) on common bins over the values' range."""
    values = np.asarray([v for vs, _, _ in groups for v in vs], dtype=float)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(np.asarray(vs, dtype=float), edges)[0] for vs, _, _ in groups]
    top = max(1, max(int(c.max()) for c in counts))
    x0, y0 = 45, 25
    body = [f'<text x="{x0}" y="16" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    body.append(_axes(x0, y0, w, h, xlabel, "images", (lo, hi), (0, top)))
    bw = w / bins
    for (_, colour, _), c in zip(groups, counts):
        for i, n in enumerate(c):
            if n:
                bh = h * n / top
                body.append(
                    f'<rect x="{x0 + i * bw:.1f}" y="{y0 + h - bh:.1f}" width="{bw:.1f}" '
                    f'height="{bh:.1f}" fill="{colour}" fill-opacity="0.5"/>'
                )
    labelled = [(colour, label) for _, colour, label in groups if label]
    for i, (colour, label) in enumerate(labelled):
        body.append(
            f'<text x="{x0 + w - 45 * (len(labelled) - i)}" y="{y0 + 12}" font-size="10" '
            f'fill="{colour}">{html.escape(label)}</text>'
        )
    return _svg(x0 + w + 10, y0 + h + 40, "".join(body), title)


def histogram(normal: Sequence[float], defect: Sequence[float], title: str, bins: int = 20) -> str:
    """Overlaid score histograms of normal (blue) and defective (red) test images."""
    groups = [(normal, "#1f77b4", "normal"), (defect, "#d62728", "defect")]
    return _histogram_svg(groups, title, "image score", bins, 300, 140)


def value_histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 12) -> str:
    """A small histogram of one figure over images (a distribution beside its table)."""
    return _histogram_svg([(values, "#1f77b4", "")], title, xlabel, bins, 220, 90)


def bar_chart(values: dict[str, float], title: str, unit: str) -> str:
    """Horizontal bars, one per variant."""
    items = [(k, v) for k, v in values.items() if finite(v)]
    top = max([v for _, v in items] + [1e-12])
    label_w, bar_w, row_h = 340, 240, 18
    body = [f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, value) in enumerate(items):
        y = 26 + i * row_h
        length = bar_w * value / top
        body.append(
            f'<text x="{label_w - 6}" y="{y + 12}" font-size="10" text-anchor="end">{html.escape(name)}</text>'
        )
        body.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{length:.1f}" height="{row_h - 5}" fill="#1f77b4"/>'
        )
        body.append(
            f'<text x="{label_w + length + 4:.1f}" y="{y + 12}" font-size="10">{value:.3g} {html.escape(unit)}</text>'
        )
    return _svg(label_w + bar_w + 90, 36 + row_h * max(1, len(items)), "".join(body), title)

"""The reports' panel-quality section: each uniformity figure's distribution over a set of
images and a per-image table (``predict``'s report and the hybrid's)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from reporting.charts import value_histogram
from reporting.columns import finite
from reporting.page import html_table

# The quality figures of ``metrics.quality.panel_quality`` in an entry, and their names here.
QUALITY_FIGURES = {
    "mura_energy_pct": "FFT mura energy (%)",
    "wavelet_uniformity_pct": "wavelet uniformity (%)",
    "delta_e2000_mean": "ΔE2000 mean",
    "delta_e2000_p99": "ΔE2000 p99",
}
# Why a figure has no value on any image, where the reason is known.
ABSENT_REASONS = {
    "delta_e2000_mean": "no colour panel: ΔE2000 is measured on colour panels only",
    "delta_e2000_p99": "no colour panel: ΔE2000 is measured on colour panels only",
}
QUALITY_TABLE_ALL = 200  # up to this many images, the quality table lists every one
QUALITY_TABLE_WORST = 50  # past it, the least uniform ones


def quality_sections(
    rows: list[dict[str, Any]],
    figures: Mapping[str, str],
    columns: Mapping[str, Callable[[dict[str, Any]], Any]],
    what: str,
) -> list[str]:
    """The panel-quality section: each of ``figures`` (key -> name) over ``rows`` (one per
    image: its distribution and a per-image table with ``columns``, name -> value of a row);
    figures no image has are left out with one line saying why. ``what``: the images, for the
    section's first line."""
    sections = [
        "<h2>Panel quality</h2>",
        f"<p>Uniformity of {html.escape(what)} (higher: less uniform): FFT mura energy "
        "(RMS deviation from the smooth background, periods 4 to 32 px, in % of it), wavelet "
        "uniformity (the largest Haar detail band's energy, in % of the mean luminance), "
        "ΔE2000 mean and 99th percentile (CIEDE2000 to the panel's mean colour).</p>",
    ]
    present, reasons = [], []
    for key, name in figures.items():
        if any(finite(r.get(key)) for r in rows):
            present.append(key)
        else:
            reasons.append(ABSENT_REASONS.get(key, f"{name}: not measured on any image"))
    table, charts = [], []
    for key in present:
        values = np.array([r[key] for r in rows if finite(r.get(key))], dtype=float)
        table.append(
            {
                "figure": figures[key],
                "images": len(values),
                "min": float(values.min()),
                "median": float(np.median(values)),
                "95th percentile": float(np.percentile(values, 95)),
                "max": float(values.max()),
            }
        )
        charts.append(value_histogram(values, figures[key], "value per image"))
    sections.append(
        html_table(table, ["figure", "images", "min", "median", "95th percentile", "max"], "left")
    )
    sections.append(f'<div class="row">{"".join(charts)}</div>')
    # The two ΔE2000 figures share their reason: one line for both.
    sections.extend(f"<p>Left out — {html.escape(r)}.</p>" for r in dict.fromkeys(reasons))
    listed = rows
    if len(rows) > QUALITY_TABLE_ALL:
        listed = _least_uniform(rows, QUALITY_TABLE_WORST)
        sections.append(
            f"<p>{len(rows)} images: the {len(listed)} least uniform (highest wavelet "
            "uniformity or mura energy) are listed; the CSV holds every image.</p>"
        )
    names = ["path", *(figures[k] for k in present), *columns]
    per_image = [
        {
            "path": r["path"],
            **{figures[k]: r.get(k) for k in present},
            **{name: value(r) for name, value in columns.items()},
        }
        for r in listed
    ]
    sections.append(html_table(per_image, names, "left"))
    return sections


def _least_uniform(ok: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` images ranked highest on either the wavelet or the mura figure (an image's
    best rank of the two), so both kinds of non-uniformity make the list."""
    best_rank = [len(ok)] * len(ok)
    for key in ("wavelet_uniformity_pct", "mura_energy_pct"):
        measured = sorted(
            (i for i, e in enumerate(ok) if finite(e.get(key))), key=lambda i: -ok[i][key]
        )
        for rank, i in enumerate(measured):
            best_rank[i] = min(best_rank[i], rank)
    order = sorted(range(len(ok)), key=lambda i: best_rank[i])
    return [ok[i] for i in order[:n]]

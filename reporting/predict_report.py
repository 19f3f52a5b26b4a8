"""Predict's HTML report (``OUT/report.html``): what was predicted (counts, levels, region
types), the panels' quality figures and their distribution over the folder, a gallery of the
flagged panels by level, and the files skipped. One self-contained page: styles and charts are
inline; the gallery's thumbnails are the overlays under ``OUT/overlays/``, linked relative to
``OUT`` so the folder can be moved or copied whole."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.io import atomic_write_text
from reporting.charts import value_histogram
from reporting.columns import finite
from reporting.page import gallery_card, html_page, html_table, html_value

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
LEVELS = range(6)
GALLERY_MAX = 200  # cards; a folder of thousands of flagged panels would make a page too heavy
QUALITY_TABLE_ALL = 200  # up to this many images, the quality table lists every one
QUALITY_TABLE_WORST = 50  # past it, the least uniform ones
OVERLAY_DIR = "overlays"
# Table classes: "left", a name then figures; "num", figures only; "text", text only (the page's
# default style left-aligns the second column).
CSS = """
.left td:first-child, .text td { text-align: left; }
.left td:nth-child(2), .num td { text-align: right; }
.gallery figure { border: 1px solid #ddd; padding: 4px; }
.gallery img { width: 220px; height: auto; display: block; }
"""


def write_predict_report(out: Path, hybrid: str, entries: list[dict[str, Any]]) -> Path:
    """Write ``out/report.html`` from predict's ``entries`` (one per image, as in
    ``predictions.json``); ``hybrid``: the hybrid's folder as given. Returns its path."""
    out = Path(out)
    ok = [e for e in entries if e.get("status") == "ok"]
    skipped = [e for e in entries if e.get("status") == "skipped"]
    flagged = [e for e in ok if e.get("label") == 1]
    sections = [
        "<h1>Predict report</h1>",
        f"<p><b>hybrid</b>: {html.escape(hybrid)} · <b>images predicted</b>: {len(ok)} · "
        f"<b>flagged defective</b>: {len(flagged)} · <b>skipped</b>: {len(skipped)}</p>",
        *_level_sections(ok),
        *_region_type_sections(ok),
        *_gallery_sections(out, flagged),
        *_quality_sections(ok),
        *_skipped_sections(skipped),
    ]
    return atomic_write_text(out / "report.html", html_page("Predict report", sections, CSS))


def _level_sections(ok: list[dict[str, Any]]) -> list[str]:
    if not ok:
        return ["<p>Levels: left out, no image was predicted.</p>"]
    counts = Counter(e.get("level") for e in ok)
    # Levels outside 0-5 (none by design) would still be counted, not dropped.
    levels = sorted(set(LEVELS) | {level for level in counts if level is not None})
    rows = [{"level": level, "panels": counts.get(level, 0)} for level in levels]
    return ["<h2>Levels</h2>", html_table(rows, ["level", "panels"], "num")]


def _region_type_sections(ok: list[dict[str, Any]]) -> list[str]:
    regions: Counter[str] = Counter()
    panels: Counter[str] = Counter()
    for entry in ok:
        types = [r.get("type") or "untyped" for r in entry.get("regions") or []]
        regions.update(types)
        panels.update(set(types))
    if not regions:
        return ["<p>Region types: left out, no regions were found.</p>"]
    rows = [{"type": t, "regions": n, "panels": panels[t]} for t, n in regions.most_common()]
    return ["<h2>Region types</h2>", html_table(rows, ["type", "regions", "panels"], "left")]


def _overlay_link(out: Path, entry: dict[str, Any]) -> str | None:
    """The overlay's address relative to ``out``, or None without one. The entry holds the path
    as its run saw it (relative to that run's directory, or absolute under Ray); the file itself
    is always ``out/overlays/<name>``."""
    if not entry.get("overlay"):
        return None
    name = Path(entry["overlay"]).name
    if not (out / OVERLAY_DIR / name).is_file():
        return None
    return f"{OVERLAY_DIR}/{name}"


def _gallery_sections(out: Path, flagged: list[dict[str, Any]]) -> list[str]:
    if not flagged:
        return ["<p>Gallery: left out, no panel was flagged.</p>"]
    ordered = sorted(flagged, key=lambda e: (-(e.get("level") or 0), -(e.get("score") or 0.0)))
    shown = ordered[:GALLERY_MAX]
    out_sections = [
        "<h2>Flagged panels</h2>",
        "<p>By level, highest first, then by score; each thumbnail opens its overlay at full "
        "size.</p>",
    ]
    without = [e for e in flagged if not e.get("overlay")]
    if without:
        out_sections.append(
            f"<p>{len(without)} flagged panel(s) have no overlay: overlays were off "
            "(<code>predict.overlays</code>).</p>"
        )
    cards = []
    for entry in shown:
        regions = entry.get("regions") or []
        types = sorted({r.get("type") or "untyped" for r in regions})
        caption = (
            f"<b>{html.escape(Path(entry['path']).name)}</b><br>level "
            f"{html_value(entry.get('level'))} · score {html_value(entry.get('score'))} · "
            f"{len(regions)} region(s)" + (f": {html.escape(', '.join(types))}" if types else "")
        )
        link = _overlay_link(out, entry)
        if link is None and entry.get("overlay"):
            caption += "<br>(overlay file missing)"
        cards.append(gallery_card(link, f"overlay of {Path(entry['path']).name}", caption))
    out_sections.append(f'<div class="row gallery">{"".join(cards)}</div>')
    if len(ordered) > len(shown):
        out_sections.append(
            f"<p>{len(ordered) - len(shown)} more flagged panel(s) not shown (the gallery holds "
            f"the first {GALLERY_MAX}); predictions.csv lists every one.</p>"
        )
    return out_sections


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


def _quality_sections(ok: list[dict[str, Any]]) -> list[str]:
    if not ok:
        return ["<p>Panel quality: left out, no image was predicted.</p>"]
    columns = {
        "flagged": lambda e: "yes" if e.get("label") == 1 else "no",
        "level": lambda e: e.get("level"),
    }
    return quality_sections(ok, QUALITY_FIGURES, columns, "each predicted panel as read")


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


def _skipped_sections(skipped: list[dict[str, Any]]) -> list[str]:
    if not skipped:
        return []
    rows = [{"path": e.get("path"), "reason": e.get("error")} for e in skipped]
    return [
        "<h2>Skipped files</h2>",
        "<p>Files that could not be read or predicted; the others were still processed.</p>",
        html_table(rows, ["path", "reason"], "text"),
    ]

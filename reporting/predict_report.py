"""Predict's HTML report (``OUT/report.html``): what was predicted (counts, levels, region
types), the panels' quality figures and their distribution over the folder, a gallery of the
flagged panels by level, and the files skipped. One self-contained page: styles and charts are
inline; the gallery's thumbnails are the overlays under ``OUT/overlays/``, linked relative to
``OUT`` so the folder can be moved or copied whole."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_text
from reporting.page import REPORT_CSS, gallery_card, html_page, html_table, html_value
from reporting.quality import QUALITY_FIGURES, quality_sections

LEVELS = range(6)
GALLERY_MAX = 200  # cards; a folder of thousands of flagged panels would make a page too heavy
OVERLAY_DIR = "overlays"


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
    return atomic_write_text(out / "report.html", html_page("Predict report", sections, REPORT_CSS))


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


def _quality_sections(ok: list[dict[str, Any]]) -> list[str]:
    if not ok:
        return ["<p>Panel quality: left out, no image was predicted.</p>"]
    columns = {
        "flagged": lambda e: "yes" if e.get("label") == 1 else "no",
        "level": lambda e: e.get("level"),
    }
    return quality_sections(ok, QUALITY_FIGURES, columns, "each predicted panel as read")


def _skipped_sections(skipped: list[dict[str, Any]]) -> list[str]:
    if not skipped:
        return []
    rows = [{"path": e.get("path"), "reason": e.get("error")} for e in skipped]
    return [
        "<h2>Skipped files</h2>",
        "<p>Files that could not be read or predicted; the others were still processed.</p>",
        html_table(rows, ["path", "reason"], "text"),
    ]

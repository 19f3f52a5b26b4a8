"""The reports' HTML: one self-contained page and its tables."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

# Table classes: "left", a name then figures; "num", figures only; "text", text only (the page's
# default style left-aligns the second column).
REPORT_CSS = """
.left td:first-child, .text td { text-align: left; }
.left td:nth-child(2), .num td { text-align: right; }
.gallery figure { border: 1px solid #ddd; padding: 4px; }
.gallery img { width: 220px; height: auto; display: block; }
"""


def html_value(value: Any, digits: int = 4) -> str:
    """A figure as escaped text: floats to ``digits`` significant digits, nan as a dash."""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "–"
    return html.escape("" if value is None else str(value))


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], css: str = "") -> str:
    """A table of ``rows`` (dicts), one column per name in ``columns``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_value(r.get(c))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def gallery_card(link: str | None, alt: str, caption: str) -> str:
    """A gallery's card: a thumbnail of the image at ``link`` (relative to the page) opening it
    at full size, over ``caption`` (HTML); the caption alone without a link."""
    if link is None:
        return f"<figure><figcaption>{caption}</figcaption></figure>"
    target = html.escape(quote(link))
    return (
        f'<figure><a href="{target}"><img src="{target}" alt="{html.escape(alt)}" '
        f'loading="lazy"></a><figcaption>{caption}</figcaption></figure>'
    )


def html_page(title: str, sections: Sequence[str], css: str = "") -> str:
    """A self-contained HTML page of ``sections`` (HTML fragments) with the reports' style, and
    ``css``: rules of the page's own."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f3f3f3; }} td:nth-child(2) {{ text-align: left; }}
.row {{ display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }}
figure {{ margin: 0; font-size: 11px; max-width: 230px; }}
{css}</style></head><body>
{"".join(sections)}
</body></html>
"""

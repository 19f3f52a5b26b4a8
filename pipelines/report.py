"""Leaderboard and HTML report of a benchmark run.

Ranking composite (documented in the README): a weighted mean of the detection metrics a job
has, ``0.3 image AUROC + 0.2 image AP + 0.2 pixel AUROC + 0.2 AUPRO + 0.1 pixel F1-max``,
renormalized over the metrics present (image-level-only datasets have no pixel metrics). Cost
figures are shown beside it but do not enter it: speed and memory are constraints a plant sets,
not trade-offs a score should make for it. A variant's dataset score is the mean of its
categories' composites; its overall score the mean over datasets. Failed jobs rank last.

The HTML report is one self-contained file: plots are inline SVG and heatmap overlays are
embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.io import atomic_write_csv, atomic_write_text
from data.images import size_label

COMPOSITE_WEIGHTS = {
    "image_auroc": 0.3,
    "image_ap": 0.2,
    "pixel_auroc": 0.2,
    "aupro": 0.2,
    "pixel_f1_max": 0.1,
}
METRIC_COLUMNS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")
COST_COLUMNS = (
    "fit_seconds",
    "images_per_second",
    "backbone_images_per_second",
    "latency_ms",
    "peak_rss_mb",
    "model_bytes",
)
# Reconstruction members' figures on the test split (``reconstruction_quality`` of a job).
RECONSTRUCTION_COLUMNS = ("psnr_db", "ssim", "lpips")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def composite(metrics: dict[str, float]) -> float:
    """The ranking score of one job (nan when it has none of the metrics)."""
    present = {k: w for k, w in COMPOSITE_WEIGHTS.items() if _finite(metrics.get(k))}
    if not present:
        return float("nan")
    return sum(metrics[k] * w for k, w in present.items()) / sum(present.values())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def variant_name(row: dict[str, Any]) -> str:
    parts = [row["member"]]
    if row.get("backbone"):
        parts.append(str(row["backbone"]))
    if row.get("tiling"):
        parts.append("tiled")
    elif row.get("image_size"):
        parts.append(f"{size_label(row['image_size'])}px")
    return " / ".join(parts)


def leaderboard(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-job rows with composites, plus rankings per dataset, overall and per category."""
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        row = {
            "variant": variant_name(r),
            "dataset": r["dataset"],
            "category": r["category"],
            "member": r["member"],
            "backbone": r.get("backbone"),
            "image_size": r.get("image_size"),
            "tiling": r.get("tiling"),
            "status": r.get("status", "missing"),
            "error": r.get("error", ""),
            # The ranking is on the test split; ensemble chooses members on the val composite.
            "composite": composite(r.get("metrics", {})) if ok else float("nan"),
            "val_composite": (composite(r.get("validation_metrics") or {}) if ok else float("nan")),
        }
        row.update({k: (r.get("metrics") or {}).get(k, float("nan")) for k in METRIC_COLUMNS})
        row.update({k: (r.get("cost") or {}).get(k, float("nan")) for k in COST_COLUMNS})
        quality = r.get("reconstruction_quality") or {}
        row.update({k: quality.get(k) for k in RECONSTRUCTION_COLUMNS})
        rows.append(row)

    def ranked(groups: dict[str, list[float]]) -> list[dict[str, Any]]:
        table = []
        for variant, values in groups.items():
            good = [v for v in values if _finite(v)]
            table.append(
                {
                    "variant": variant,
                    "score": float(np.mean(good))
                    if good and len(good) == len(values)
                    else float("nan"),
                    "jobs": len(values),
                    "failed": len(values) - len(good),
                }
            )
        table.sort(
            key=lambda t: (not _finite(t["score"]), -t["score"] if _finite(t["score"]) else 0)
        )
        for rank, t in enumerate(table, 1):
            t["rank"] = rank
        return table

    per_dataset: dict[str, list[dict[str, Any]]] = {}
    by_dataset: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_category: dict[str, list[dict[str, Any]]] = {}
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_dataset[row["dataset"]][row["variant"]].append(row["composite"])
        by_category[f"{row['dataset']}/{row['category']}"][row["variant"]].append(row["composite"])
    overall_groups: dict[str, list[float]] = defaultdict(list)
    for dataset, groups in by_dataset.items():
        per_dataset[dataset] = ranked(groups)
        for t in per_dataset[dataset]:
            overall_groups[t["variant"]].append(t["score"])
    for key, groups in by_category.items():
        per_category[key] = ranked(groups)
    overall = ranked(overall_groups)
    rank_of = {t["variant"]: t["rank"] for t in overall}
    rows.sort(key=lambda r: (rank_of.get(r["variant"], 10**6), r["dataset"], r["category"]))
    for row in rows:
        row["overall_rank"] = rank_of.get(row["variant"])
    return {
        "rows": rows,
        "overall": overall,
        "per_dataset": per_dataset,
        "per_category": per_category,
    }


def write_leaderboard_csv(board: dict[str, Any], path: Path) -> Path:
    columns = [
        "overall_rank",
        "variant",
        "dataset",
        "category",
        "status",
        "composite",
        "val_composite",
        *METRIC_COLUMNS,
        *COST_COLUMNS,
        *RECONSTRUCTION_COLUMNS,
        "member",
        "backbone",
        "image_size",
        "tiling",
        "error",
    ]
    rows = [{k: _csv_value(row.get(k)) for k in columns} for row in board["rows"]]
    return atomic_write_csv(path, rows, columns)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def format_table(board: dict[str, Any]) -> str:
    """The printed ranking: overall, then each dataset."""
    lines = []

    def block(title: str, table: Sequence[dict[str, Any]]) -> None:
        lines.append(title)
        width = max([len(t["variant"]) for t in table] + [7])
        lines.append(f"  {'rank':>4}  {'variant':<{width}}  {'score':>6}  jobs")
        for t in table:
            score = f"{t['score']:.4f}" if _finite(t["score"]) else "failed"
            lines.append(f"  {t['rank']:>4}  {t['variant']:<{width}}  {score:>6}  {t['jobs']}")

    block("Overall ranking (test composite, higher is better)", board["overall"])
    if len(board["per_dataset"]) > 1:
        for dataset, table in board["per_dataset"].items():
            block(f"\n{dataset}", table)
    return "\n".join(lines)


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


# --- SVG plots ------------------------------------------------------------------------------


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
    series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str
) -> str:
    """Curves in [0, 1] x [0, 1] (ROC, PR), one colour per series, with a legend."""
    x0, y0, w, h = 50, 25, 300, 240
    body = [f'<text x="{x0}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    body.append(_axes(x0, y0, w, h, xlabel, ylabel, (0, 1), (0, 1)))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(
            f"{x0 + w * float(x):.1f},{y0 + h - h * float(y):.1f}" for x, y in zip(xs, ys)
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


def histogram(normal: Sequence[float], defect: Sequence[float], title: str, bins: int = 20) -> str:
    """Overlaid score histograms of normal (blue) and defective (red) test images."""
    values = np.asarray(list(normal) + list(defect), dtype=float)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(np.asarray(v, dtype=float), edges)[0] for v in (normal, defect)]
    top = max(1, max(int(c.max()) for c in counts))
    x0, y0, w, h = 45, 25, 300, 140
    body = [f'<text x="{x0}" y="16" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    body.append(_axes(x0, y0, w, h, "image score", "images", (lo, hi), (0, top)))
    bw = w / bins
    for colour, c in zip(("#1f77b4", "#d62728"), counts):
        for i, n in enumerate(c):
            if n:
                bh = h * n / top
                body.append(
                    f'<rect x="{x0 + i * bw:.1f}" y="{y0 + h - bh:.1f}" width="{bw:.1f}" '
                    f'height="{bh:.1f}" fill="{colour}" fill-opacity="0.5"/>'
                )
    body.append(
        f'<text x="{x0 + w - 90}" y="{y0 + 12}" font-size="10" fill="#1f77b4">normal</text>'
    )
    body.append(
        f'<text x="{x0 + w - 45}" y="{y0 + 12}" font-size="10" fill="#d62728">defect</text>'
    )
    return _svg(x0 + w + 10, y0 + h + 40, "".join(body), title)


def bar_chart(values: dict[str, float], title: str, unit: str) -> str:
    """Horizontal bars, one per variant."""
    items = [(k, v) for k, v in values.items() if _finite(v)]
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


# --- the page -------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "–"
    return html.escape("" if value is None else str(value))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_html_report(
    board: dict[str, Any],
    results: Sequence[dict[str, Any]],
    run_dir: Path,
    title: str,
    scores: dict[str, list[dict[str, Any]]],
    meta: dict[str, Any],
) -> Path:
    """``scores``: job id -> per-image records (label, score); ``meta``: facts for the header."""
    sections = [f"<h1>{html.escape(title)}</h1>"]
    sections.append(
        "<p>" + " · ".join(f"<b>{html.escape(k)}</b>: {_fmt(v)}" for k, v in meta.items()) + "</p>"
    )
    sections.append("<h2>Leaderboard</h2>")
    sections.append(
        "<p>Composite = 0.3·image AUROC + 0.2·image AP + 0.2·pixel AUROC + 0.2·AUPRO + "
        "0.1·pixel F1-max, renormalized over the metrics a dataset has; mean over categories, "
        "then over datasets. Cost is shown, not scored.</p>"
    )
    sections.append(
        _table(board["overall"], ["rank", "variant", "score", "jobs", "failed"], "board")
    )
    for dataset, table in board["per_dataset"].items():
        sections.append(f"<h3>Dataset {html.escape(dataset)}</h3>")
        sections.append(_table(table, ["rank", "variant", "score", "jobs", "failed"]))
    sections.append("<h2>Per category</h2>")
    for key, table in board["per_category"].items():
        sections.append(f"<h3>{html.escape(key)}</h3>")
        sections.append(_table(table, ["rank", "variant", "score"]))
    sections.append("<h2>All jobs</h2>")
    sections.append(
        "<p>psnr_db, ssim, lpips: reconstruction members only, input against reconstruction on "
        "the test split (PSNR in dB; LPIPS empty where its backbone file is absent).</p>"
    )
    sections.append(
        _table(
            board["rows"],
            [
                "overall_rank",
                "variant",
                "dataset",
                "category",
                "status",
                "composite",
                *METRIC_COLUMNS,
                *COST_COLUMNS,
                *RECONSTRUCTION_COLUMNS,
                "error",
            ],
            "jobs",
        )
    )

    ok = [r for r in results if r.get("status") == "ok"]
    for dataset_category in sorted({(r["dataset"], r["category"]) for r in ok}):
        group = [r for r in ok if (r["dataset"], r["category"]) == dataset_category]
        curves_roc, curves_pr, hists = {}, {}, []
        for r in group:
            records = scores.get(r["job_id"], [])
            if len({x["label"] for x in records}) < 2:
                continue
            name = variant_name(r)
            curves_roc[name] = roc_points(records)
            curves_pr[name] = pr_points(records)
            hists.append(
                histogram(
                    [x["score"] for x in records if x["label"] == 0],
                    [x["score"] for x in records if x["label"] == 1],
                    name,
                )
            )
        if not curves_roc:
            continue
        label = "/".join(dataset_category)
        sections.append(f"<h2>Curves: {html.escape(label)}</h2>")
        sections.append('<div class="row">')
        sections.append(
            line_chart(curves_roc, f"ROC ({label})", "false positive rate", "true positive rate")
        )
        sections.append(line_chart(curves_pr, f"Precision-recall ({label})", "recall", "precision"))
        sections.append("</div>")
        sections.append(f'<h3>Score histograms ({html.escape(label)})</h3><div class="row">')
        sections.extend(hists)
        sections.append("</div>")

    sections.append('<h2>Speed and memory</h2><div class="row">')
    by_variant = {f"{variant_name(r)} ({r['dataset']}/{r['category']})": r["cost"] for r in ok}
    sections.append(
        bar_chart(
            {k: c["images_per_second"] for k, c in by_variant.items()},
            "Inference throughput",
            "img/s",
        )
    )
    sections.append(
        bar_chart({k: c["latency_ms"] for k, c in by_variant.items()}, "Latency per image", "ms")
    )
    sections.append(
        bar_chart({k: c["fit_seconds"] for k, c in by_variant.items()}, "Fit time", "s")
    )
    sections.append(
        bar_chart({k: c["peak_rss_mb"] for k, c in by_variant.items()}, "Peak memory (RSS)", "MiB")
    )
    sections.append("</div>")

    sections.append("<h2>Best and worst cases</h2>")
    for r in ok:
        examples = r.get("examples") or []
        if not examples:
            continue
        sections.append(
            f'<h3>{html.escape(variant_name(r))} — {html.escape(r["dataset"])}/{html.escape(r["category"])}</h3><div class="row">'
        )
        for ex in examples:
            path = run_dir / "jobs" / r["job_id"] / ex["file"]
            if not path.is_file():
                continue
            caption = f"{ex['kind']}: {Path(ex['path']).name} ({ex['defect_type']}, score {ex['score']:.4g})"
            sections.append(
                f'<figure><img src="{_image_uri(path)}" alt="{html.escape(caption)}" width="220">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        sections.append("</div>")

    return atomic_write_text(run_dir / "report.html", html_page(title, sections))


def html_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page of ``sections`` (HTML fragments) with the reports' style."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f3f3f3; }} td:nth-child(2) {{ text-align: left; }}
.row {{ display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }}
figure {{ margin: 0; font-size: 11px; max-width: 230px; }}
</style></head><body>
{"".join(sections)}
</body></html>
"""

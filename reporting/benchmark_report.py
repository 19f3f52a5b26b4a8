"""The benchmark run's HTML report: leaderboard, curves, histograms, cost bars and the best
and worst cases, in one self-contained file (plots are inline SVG, heatmap overlays data URIs)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_text
from metrics.quality import LPIPS_BACKBONE_FILES, MS_SSIM_MIN_SIDE
from reporting.charts import bar_chart, histogram, line_chart, pr_points, roc_points
from reporting.columns import JOB_COLUMNS, variant_name
from reporting.page import html_page, html_table, html_value


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
        "<p>"
        + " · ".join(f"<b>{html.escape(k)}</b>: {html_value(v)}" for k, v in meta.items())
        + "</p>"
    )
    sections.append("<h2>Leaderboard</h2>")
    sections.append(
        "<p>Composite = 0.3·image AUROC + 0.2·image AP + 0.2·pixel AUROC + 0.2·AUPRO + "
        "0.1·pixel F1-max, renormalized over the metrics a dataset has; mean over categories, "
        "then over datasets. Cost is shown, not scored.</p>"
    )
    sections.append(
        html_table(board["overall"], ["rank", "variant", "score", "jobs", "failed"], "board")
    )
    for dataset, table in board["per_dataset"].items():
        sections.append(f"<h3>Dataset {html.escape(dataset)}</h3>")
        sections.append(html_table(table, ["rank", "variant", "score", "jobs", "failed"]))
    sections.append("<h2>Per category</h2>")
    for key, table in board["per_category"].items():
        sections.append(f"<h3>{html.escape(key)}</h3>")
        sections.append(html_table(table, ["rank", "variant", "score"]))
    sections.append("<h2>All jobs</h2>")
    sections.append(
        "<p>val_composite: the composite on the validation split, on which the ensemble "
        "chooses members. psnr_db, ssim, ms_ssim, lpips: reconstruction members only, input "
        "against reconstruction on the test split (PSNR in dB; MS-SSIM empty for images of at "
        f"most {MS_SSIM_MIN_SIDE} px a side; LPIPS empty where its backbone file is absent: put "
        f"{LPIPS_BACKBONE_FILES['alex']} into backbones/).</p>"
    )
    sections.append(html_table(board["rows"], [*JOB_COLUMNS, "error"], "jobs"))

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

"""The ensemble's HTML report: the hybrid against its members, grading, and cost."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from data.io import atomic_write_text
from pipelines.report import _table, bar_chart, histogram, html_page, line_chart, roc_points


def write_hybrid_report(results: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Path:
    sections = [
        "<h1>Hybrid report</h1>",
        f"<p><b>run</b>: {html.escape(results['run'])} · <b>data</b>: "
        f"{html.escape(results['dataset'])}/{html.escape(results['category'])} · "
        f"<b>members</b>: {html.escape(', '.join(results['members']))} · <b>fusion</b>: "
        f"{html.escape(str(results['fusion']))}</p>",
        "<h2>Detection: the hybrid against each member (test split)</h2>",
    ]
    columns = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"]
    rows = [{"detector": name, **values} for name, values in results["metrics"].items()]
    sections.append(_table(rows, ["detector", *columns]))
    point = results["operating_point"]
    sections.append("<h2>Operating point (test split)</h2>")
    sections.append(
        f"<p>Image threshold rule: {html.escape(str(point['operating_point']))} (false-alarm "
        f"budget {point['false_alarm_rate_budget']:.2%} of held-out defect-free images). "
        "What it did on the test images:</p>"
    )
    sections.append(
        _table(
            [point],
            ["false_alarm_rate", "miss_rate", "normal_images", "defective_images"],
        )
    )
    level_rows = [
        {"level given to a defect-free test image": level, "images": count}
        for level, count in point["levels_of_normal_images"].items()
    ]
    sections.append(_table(level_rows, ["level given to a defect-free test image", "images"]))
    grading = results["grading"]
    sections.append("<h2>Grading</h2>")
    sections.append(
        "<p>On the true defect regions (the grading stage alone) and end to end (regions the "
        "hybrid found, matched to the defect they overlap most). Unknown types count as wrong."
        "</p>"
    )
    grade_rows = [
        {"view": view, **grading[view]} for view in ("stage_on_true_regions", "end_to_end")
    ]
    sections.append(
        _table(grade_rows, ["view", "level_accuracy", "level_within_one", "type_macro_f1", "n"])
    )
    facts = {k: v for k, v in grading.items() if not isinstance(v, dict)}
    sections.append(_table([facts], list(facts)))
    sections.append("<h2>Validation and grader choice</h2>")
    validation = {k: v for k, v in results["validation"].items() if not isinstance(v, dict)}
    sections.append(_table([validation], list(validation)))
    choices = results["validation"].get("fusion_choice") or {}
    choice_rows = [
        {
            "level": level,
            "chosen": c["chosen"],
            "chosen on": c["chosen_on"],
            **{f"cv AUROC {k}": v for k, v in c["cv_auroc"].items()},
        }
        for level, c in choices.items()
        if c
    ]
    if choice_rows:
        sections.append(
            "<p>The auto combiner's choice at each level: cross-validated AUROC of every "
            "candidate on the fusion data (not test).</p>"
        )
        sections.append(_table(choice_rows, list(choice_rows[0])))
    sections.append(_table([results["grader"]], list(results["grader"])))
    sections.append('<h2>Scores</h2><div class="row">')
    sections.append(
        line_chart(
            {"hybrid": roc_points(records)},
            "ROC (hybrid)",
            "false positive rate",
            "true positive rate",
        )
    )
    sections.append(
        histogram(
            [r["score"] for r in records if r["label"] == 0],
            [r["score"] for r in records if r["label"] == 1],
            "hybrid score",
        )
    )
    sections.append("</div><h2>Inference cost</h2>")
    cost = {k: v for k, v in results["cost"].items() if k.endswith("_ms")}
    if cost:
        sections.append(bar_chart(cost, "Milliseconds per image", "ms"))
    sections.append(_table([results["cost"]], list(results["cost"])))
    return atomic_write_text(path, html_page("Hybrid report", sections))

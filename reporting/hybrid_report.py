"""The ensemble's HTML report: the hybrid against its members, grading, and cost."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_text
from metrics.detection import FALSE_ALARM_BUDGETS, miss_rate_curve, miss_rate_key
from reporting.charts import bar_chart, histogram, line_chart, roc_points
from reporting.page import REPORT_CSS, gallery_card, html_page, html_table, html_value
from reporting.quality import QUALITY_FIGURES, quality_sections

# Names of ``metrics.quality.reconstruction_figures``' figures in the report.
RECONSTRUCTION_NAMES = {
    "psnr_db": "PSNR (dB)",
    "ssim": "SSIM",
    "ms_ssim": "MS-SSIM",
    "lpips": "LPIPS",
}


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
    sections.append(html_table(rows, ["detector", *columns]))
    sections.extend(_interval_sections(results.get("intervals")))
    point = results["operating_point"]
    sections.append("<h2>Operating point (test split)</h2>")
    sections.append(
        f"<p>Image threshold rule: {html.escape(str(point['operating_point']))} (false-alarm "
        f"budget {point['false_alarm_rate_budget']:.2%} of held-out defect-free images). "
        "What it did on the test images:</p>"
    )
    sections.append(
        html_table(
            [_with_intervals(point, ("false_alarm_rate", "miss_rate"))],
            ["false_alarm_rate", "miss_rate", "normal_images", "defective_images"],
        )
    )
    sections.extend(_miss_rate_sections(results, records))
    sections.extend(_review_sections(results))
    level_rows = [
        {"level given to a defect-free test image": level, "images": count}
        for level, count in point["levels_of_normal_images"].items()
    ]
    sections.append(html_table(level_rows, ["level given to a defect-free test image", "images"]))
    grading = results["grading"]
    sections.append("<h2>Grading</h2>")
    sections.append(
        "<p>On the true defect regions (the grading stage alone) and end to end (regions the "
        "hybrid found, matched to the defect they overlap most). Unknown types count as wrong."
        "</p>"
    )
    sections.extend(_grading_sections(grading))
    unseen = results.get("unseen_panels")
    if unseen:
        sections.append(f"<h2>Unseen panels: {html.escape(unseen['split'])}</h2>")
        sections.append(
            f"<p>The saved hybrid on {unseen['images']} new panels of the same generator "
            "parameters and a seed nothing was fitted or chosen on; every defect's type and "
            "level is known.</p>"
        )
        sections.append(html_table([unseen["metrics"]], list(unseen["metrics"])))
        sections.extend(_grading_sections(unseen["grading"]))
    sections.extend(_quality_sections(results, records))
    sections.extend(_membership_sections(results))
    sections.append("<h2>Validation and grader choice</h2>")
    validation = {k: v for k, v in results["validation"].items() if not isinstance(v, dict)}
    sections.append(html_table([validation], list(validation)))
    choices = results["validation"].get("fusion_choice") or {}
    choice_rows = [
        {
            "level": level,
            "chosen": c["chosen"],
            "chosen on": c["chosen_on"],
            "chosen by": c.get("chosen_by", "AUROC"),
            **{f"cv AUROC {k}": v for k, v in c["cv_auroc"].items()},
            **{f"cv AUPRO {k}": v for k, v in c.get("cv_aupro", {}).items()},
        }
        for level, c in choices.items()
        if c
    ]
    if choice_rows:
        sections.append(
            "<p>The choosing combiner's choice at each level: cross-validated AUROC (and, for "
            "pixels, AUPRO) of every candidate on the fusion data (not test).</p>"
        )
        # Pixels have AUPRO columns that images do not: every row's columns, in order.
        columns = list(dict.fromkeys(k for row in choice_rows for k in row))
        sections.append(html_table(choice_rows, columns))
    folds = (results.get("cross_validation") or {}).get("fold_choices") or []
    if any(c for fold in folds for c in fold.values()):
        sections.append(
            "<p>What each cross-validation fold's choosing combiners chose (out-of-fold scores "
            "pool these folds' answers).</p>"
        )
        fold_rows = [{"fold": k + 1, **fold} for k, fold in enumerate(folds)]
        sections.append(html_table(fold_rows, list(fold_rows[0])))
    sections.append(html_table([results["grader"]], list(results["grader"])))
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
    sections.append(html_table([results["cost"]], list(results["cost"])))
    return atomic_write_text(path, html_page("Hybrid report", sections, REPORT_CSS))


def _confusion_table(table: dict[str, dict[str, int]], true_name: str) -> str:
    predicted = sorted({p for row in table.values() for p in row})
    rows = [{true_name: t, **{p: row.get(p, 0) for p in predicted}} for t, row in table.items()]
    return html_table(rows, [true_name, *predicted])


def _grading_sections(grading: dict[str, Any]) -> list[str]:
    """Level and type accuracy, recall per true level, the confusion matrices, measurement
    errors and median levels."""
    views = [{"view": v, **grading[v]} for v in ("stage_on_true_regions", "end_to_end")]
    facts = {k: v for k, v in grading.items() if not isinstance(v, dict)}
    out = [
        html_table(views, ["view", "level_accuracy", "level_within_one", "type_macro_f1", "n"]),
        html_table([facts], list(facts)),
    ]
    recall = grading.get("detection_recall_by_level") or {}
    no_levels = "no test defect has a true level (real datasets label defects without one)"
    if recall:
        out.append("<h3>Defects found, per true level (end to end)</h3>")
        out.append(
            html_table(
                [{"true level": level, "recall": value} for level, value in recall.items()],
                ["true level", "recall"],
            )
        )
    else:
        out.append(f"<p>Defects found per true level: left out, {no_levels}.</p>")
    if grading.get("level_confusion"):
        out.append("<h3>Level confusion (rows: true level, columns: given level)</h3>")
        out.append(_confusion_table(grading["level_confusion"], "true level"))
    else:
        out.append(f"<p>Level confusion: left out, {no_levels}.</p>")
    if grading.get("type_confusion"):
        out.append("<h3>Type confusion (rows: true type, columns: given type)</h3>")
        out.append(_confusion_table(grading["type_confusion"], "true type"))
    else:
        out.append("<p>Type confusion: left out, no region was matched to a typed defect.</p>")
    measurement = grading.get("measurement") or {}
    rows = [
        {
            "regions": view,
            "figure": key,
            "n": figures["n"],
            "median |relative error|": figures["median_abs_relative_error"],
            "median relative error (bias)": figures["median_relative_error"],
        }
        for view, by_key in measurement.items()
        for key, figures in by_key.items()
    ]
    if rows:
        out.append("<h3>Measured area and contrast against the truth</h3>")
        out.append(html_table(rows, list(rows[0])))
    else:
        out.append(
            "<p>Measured area and contrast: left out, no region has a measured truth to "
            "compare with.</p>"
        )
    medians = grading.get("median_level_by_true_level") or {}
    if medians:
        out.append("<h3>Median level given to the images of each true level</h3>")
        out.append(
            html_table(
                [{"true level": k, "median level given": v} for k, v in medians.items()],
                ["true level", "median level given"],
            )
        )
    else:
        out.append(f"<p>Median level per true level: left out, {no_levels}.</p>")
    return out


def _review_sections(results: dict[str, Any]) -> list[str]:
    """The worst misses and the false alarms at the operating point, as a gallery of their
    overlays (``evaluation.review``)."""
    review = results.get("review")
    if not review:
        return []
    counts, cases = review["counts"], review["cases"]
    out = [
        f"<h2>Test images to review ({html.escape(str(review.get('split', 'test')))})</h2>",
        f"<p>At the operating point, {counts['missed']} defective test image(s) were missed and "
        f"{counts['false alarm']} defect-free one(s) flagged. Shown: the worst misses (lowest "
        "score first) and the false alarms (highest score first), at most "
        f"{review['per_kind']} of each. Each overlay is the hybrid's map over the image, with "
        "the pixel threshold's contour in white, the regions found in magenta boxes labelled "
        "with type and level, and the true mask's outline in green; each thumbnail opens it.</p>",
    ]
    if not any(counts.values()):
        out.append(
            "<p>Nothing to review: no defective image was missed and no defect-free one "
            "flagged.</p>"
        )
        return out
    for kind, title in (("missed", "Missed defects"), ("false alarm", "False alarms")):
        shown = [c for c in cases if c["kind"] == kind]
        if not shown:
            out.append(f"<p>{title}: none.</p>")
            continue
        cards = [
            gallery_card(
                case["overlay"],
                f"overlay of {Path(case['path']).name}",
                f"<b>{html.escape(Path(case['path']).name)}</b><br>score "
                f"{html_value(case['score'])} · level {html_value(case['level'])} · "
                + (html.escape(", ".join(case["regions"])) or "no region found"),
            )
            for case in shown
        ]
        out.append(f'<h3>{title}</h3><div class="row gallery">{"".join(cards)}</div>')
    return out


def _quality_sections(results: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """Each test image's panel quality and, per member that reconstructs images, how closely it
    does (``evaluation.scoring.evaluate_hybrid``'s records)."""
    quality = results.get("quality")
    if not quality or not records:
        return []
    figures = dict(QUALITY_FIGURES)
    for member in quality["reconstructing_members"]:
        figures.update(
            {f"{member} {key}": f"{member} {name}" for key, name in RECONSTRUCTION_NAMES.items()}
        )
    columns = {
        "truth": lambda r: "defective" if r["label"] else "defect-free",
        "flagged": lambda r: "yes" if r.get("flagged") == 1 else "no",
        "level": lambda r: r.get("level"),
    }
    out = quality_sections(
        records, figures, columns, "each test image (at its own size, after the intensity window)"
    )
    if quality.get("reconstruction_unavailable"):
        out.append(
            "<p>PSNR, SSIM, MS-SSIM and LPIPS: left out, "
            f"{html.escape(quality['reconstruction_unavailable'])}.</p>"
        )
    elif not quality["reconstructing_members"]:
        out.append(
            "<p>PSNR, SSIM, MS-SSIM and LPIPS: left out, no member of this hybrid reconstructs "
            "its input (autoencoder, vae and draem do); they compare an image with its "
            "reconstruction.</p>"
        )
    else:
        out.append(
            "<p>PSNR (dB), SSIM and MS-SSIM (higher: closer) and LPIPS (lower: closer) compare "
            "each image, as the members take it (their input size, three channels), with the "
            "named member's reconstruction of it.</p>"
        )
        if quality.get("lpips_unavailable"):
            out.append(f"<p>LPIPS: left out, {html.escape(quality['lpips_unavailable'])}.</p>")
    return out


def interval_caption(intervals: dict[str, Any]) -> str:
    """What the intervals are, in a few words."""
    return (
        f"{intervals['confidence']:.0%} paired bootstrap intervals over "
        f"{intervals['images']} images ({intervals['resamples']} resamples)"
    )


def difference_rows(intervals: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per member, per metric: the reference's (the hybrid's) lead, its interval and verdict."""
    rows = {}
    for member, metrics in intervals.get("differences", {}).items():
        rows[member] = {}
        for metric, entry in metrics.items():
            low, high = entry["interval"]
            point = f"{entry['difference']:+.4f} " if "difference" in entry else ""
            rows[member][metric] = f"{point}[{low:+.4f}, {high:+.4f}] {entry['verdict']}"
    return rows


def _interval_sections(intervals: dict[str, Any] | None) -> list[str]:
    if not intervals:
        return []
    sections = [
        f"<p>How far these figures could move on another draw of test images: "
        f"{html.escape(interval_caption(intervals))}; {html.escape(intervals['pixels'])}.</p>"
    ]
    rows = [
        {"detector": name, **{m: f"[{lo:.4f}, {hi:.4f}]" for m, (lo, hi) in values.items()}}
        for name, values in intervals["intervals"].items()
    ]
    sections.append(html_table(rows, ["detector", *next(iter(intervals["intervals"].values()))]))
    differences = difference_rows(intervals)
    if differences:
        sections.append(
            f"<p>The {html.escape(intervals['reference'])} minus each member: the difference, its "
            "interval, and <i>higher</i> or <i>lower</i> where the interval excludes zero.</p>"
        )
        rows = [{"member": name, **row} for name, row in differences.items()]
        sections.append(html_table(rows, list(rows[0])))
    return sections


def _with_intervals(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``row`` with each of ``keys`` written with its ``<key>_interval``, as percentages."""
    out = dict(row)
    for key in keys:
        interval = row.get(f"{key}_interval")
        if interval and row.get(key) is not None:
            out[key] = f"{row[key]:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
    return out


def _miss_rate_sections(results: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The miss rate against the false-alarm rate on test (every detector's curve, the budget
    marked) and the miss rates at the reported budgets with their intervals."""
    labels = [r["label"] for r in records]
    if set(labels) != {0, 1}:
        return []
    budget = results["operating_point"]["false_alarm_rate_budget"]
    detectors = ["hybrid", *(m for m in results["metrics"] if m != "hybrid")]
    series = {}
    for name in detectors:
        key = "score" if name == "hybrid" else f"score_{name}"
        if all(key in r for r in records):
            series[name] = miss_rate_curve([r[key] for r in records], labels)
    intervals = (results.get("intervals") or {}).get("intervals", {})
    rows = []
    for name in detectors:
        row = {"detector": name}
        for b in FALSE_ALARM_BUDGETS:
            key = miss_rate_key(b)
            value = results["metrics"][name].get(key)
            span = intervals.get(name, {}).get(key)
            row[f"missed at {b:.0%} false alarms"] = (
                None
                if value is None
                else f"{value:.1%}" + (f" [{span[0]:.1%}, {span[1]:.1%}]" if span else "")
            )
        rows.append(row)
    return [
        "<h3>Missed defects against false alarms (test split)</h3>",
        "<p>Each curve is a detector's share of defective test images missed against the share "
        "of defect-free ones flagged, as its threshold moves; the dashed line is the "
        "false-alarm budget (<code>grading.false_alarm_rate</code>). Choose the budget where "
        "the line can live with the false alarms; the table reads the curves at three budgets, "
        "with paired bootstrap intervals.</p>",
        '<div class="row">'
        + line_chart(
            series,
            "Miss rate against false-alarm rate",
            "false-alarm rate (defect-free images flagged)",
            "miss rate (defective images passed)",
            x_max=max(0.2, 2 * budget),
            marks={f"budget {budget:.0%}": budget},
        )
        + "</div>",
        html_table(rows, list(rows[0])),
    ]


def _membership_sections(results: dict[str, Any]) -> list[str]:
    """Which members the hybrid kept and why (forward selection, level by level), what each
    kept member adds on test, and the supervised member against a logistic regression."""
    out = ["<h2>Members: who is in, and what each adds</h2>"]
    out.append(
        f"<p>Kept in the saved hybrid: {html.escape(', '.join(results['kept_members']))}.</p>"
    )
    selection = results.get("member_selection")
    if selection:
        out.append(
            "<p>Forward selection on the fusion data (not test), chosen on "
            f"{html.escape(selection['chosen_on'])}, each member's scores ranked out of fold: "
            "the best member alone enters first; a member then enters, with a weight, only "
            "where it raises the figure. The steps are the path on all rows; the weights are "
            "bagged over bootstrap draws of the rows (each member's mean weight; a member "
            "entering fewer than one draw in five is left out).</p>"
        )
        for level in ("image", "pixel"):
            if level not in selection:
                continue
            entry = selection[level]
            steps = [
                {
                    "step": k + 1,
                    "entered": step["member"],
                    "weight then": step["weight"],
                    entry["chosen_by"]: step["figure"],
                }
                for k, step in enumerate(entry["steps"])
            ]
            out.append(
                f"<h3>{level.capitalize()} level ({html.escape(entry['chosen_by'])}): weights "
                f"{html.escape(', '.join(f'{k} {v:.2f}' for k, v in entry['weights'].items()))}"
                "</h3>"
            )
            if steps:
                out.append(html_table(steps, list(steps[0])))
                alone = entry["steps"][0].get("alone", {})
                left = entry["steps"][-1].get("not_entered", {})
                shares = entry.get("entered_share") or {}
                rows = [
                    {
                        "member": name,
                        "figure alone": value,
                        "best figure had it entered last": left.get(name),
                        "share of bootstrap draws it entered": shares.get(name),
                        "weight": entry["weights"].get(name, 0.0),
                    }
                    for name, value in alone.items()
                ]
                out.append(html_table(rows, list(rows[0])))
    contributions = dict(results.get("contributions") or {})
    split = contributions.pop("split", "test")
    rows = []
    for name, entry in contributions.items():
        row = {"member": name}
        for metric, d in (entry.get("hybrid_minus_without") or {}).items():
            if metric in ("image_auroc", "image_ap", "aupro", "pixel_auroc"):
                point = f"{d['difference']:+.4f} " if "difference" in d else ""
                row[metric] = (
                    f"{point}[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] {d['verdict']}"
                )
        rows.append(row)
    if rows:
        out.append(
            f"<p>What each kept member adds on {html.escape(split)}: the hybrid minus the "
            "hybrid without it (its weight set to 0), with the paired bootstrap interval.</p>"
        )
        out.append(html_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    supervised = results.get("supervised") or {}
    if "metrics" in supervised:
        lead = supervised["intervals"]["differences"]["logistic_pooled"]
        rows = [{"detector": name, **values} for name, values in supervised["metrics"].items()]
        out.append("<h3>The supervised member against a logistic regression</h3>")
        out.append(
            f"<p>{html.escape(supervised['baseline'])}; {html.escape(supervised['split'])}. "
            "The supervised member's lead in image AUROC: "
            f"[{lead['image_auroc']['interval'][0]:+.4f}, "
            f"{lead['image_auroc']['interval'][1]:+.4f}] {lead['image_auroc']['verdict']}.</p>"
        )
        out.append(html_table(rows, ["detector", "image_auroc", "image_ap"]))
    elif supervised.get("skipped"):
        out.append(
            f"<p>The supervised member took no part: {html.escape(supervised['skipped'])}.</p>"
        )
    return out

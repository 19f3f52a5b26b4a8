"""Leaderboard ranking and the HTML report (opened in a real headless browser)."""

import csv
import math
import subprocess

import numpy as np
import pytest

from experiments.ranking import format_table, leaderboard, write_leaderboard_csv
from metrics.composite import composite
from reporting.benchmark_report import write_html_report
from tests.helpers import browser_flags, find_browser


def result(member, dataset="synthetic", category="panel", status="ok", **metrics):
    base = {
        "job_id": f"{dataset}-{category}-{member}",
        "dataset": dataset,
        "category": category,
        "member": member,
        "backbone": "efficientnet_lite0",
        "image_size": 256,
        "tiling": False,
        "status": status,
    }
    if status != "ok":
        return {**base, "error": "boom"}
    cost = {
        "fit_seconds": 3.0,
        "images_per_second": 20.0,
        "latency_ms": 50.0,
        "peak_rss_mb": 900.0,
        "model_bytes": 10_000,
    }
    return {**base, "metrics": metrics, "cost": cost, "examples": []}


def test_composite_renormalizes_over_present_metrics():
    full = {
        "image_auroc": 1.0,
        "image_ap": 1.0,
        "pixel_auroc": 0.5,
        "aupro": 0.5,
        "pixel_f1_max": 0.5,
    }
    assert composite(full) == pytest.approx(0.3 + 0.2 + 0.1 + 0.1 + 0.05)
    # An image-level-only dataset: the pixel metrics are absent, not zero.
    assert composite({"image_auroc": 0.8, "image_ap": 0.6}) == pytest.approx((0.24 + 0.12) / 0.5)
    assert math.isnan(composite({}))


def test_ranking_per_dataset_overall_and_per_category():
    results = [
        result("a", image_auroc=0.9, image_ap=0.9),
        result("b", image_auroc=0.7, image_ap=0.7),
        result("a", dataset="other", image_auroc=0.6, image_ap=0.6),
        result("b", dataset="other", image_auroc=0.95, image_ap=0.95),
        result("c", status="failed"),
    ]
    board = leaderboard(results)
    overall = {t["variant"].split(" / ")[0]: t for t in board["overall"]}
    # a: mean(0.9, 0.6) = 0.75; b: mean(0.7, 0.95) = 0.825; c failed -> last.
    assert overall["b"]["rank"] == 1 and overall["a"]["rank"] == 2 and overall["c"]["rank"] == 3
    assert overall["b"]["score"] == pytest.approx(0.825)
    assert board["per_dataset"]["synthetic"][0]["variant"].startswith("a")
    assert board["per_dataset"]["other"][0]["variant"].startswith("b")
    assert set(board["per_category"]) == {"synthetic/panel", "other/panel"}
    text = format_table(board)
    assert text.index("b / ") < text.index("a / ") and "failed" in text


def test_csv_and_html_are_written(tmp_path):
    rng = np.random.default_rng(0)
    results = [result("a", image_auroc=0.9, image_ap=0.8), result("b", status="failed")]
    results[0]["reconstruction_quality"] = {"split": "test", "psnr_db": 31.25, "lpips": None}
    board = leaderboard(results)
    csv_path = write_leaderboard_csv(board, tmp_path / "leaderboard.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("overall_rank,variant") and len(lines) == 3
    rows = list(csv.DictReader(lines))
    assert rows[0]["psnr_db"] == "31.25" and rows[0]["lpips"] == "" and rows[1]["psnr_db"] == ""
    records = [{"label": int(i % 2), "score": float(rng.random() + i % 2)} for i in range(20)]
    report = write_html_report(
        board, results, tmp_path, "Test report", {"synthetic-panel-a": records}, {"run": "x"}
    )
    page = report.read_text()
    assert page.count("<svg") >= 4  # ROC, PR, histogram, cost bars
    assert "Leaderboard" in page and "boom" in page


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium installed (.ci/run installs Debian's chromium); cannot open the report"
        )
    rng = np.random.default_rng(1)
    results = [result("a", image_auroc=0.9, image_ap=0.8, pixel_auroc=0.95, aupro=0.7)]
    records = [{"label": int(i % 2), "score": float(rng.random() + i % 2)} for i in range(30)]
    report = write_html_report(
        leaderboard(results),
        results,
        tmp_path,
        "Browser check",
        {"synthetic-panel-a": records},
        {"run": "x"},
    )
    flags = browser_flags(tmp_path / "profile")
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "<svg" in dom.stdout and "Browser check" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 5000

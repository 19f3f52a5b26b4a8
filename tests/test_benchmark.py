"""pipelines.benchmark: a small run end to end, resuming, a failing job, and --init-from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import benchmark
from pipelines.common import PARTIAL_FAILURE

pytestmark = pytest.mark.slow


def tiny(root: Path, *extra: str) -> list[str]:
    sets = [
        f"output_dir={root}",
        f"synthetic.cache_dir={root / 'cache'}",
        "synthetic.n_train=12",
        "synthetic.n_test=8",
        "synthetic.size=64",
        "data.image_size=64",
        "benchmark.n_examples=2",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_a_run_resumes_records_failures_and_starts_from_other_weights(tmp_path, capsys):
    args = [*tiny(tmp_path), "--members", "patchcore,padim", "--run-name", "run"]
    # PaDiM asked for more channels than its layers have: that job fails, the other goes on.
    failing = [*args, "--set", "members.padim.n_features=100000"]
    assert benchmark.main(failing) == PARTIAL_FAILURE  # a scheduler sees the failed job
    run = tmp_path / "run"
    results = {r["member"]: r for r in json.loads((run / "results.json").read_text())["jobs"]}
    assert results["padim"]["status"] == "failed" and "n_features" in results["padim"]["error"]
    good = results["patchcore"]
    assert good["status"] == "ok"
    job = run / "jobs" / good["job_id"]
    for name in ("config.json", "log.txt", "results.json", "scores.csv", "weights"):
        assert (job / name).exists(), name
    assert {"image_auroc", "image_ap", "pixel_auroc", "aupro", "pixel_f1_max"} <= set(
        good["metrics"]
    )
    assert {"fit_seconds", "images_per_second", "latency_ms", "peak_rss_mb", "model_bytes"} <= set(
        good["cost"]
    )
    assert good["cost"]["backbone_images_per_second"] > 0  # the ceiling, measured beside it
    assert good["cost"]["head_ms_per_image"] > 0  # and the member's head after it
    # Validation figures (held-out normals and injected defects) are what ensemble chooses on;
    # every figure names its split.
    assert 0 <= good["validation_metrics"]["image_auroc"] <= 1
    assert good["splits"]["metrics"].startswith("test")
    assert good["splits"]["validation_metrics"].startswith("val")
    # Each test figure's bootstrap interval holds it (percentile intervals of a resampled
    # figure; pixel ones from a pixel sample, within 0.005).
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
        low, high = good["intervals"]["intervals"][key]
        assert low - 0.005 <= good["metrics"][key] <= high + 0.005, key
    assert "patchcore" in capsys.readouterr().out  # the printed ranking
    for name in ("leaderboard.csv", "report.html"):
        assert (run / name).is_file()
    # The best and worst cases' overlays: a defective image's true mask outlined in green.
    assert {e["label"] for e in good["examples"]} == {0, 1}
    for example in good["examples"]:
        with Image.open(job / example["file"]) as overlay:
            green = np.all(np.asarray(overlay.convert("RGB")) == (0, 255, 0), axis=-1)
        assert green.any() == (example["label"] == 1), example
    low, high = good["intervals"]["intervals"]["image_auroc"]
    assert f"{low:.3f}-{high:.3f}" in (run / "leaderboard.csv").read_text()

    # The same command again (without the fault): the finished job is skipped, the failed one
    # runs again.
    stamp = (job / "results.json").stat().st_mtime_ns
    assert benchmark.main(args) == 0
    assert (job / "results.json").stat().st_mtime_ns == stamp
    results = {r["member"]: r for r in json.loads((run / "results.json").read_text())["jobs"]}
    assert results["padim"]["status"] == "ok"
    # An interrupted job (no complete results) is redone.
    os.remove(job / "results.json")
    assert benchmark.main(args) == 0
    assert json.loads((job / "results.json").read_text())["status"] == "ok"

    # Another run starting from this run's weights.
    init = [*tiny(tmp_path), "--members", "patchcore", "--run-name", "again"]
    assert benchmark.main([*init, "--init-from", str(job / "weights")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["jobs"][0]
    assert again["status"] == "ok"
    wrong = [*tiny(tmp_path), "--members", "padim", "--run-name", "wrong"]
    assert benchmark.main([*wrong, "--init-from", str(job / "weights")]) == 1  # all failed
    assert "patchcore" in capsys.readouterr().err

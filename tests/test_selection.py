"""Choosing a hybrid's members: on validation figures, never on test metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from artifacts.io import atomic_write_json, write_manifest
from data.sources import DataSource, recorded_source
from experiments.job_folder import JOB_FILE, RESULTS_FILE
from experiments.selection import select_members
from metrics.composite import composite

GOOD = {"image_auroc": 0.95, "image_ap": 0.95, "pixel_auroc": 0.95, "aupro": 0.9}
POOR = {"image_auroc": 0.70, "image_ap": 0.70, "pixel_auroc": 0.70, "aupro": 0.5}


def finished_job(run: Path, member: str, test: dict, validation: dict | None) -> None:
    job = run / "jobs" / f"synthetic-panels-{member}-64px"
    (job / "weights").mkdir(parents=True)
    (job / "weights" / "weights.pt").write_bytes(member.encode())
    write_manifest(job / "weights")
    data = run.parent / "data"  # the run's data: selection checks that it is there
    data.mkdir(exist_ok=True)
    source = DataSource("synthetic", "mvtec", data, ("panels",), 64)
    spec = {"source": recorded_source(source, job), "tiling": {"enabled": False}}
    atomic_write_json(job / JOB_FILE, {**spec, "seed": 0})
    results = {
        "status": "ok",
        "job_id": job.name,
        "dataset": "synthetic",
        "category": "panels",
        "member": member,
        "image_size": 64,
        "tiling": False,
        "metrics": test,
        "cost": {},
    }
    if validation is not None:
        results["validation_metrics"] = validation
    atomic_write_json(job / RESULTS_FILE, results)


def test_members_are_chosen_on_validation_figures_when_test_disagrees(tmp_path):
    # On test, patchcore is far better; on validation, padim is. Selection must follow
    # validation: choosing on test would leak the split the hybrid is judged on.
    finished_job(tmp_path, "patchcore", test=GOOD, validation=POOR)
    finished_job(tmp_path, "padim", test=POOR, validation=GOOD)
    chosen = select_members(tmp_path, top_k=1)
    assert [job["member"] for job in chosen.jobs] == ["padim"]
    assert chosen.jobs[0]["criterion_value"] == pytest.approx(composite(GOOD))
    by_auroc = select_members(tmp_path, top_k=2, criterion="image_auroc")
    assert [job["member"] for job in by_auroc.jobs] == ["padim", "patchcore"]
    assert by_auroc.jobs[1]["criterion_value"] == POOR["image_auroc"]


def test_a_job_without_validation_figures_is_refused_with_the_reason(tmp_path):
    finished_job(tmp_path, "patchcore", test=GOOD, validation=None)
    with pytest.raises(ValueError, match="no validation figures"):
        select_members(tmp_path, top_k=1)

"""A job's folder: what it holds, when the job is finished, and reading its results back.

A job folder holds ``job.json`` (what to run), the resolved ``config.json``, ``log.txt``,
``history.csv``, ``checkpoints/``, ``weights/``, ``scores.csv``, ``examples/`` and, last,
``results.json``: a job is finished when that file says ``ok`` and the weights it names verify
against their manifest.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from artifacts.io import ArtifactError, verify_manifest

JOB_FILE = "job.json"
RESULTS_FILE = "results.json"
REQUIRED_RESULTS = ("status", "metrics", "cost", "member", "dataset", "category")
# scores.csv: one row per test image.
SCORE_COLUMNS = ("path", "label", "defect_type", "score")


def job_is_complete(job_dir: Path) -> bool:
    """``results.json`` says ok, has every field, and the saved weights verify."""
    path = job_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if results.get("status") != "ok" or any(k not in results for k in REQUIRED_RESULTS):
        return False
    try:
        verify_manifest(job_dir / "weights")
    except ArtifactError:
        return False
    return True


def read_results(job_dir: Path) -> dict[str, Any] | None:
    """``results.json`` of a job, or None when it is missing or unreadable."""
    try:
        return json.loads((job_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_scores(job_dir: Path) -> list[dict[str, Any]]:
    """The per-image test scores of a job that has results (none otherwise)."""
    if read_results(job_dir) is None or not (job_dir / "scores.csv").is_file():
        return []
    with open(job_dir / "scores.csv") as fh:
        return [
            {**r, "label": int(r["label"]), "score": float(r["score"])} for r in csv.DictReader(fh)
        ]

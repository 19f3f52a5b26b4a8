"""Choosing a hybrid's members from a benchmark run, and the data they were benchmarked on.

Members are chosen on their validation figures (the ``val`` split: held-out normal images and
copies with injected defects), never on test metrics: the hybrid is judged on the test split.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.sources import DataSource, source_from_record
from experiments.job_folder import JOB_FILE, job_is_complete, read_results
from metrics.composite import composite

CRITERIA = ("composite", "image_auroc", "pixel_auroc", "aupro")


@dataclass
class Selection:
    dataset: str
    category: str
    image_size: int | list[int] | None
    tiling: dict[str, Any] | None
    source: DataSource
    seed: int
    jobs: list[dict[str, Any]]  # chosen results, best first, each with its "criterion_value"
    candidates: list[dict[str, Any]]  # every finished job of the group, ranked

    def weights(self, run_dir: Path) -> dict[str, Path]:
        return {job["member"]: run_dir / "jobs" / job["job_id"] / "weights" for job in self.jobs}


def select_members(
    run_dir: Path,
    dataset: str | None = None,
    category: str | None = None,
    members: Sequence[str] = (),
    top_k: int = 3,
    criterion: str = "composite",
) -> Selection:
    """The finished jobs of one (dataset, category, image size, tiling) group of ``run_dir``:
    the named ``members``, or the ``top_k`` by ``criterion`` on the validation split (one job
    per member)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    jobs_dir = Path(run_dir) / "jobs"
    if not jobs_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a benchmark run folder (no jobs/ inside)")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for job_dir in sorted(p for p in jobs_dir.iterdir() if p.is_dir()):
        if not job_is_complete(job_dir):
            continue
        results = read_results(job_dir)
        if dataset not in (None, results["dataset"]) or category not in (None, results["category"]):
            continue
        validation = results.get("validation_metrics")
        if validation is None:
            raise ValueError(
                f"{job_dir}: no validation figures (a job from before members were chosen on "
                "validation data); run the benchmark again to choose members honestly"
            )
        value = (
            composite(validation)
            if criterion == "composite"
            else validation.get(criterion, float("nan"))
        )
        results = {**results, "criterion_value": value}
        size = results["image_size"]  # [height, width] from JSON: a tuple, to key the group
        size = tuple(size) if isinstance(size, list) else size
        key = (results["dataset"], results["category"], size, results["tiling"])
        groups[key].append(results)
    if not groups:
        raise ValueError(
            f"{run_dir}: no finished job for dataset={dataset or 'any'}, "
            f"category={category or 'any'}"
        )
    key = next(iter(sorted(groups, key=str)))
    ranked = sorted(
        groups[key],
        key=lambda r: -r["criterion_value"] if r["criterion_value"] == r["criterion_value"] else 1,
    )
    best_per_member: dict[str, dict[str, Any]] = {}
    for results in ranked:
        best_per_member.setdefault(results["member"], results)
    if members:
        missing = sorted(set(members) - set(best_per_member))
        if missing:
            raise ValueError(
                f"{run_dir}: no finished job for member(s) {missing} in {key[0]}/{key[1]}; "
                f"finished: {sorted(best_per_member)}"
            )
        chosen = [best_per_member[m] for m in members]
    else:
        chosen = list(best_per_member.values())[:top_k]
    spec = json.loads((jobs_dir / chosen[0]["job_id"] / JOB_FILE).read_text())
    source = source_from_record(spec["source"], (jobs_dir / chosen[0]["job_id"]))
    tiling = spec["tiling"] if spec["tiling"]["enabled"] else None
    return Selection(key[0], key[1], key[2], tiling, source, spec["seed"], chosen, ranked)

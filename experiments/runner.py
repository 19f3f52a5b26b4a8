"""Running the benchmark's jobs, each in a fresh process: a crash or a kill costs only that job,
and its peak memory is its own. Finished jobs are skipped, so a run resumes.

``run_jobs`` runs them one after another on this machine; ``experiments.ray_runner`` runs the
same job folders as Ray tasks on a cluster, through the same ``prepare_job`` and ``finish_job``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_json
from data.sources import recorded_source
from experiments.grid import Job
from experiments.job import run_job_process
from experiments.job_folder import JOB_FILE, RESULTS_FILE, job_is_complete, read_results
from experiments.process import FreshProcessError, call_in_fresh_process

log = logging.getLogger(__name__)


def prepare_job(job: Job, run_dir: Path, label: str) -> Path | None:
    """The job's folder made ready to run (``job.json`` written, old results removed), or None
    when the job finished earlier."""
    job_dir = job.folder(run_dir)
    if job_is_complete(job_dir):
        log.info("%s: finished earlier, skipped", label)
        return None
    job_dir.mkdir(parents=True, exist_ok=True)
    previous = job_dir / JOB_FILE
    # Compared as job.json holds it: tuples (a source's categories) come back as lists.
    spec = json.loads(
        json.dumps(
            {**job.spec, "source": recorded_source(job.spec["source"], job_dir)}, default=str
        )
    )
    if previous.is_file() and json.loads(previous.read_text()) != spec:
        # The same cell with other settings: its checkpoints belong to the old settings.
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    atomic_write_json(job_dir / JOB_FILE, spec)
    (job_dir / RESULTS_FILE).unlink(missing_ok=True)
    return job_dir


def finish_job(
    job: Job, job_dir: Path, status: int | None, crash: str, label: str, seconds: float
) -> dict[str, Any]:
    """The job's results after its process ended with ``status`` (None: it did not return, for
    the reason ``crash``); a job without ok results is recorded as failed with its error."""
    results = read_results(job_dir)
    if status != 0 or results is None or results.get("status") != "ok":
        error = (results or {}).get("error") or crash or f"exit status {status}"
        results = {"status": "failed", "job_id": job.job_id, "error": error}
        atomic_write_json(job_dir / RESULTS_FILE, results)
        log.error("%s: failed: %s (see %s)", label, error, job_dir / "log.txt")
    else:
        log.info("%s: done in %.0f s", label, seconds)
    return {**job.identity(), **results}


def job_label(number: int, jobs: list[Job]) -> str:
    return f"[{number}/{len(jobs)}] {jobs[number - 1].job_id}"


def run_jobs(jobs: list[Job], run_dir: Path, timeout_s: float | None = None) -> list[dict]:
    """Run every job not finished yet, each in its own process (``run_job_process``, which
    writes the job's ``results.json`` or records its failure there); a failed or killed job is
    recorded with its error and the others go on. Returns every job's results."""
    outcomes = []
    for number, job in enumerate(jobs, 1):
        label = job_label(number, jobs)
        job_dir = prepare_job(job, run_dir, label)
        if job_dir is None:
            outcomes.append({**job.identity(), **read_results(job.folder(run_dir))})
            continue
        log.info("%s: running", label)
        started = time.perf_counter()
        try:
            status = call_in_fresh_process(run_job_process, str(job_dir), timeout_s=timeout_s)
            crash = ""
        except FreshProcessError as exc:
            status, crash = None, exc.reason
        outcomes.append(
            finish_job(job, job_dir, status, crash, label, time.perf_counter() - started)
        )
    return outcomes

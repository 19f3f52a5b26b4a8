"""Running the benchmark's jobs as Ray tasks on a cluster (``benchmark.executor: ray``).

Each job is the same self-contained folder the local runner runs (``experiments.runner``): a
task starts it in a fresh process on whichever node has the job's resources free
(``ray.cpus_per_job``, ``ray.gpus_per_job``) and waits for it; the results land in the job
folder, so every node must see the run folder at the same path (a shared file system).
Finished jobs are skipped and failures recorded as with the local runner.

A job whose process was killed from outside (a node lost, the OOM killer) raises ``JobKilled``
in its task, which Ray retries up to ``ray.max_retries`` times; the retry resumes from the
job's last checkpoint. A job that fails by itself is not retried: it would fail again. Ray
must be connected (``ray.init``) before ``run_jobs_on_ray`` is called.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.grid import Job
from experiments.job import run_job_process
from experiments.job_folder import read_results
from experiments.process import FreshProcessError, call_in_fresh_process
from experiments.runner import finish_job, job_label, prepare_job
from prediction.ray_executor import ray_options

log = logging.getLogger(__name__)


class JobKilled(RuntimeError):
    """A job's process was killed by a signal from outside: the task is worth retrying."""


def run_job_task(job_dir: str, cwd: str, timeout_s: float | None) -> tuple[int | None, str, float]:
    """The body of one job's Ray task: the job in a fresh process started in ``cwd`` (the
    driver's folder, where relative paths in the job's spec point). Returns its exit status
    (None when it did not return), why it did not, and its seconds."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    started = time.perf_counter()
    try:
        status, crash = call_in_fresh_process(run_job_process, job_dir, timeout_s=timeout_s), ""
    except FreshProcessError as exc:
        if exc.signal is not None:
            raise JobKilled(exc.reason) from None
        status, crash = None, exc.reason
    return status, crash, time.perf_counter() - started


def run_jobs_on_ray(
    jobs: list[Job],
    run_dir: Path,
    ray_cfg: Mapping[str, Any],
    timeout_s: float | None = None,
) -> list[dict]:
    """Every job not finished yet as a Ray task, all submitted at once (Ray runs as many at a
    time as the cluster's resources allow); returns every job's results, in the jobs' order,
    as ``experiments.runner.run_jobs`` does."""
    import ray

    task = ray.remote(run_job_task).options(
        **ray_options(ray_cfg),
        max_retries=ray_cfg["max_retries"],
        retry_exceptions=[JobKilled],
    )
    outcomes: list[dict | None] = [None] * len(jobs)
    pending: dict[Any, tuple[int, Path, str]] = {}
    cwd = os.getcwd()
    for index, job in enumerate(jobs):
        label = job_label(index + 1, jobs)
        job_dir = prepare_job(job, run_dir, label)
        if job_dir is None:
            outcomes[index] = {**job.identity(), **read_results(job.folder(run_dir))}
            continue
        ref = task.remote(str(job_dir.resolve()), cwd, timeout_s)
        pending[ref] = (index, job_dir, label)
    log.info("%d job(s) submitted to Ray (%s)", len(pending), _resources())
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        index, job_dir, label = pending.pop(ready[0])
        try:
            status, crash, seconds = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            status, crash, seconds = None, _task_failure(exc, ray_cfg["max_retries"]), 0.0
        outcomes[index] = finish_job(jobs[index], job_dir, status, crash, label, seconds)
    return [outcome for outcome in outcomes if outcome is not None]


def _task_failure(exc: Exception, retries: int) -> str:
    """One line for a task that did not return after its retries."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, JobKilled):
        return f"{cause} (after {retries} retries)"
    return f"the Ray task was lost: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def _resources() -> str:
    import ray

    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs on the cluster"

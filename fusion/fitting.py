"""Fitting several hybrids of the same members at once (cross-validation folds and the final fit).

A hybrid's fit (fusion, the region threshold, regions, grading) is mostly single-threaded NumPy
and SciPy work on every fitting image's full-resolution maps, so the fits of an ensemble's folds
run side by side in forked worker processes, one CPU each. Forking shares the parent's member
outputs (the largest data) without copying or pickling them; each worker sends back only the
fitted state (``Hybrid.fitted_state``), which the parent sets on a hybrid of its own. The seeds
are the hybrid's own, so the result is the same as fitting one after another.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from fusion.hybrid import Hybrid

log = logging.getLogger(__name__)

# What a forked worker runs: set by the parent just before forking, so that neither the task
# nor what it reads (hybrids, gigabytes of maps) is pickled.
_JOB: dict[str, Any] = {}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_workers(requested: int | None, fits: int) -> int:
    """Worker processes for ``fits`` fits: ``requested``, or None for one per available CPU;
    never more than the fits, and 1 where processes cannot be forked."""
    if requested is not None and requested < 1:
        raise ValueError(f"fit workers must be 1 or more (or None: one per CPU), got {requested}")
    workers = min(requested or available_cpus(), fits)
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.info("this platform cannot fork: fitting %d hybrids one after another", fits)
        return 1
    return max(workers, 1)


def _run_in_worker(index: int) -> Any:
    # One thread per worker: the workers share the CPUs, and OpenMP thread pools inherited
    # through fork must not be entered again in the child.
    torch.set_num_threads(1)
    with threadpool_limits(1):
        return _JOB["task"](index)


def run_forked(
    task: Callable[[int], Any], count: int, workers: int, on_done: Callable[[], None]
) -> list[Any]:
    """``task(0)`` .. ``task(count - 1)`` in ``workers`` forked processes, one thread each;
    their results in order (they are pickled back: keep them small). ``task`` and what it reads
    are shared with the workers by the fork, never pickled. ``on_done`` is called as each
    finishes (a progress bar)."""
    _JOB.update(task=task)
    try:
        # The executor forks every worker at the first submit, from this thread, before any
        # thread of its own runs (a fork from another thread could copy a lock held there);
        # a worker that dies (out of memory) raises BrokenProcessPool instead of hanging.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_run_in_worker, index) for index in range(count)]
            for _ in as_completed(futures):
                on_done()
            return [future.result() for future in futures]
    finally:
        _JOB.clear()


def fit_hybrids(
    hybrids: Sequence[Hybrid],
    sample_sets: Sequence[Sequence[dict[str, Any]]],
    workers: int | None = None,
    progress: bool = False,
    desc: str = "fits",
) -> list[Hybrid]:
    """Each of ``hybrids`` (unfitted) fitted on its ``sample_sets`` entry, in place; returned.

    ``workers``: processes fitting at once (None: one per available CPU; 1: in this process).
    Each worker holds one fit's working set (the fused maps of its fitting images). The
    samples must carry their ``member_outputs`` (or a function that makes them on the CPU): a
    worker computes nothing through the members and shows no progress of its own."""
    if len(hybrids) != len(sample_sets):
        raise ValueError(f"{len(hybrids)} hybrids for {len(sample_sets)} sample sets")
    workers = fit_workers(workers, len(sample_sets))
    with tqdm(total=len(hybrids), desc=desc, disable=not progress) as bar:
        if workers == 1:
            for hybrid, samples in zip(hybrids, sample_sets):
                hybrid.fit(samples)
                bar.update()
            return list(hybrids)
        states = run_forked(
            lambda index: hybrids[index].fit(sample_sets[index]).fitted_state(),
            len(hybrids),
            workers,
            bar.update,
        )
    return [hybrid.set_fitted_state(state) for hybrid, state in zip(hybrids, states)]

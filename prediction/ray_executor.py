"""Predict on a Ray cluster (``predict.executor: ray``): the images are cut into chunks of whole
batches and sent to Ray actors, each of which loads the hybrid once and predicts its chunks with
the same loop as the local run (``prediction.run.predict_files``), streaming each result into
its own file under ``out/shards/``. At the end those streams are merged into
``predictions.jsonl`` (``prediction.results.merge_shards``), from which the usual reports are
rebuilt, so the outputs and the resume are the local run's.

Every node must see the input files and ``out`` at the same paths (a shared file system); a
relative path means the same as in the driver's folder. Ray must be connected (``ray.init``)
before ``predict_on_ray`` is called.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prediction.inputs import Skipped
from prediction.results import SHARD_DIR, ResultStream, finished, merge_shards, read_stream
from prediction.run import (
    PredictionCounts,
    StopRequest,
    predict_files,
    predict_options,
    record_missing,
)

log = logging.getLogger(__name__)


def ray_options(ray_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Ray's options for one benchmark job's task or one predict actor, from the ``ray``
    section: the resources it reserves and its environment."""
    options: dict[str, Any] = {
        "num_cpus": ray_cfg["cpus_per_job"],
        "num_gpus": ray_cfg["gpus_per_job"],
    }
    if ray_cfg["env_vars"]:
        env = {name: str(value) for name, value in ray_cfg["env_vars"].items()}
        options["runtime_env"] = {"env_vars": env}
    return options


class PredictActor:
    """One Ray actor's state: the loaded hybrid and its own results stream (``name``.jsonl
    under ``out/shards/``). Made a Ray actor class by ``predict_on_ray``."""

    def __init__(
        self,
        name: str,
        hybrid_dir: str,
        hybrid_ref: str,
        accelerator: str,
        options: Mapping[str, Any],
        out: str,
        cwd: str,
    ) -> None:
        from fusion.hybrid import Hybrid
        from members.device import resolve_device

        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative input paths mean what they mean to the driver
        self.hybrid = Hybrid.load(hybrid_dir, resolve_device(accelerator))
        if self.hybrid.model_id_ != hybrid_ref:
            raise RuntimeError(
                f"{hybrid_dir} changed after the run started (identity "
                f"{self.hybrid.model_id_[:12]}…, the run's is {hybrid_ref[:12]}…)"
            )
        self.options, self.out = dict(options), Path(out)
        path = self.out / SHARD_DIR / f"{name}.jsonl"
        # An actor restarted after its process was lost skips what it streamed before (those
        # images then count as done earlier).
        self.streamed = finished(read_stream(path), hybrid_ref)
        self.stream = ResultStream(path)

    def predict(self, files: list[str], done: dict[str, str]) -> PredictionCounts:
        """Predict ``files`` (``done``: path -> SHA-256 of those finished before)."""
        return predict_files(
            self.hybrid,
            [Path(f) for f in files],
            [],
            self.out,
            self.stream,
            done={**done, **self.streamed},
            progress=False,
            **predict_options(self.options),
        )


def predict_on_ray(
    hybrid_dir: str | os.PathLike,
    files: Sequence[Path],
    missing: Sequence[Skipped],
    out: Path,
    stream: ResultStream,
    *,
    hybrid_ref: str,
    done: Mapping[str, str],
    accelerator: str,
    options: Mapping[str, Any],
    ray_cfg: Mapping[str, Any],
    stop: StopRequest | None = None,
    progress: bool = True,
) -> PredictionCounts:
    """Predict ``files`` on Ray actors (``ray.actors`` of them, null: as many as the cluster's
    CPUs hold at ``ray.cpus_per_job`` each, at most one per chunk) and merge their streams into
    ``out/predictions.jsonl``; ``missing`` is recorded in ``stream`` (that file's) here. Returns
    the counts over every chunk. ``options``: the predict section; ``done`` as for
    ``predict_files``. A stop request lets the chunks in hand finish and sends no more; a
    second Ctrl-C ends the actors at once (what they streamed is kept)."""
    import ray
    from tqdm.auto import tqdm

    size = math.ceil(ray_cfg["chunk_images"] / options["batch_size"]) * options["batch_size"]
    chunks = deque([str(path) for path in files[i : i + size]] for i in range(0, len(files), size))
    counts = record_missing(missing, stream, hybrid_ref)
    if not chunks:
        return counts
    actors_wanted = ray_cfg["actors"] or int(
        ray.cluster_resources().get("CPU", 1) // ray_cfg["cpus_per_job"]
    )
    actor_class = ray.remote(PredictActor).options(
        **ray_options(ray_cfg),
        max_restarts=ray_cfg["max_retries"],
        max_task_retries=ray_cfg["max_retries"],
    )
    actors = [
        actor_class.remote(
            f"actor-{k}",
            str(hybrid_dir),
            hybrid_ref,
            accelerator,
            options,
            str(out.resolve()),
            os.getcwd(),
        )
        for k in range(max(1, min(actors_wanted, len(chunks))))
    ]
    log.info(
        "predicting %d image(s) in %d chunk(s) on %d Ray actor(s)",
        len(files),
        len(chunks),
        len(actors),
    )
    idle, running = list(actors), {}
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    try:
        while chunks or running:
            while idle and chunks and not (stop is not None and stop.requested):
                actor, chunk = idle.pop(), chunks.popleft()
                chunk_done = {path: done[path] for path in chunk if path in done}
                running[actor.predict.remote(chunk, chunk_done)] = (actor, len(chunk))
            if not running:
                break  # stopped: nothing in hand
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, images = running.pop(ref)
                _add(counts, _chunk_counts(ref))
                idle.append(actor)
                bar.update(images)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
        moved = merge_shards(out)
        log.info("merged %d result(s) from the actors' streams", moved)
    return counts


def _chunk_counts(ref: Any) -> PredictionCounts:
    """A chunk's counts; an actor that could not predict is an error in one line."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise RuntimeError(f"a Ray predict actor failed: {reason}") from None


def _add(total: PredictionCounts, part: PredictionCounts) -> None:
    for field in dataclasses.fields(total):
        setattr(total, field.name, getattr(total, field.name) + getattr(part, field.name))

"""The benchmark's job grid: every (dataset, category, member, backbone, image size, tiling)
cell a configuration asks for, and the name of the run folder they share."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from configs import ConfigError
from data.images import size_label
from data.sources import DataSource, resolve_source


@dataclass
class Job:
    """One cell of the grid: what it runs (``spec``, written to its ``job.json``) and where."""

    job_id: str
    dataset: str
    category: str
    member: str
    backbone: str | None
    image_size: int | list[int] | None
    tiling: bool
    spec: dict[str, Any]

    def folder(self, run_dir: Path) -> Path:
        return run_dir / "jobs" / self.job_id

    def identity(self) -> dict[str, Any]:
        """The grid coordinates, as results and the leaderboard name them."""
        return {
            "job_id": self.job_id,
            "dataset": self.dataset,
            "category": self.category,
            "member": self.member,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "tiling": self.tiling,
        }


def _sources(cfg: Mapping[str, Any]) -> list[DataSource]:
    entries = cfg["benchmark"].get("datasets") or []
    if not entries:
        return [resolve_source(cfg["data"], cfg["synthetic"], cfg["seed"])]
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"benchmark.datasets[{i}] must be a mapping like the data section")
        unknown = set(entry) - set(cfg["data"]) - {"name"}
        if unknown:
            raise ConfigError(
                f"benchmark.datasets[{i}]: unknown key(s) {sorted(unknown)}; "
                f"valid: {sorted(set(cfg['data']) | {'name'})}"
            )
        data_cfg = {**cfg["data"], **{k: v for k, v in entry.items() if k != "name"}}
        sources.append(resolve_source(data_cfg, cfg["synthetic"], cfg["seed"], entry.get("name")))
    return sources


def plan_jobs(cfg: Mapping[str, Any]) -> list[Job]:
    """Every cell of the grid, in a stable order; cells that differ only in an option a member
    does not have (a backbone for a member without one) are planned once."""
    from members.base import available_members, member_parameters

    bench = cfg["benchmark"]
    unknown = sorted(set(bench["members"]) - set(available_members()))
    if unknown:
        raise ConfigError(
            f"benchmark.members: unknown member(s) {unknown}; available: {available_members()}"
        )
    if "supervised" in bench["members"]:
        raise ConfigError(
            "benchmark.members: supervised learns from labeled defects, which the benchmark "
            "scores on; pipelines.ensemble trains it inside each cross-validation fold "
            "(ensemble.supervised) and pipelines.retrain from retrain.labeled_dirs"
        )
    jobs: list[Job] = []
    seen: set[str] = set()
    for source in _sources(cfg):
        grid = itertools.product(
            source.categories,
            bench["members"],
            bench["backbones"] or [None],
            bench["image_sizes"] or [source.image_size],
            bench["tiling"] or [cfg["tiling"]["enabled"]],
        )
        for category, member, backbone, image_size, tiling in grid:
            member_cfg = {k: v for k, v in cfg["members"][member].items() if k != "trainer"}
            if backbone is not None and "backbone" in member_parameters(member):
                member_cfg["backbone"] = backbone
            else:
                backbone = member_cfg.get("backbone")
            size = None if tiling else image_size
            parts = [source.name, category, member]
            if backbone:
                parts.append(backbone)
            parts.append(f"tile{cfg['tiling']['tile_size']}" if tiling else f"{size_label(size)}px")
            job_id = "-".join(str(p).replace("/", "_") for p in parts)
            if job_id in seen:
                continue
            seen.add(job_id)
            spec = {
                "seed": cfg["seed"],
                "device": cfg["device"],
                # As the job folder records it (prepare_job: from there too).
                "source": {**asdict(source), "data_dir": str(Path(source.data_dir).resolve())},
                "category": category,
                "image_size": size,
                "member": member,
                "member_config": member_cfg,
                "trainer": {**cfg["trainer"], **cfg["members"][member].get("trainer", {})},
                "tiling": {**cfg["tiling"], "enabled": bool(tiling)},
                "batch_size": cfg["data"]["batch_size"],
                "num_workers": cfg["data"]["num_workers"],
                "init_from": bench.get("init_from"),
                "n_examples": bench["n_examples"],
                "validation_injections": bench["validation_injections"],
            }
            jobs.append(
                Job(job_id, source.name, category, member, backbone, size, bool(tiling), spec)
            )
    if not jobs:
        raise ConfigError(
            "the benchmark grid is empty: check benchmark.members and data.categories"
        )
    return jobs


def config_hash(cfg: Any, length: int = 10) -> str:
    """A short stable hash of a JSON-serializable configuration."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]

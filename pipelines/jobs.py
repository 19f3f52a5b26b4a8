"""Benchmark jobs: the grid, one job's run (fit, evaluate, measure cost), and completion checks.

A job is one (dataset, category, member, backbone, image size, tiling) cell. Each runs in its
own process (``python -m pipelines.jobs JOB_DIR``) so a crash or a kill costs only that job,
and its peak memory is its own. A job folder holds ``job.json`` (what to run), the resolved
``config.json``, ``log.txt``, ``history.csv``, ``checkpoints/``, ``weights/``, ``scores.csv``,
``examples/`` and, last, ``results.json``: a job is finished when that file says ``ok`` and the
weights it names verify against their manifest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts.io import (
    ArtifactError,
    atomic_write_csv,
    atomic_write_json,
    verify_manifest,
)
from data.images import size_label
from data.sources import DataSource, make_dataset, make_loader, resolve_source

# scores.csv: one row per test image.
SCORE_COLUMNS = ("path", "label", "defect_type", "score")

log = logging.getLogger("pipelines.jobs")

JOB_FILE = "job.json"
RESULTS_FILE = "results.json"
REQUIRED_RESULTS = ("status", "metrics", "cost", "member", "dataset", "category")


@dataclass
class Job:
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
    from configs import ConfigError

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
    from configs import ConfigError
    from members.base import available_members, member_parameters

    bench = cfg["benchmark"]
    unknown = sorted(set(bench["members"]) - set(available_members()))
    if unknown:
        raise ConfigError(
            f"benchmark.members: unknown member(s) {unknown}; available: {available_members()}"
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
                "source": {**asdict(source), "data_dir": str(source.data_dir)},
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
    try:
        return json.loads((job_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


# --- one job, in its own process -----------------------------------------------------------


def tiled_predictor(member, tiling: Mapping[str, Any]):
    """A predict function running ``member`` tile by tile over full-resolution images."""
    from tiling import infer_tiled

    def predict(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = [], []
        for image in batch["image"]:
            out = infer_tiled(
                member,
                image,
                tile_size=tiling["tile_size"],
                stride=tiling["stride"],
                batch_size=tiling["batch_size"],
                reduction=tiling["reduction"],
                pad_mode=tiling["pad_mode"],
            )
            maps.append(torch.as_tensor(out["anomaly_map"]).reshape(1, *image.shape[-2:]))
            scores.append(float(out["pred_score"]))
        return torch.tensor(scores), torch.stack(maps)

    return predict


def member_predictor(member):
    def predict(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        out = member.predict(batch["image"])
        return out["pred_score"], out["anomaly_map"]

    return predict


def _latency_ms(predict, dataset, n: int = 5) -> float:
    from data.datasets import collate_samples

    times = []
    for i in range(min(n, len(dataset))):
        batch = collate_samples([dataset[i]])
        started = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if times else float("nan")


@torch.no_grad()
def _backbone_images_per_second(member, loader, device) -> float | None:
    """Images/s of the member's backbone feature pass alone over ``loader``: the ceiling its
    own images/s is compared with (None for members without a backbone)."""
    from members.backbones import FeatureExtractor

    extractor = getattr(member, "feature_extractor", None)
    if not isinstance(extractor, FeatureExtractor):
        return None
    images, seconds = 0, 0.0
    for batch in loader:
        batch_images = batch["image"].to(device)
        started = time.perf_counter()
        extractor(batch_images)
        seconds += time.perf_counter() - started
        images += len(batch_images)
    return images / seconds if seconds > 0 else None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _save_examples(member, predict, dataset, records, folder: Path, n: int) -> list[dict]:
    """Heatmap overlays of the ``n`` best and ``n`` worst cases: defective images scored
    highest/lowest and normal images scored lowest/highest."""
    from data.datasets import collate_samples
    from tiling import save_heatmap_overlay

    if n <= 0:
        return []
    by_path = {r["path"]: i for i, r in enumerate(records)}
    defects = sorted((r for r in records if r["label"] == 1), key=lambda r: r["score"])
    normals = sorted((r for r in records if r["label"] == 0), key=lambda r: r["score"])
    picks = [("worst", r) for r in defects[: (n + 1) // 2] + normals[::-1][: n // 2]]
    picks += [("best", r) for r in defects[::-1][: (n + 1) // 2] + normals[: n // 2]]
    examples = []
    for k, (kind, record) in enumerate(picks):
        # Records are in dataset order: the test loader does not shuffle.
        sample = dataset[by_path[record["path"]]]
        _, maps = predict(collate_samples([sample]))
        name = f"{kind}-{k:02d}-{Path(record['path']).stem}.png"
        save_heatmap_overlay(sample["image"], maps[0], folder / name)
        examples.append({**record, "kind": kind, "file": f"examples/{name}"})
    return examples


def _validation_evaluation(predict, val_set, source: DataSource, spec: Mapping[str, Any], bs: int):
    """The member on the ``val`` split: its held-out normal images and copies of them with
    injected synthetic defects (exact masks), the figures a hybrid's members are chosen on."""
    from data.datasets import collate_samples
    from data.validation import as_dataset_sample, injected_validation_samples
    from evaluation import evaluate

    samples = injected_validation_samples(
        (val_set[i]["image"] for i in range(len(val_set))),
        injections_per_image=spec["validation_injections"],
        pixel_pitch_mm=source.pixel_pitch_mm,
        seed=spec["seed"],
    )
    samples = [as_dataset_sample(s, k, source.channels) for k, s in enumerate(samples)]
    batches = (collate_samples(samples[i : i + bs]) for i in range(0, len(samples), bs))
    log.info("validating on %d images (%d held-out normal)", len(samples), len(val_set))
    return evaluate(predict, batches, pixel_metrics=True)


@torch.no_grad()
def _reconstruction_quality(
    member, test_set, tiling: Mapping[str, Any], bs: int, workers: int, device: torch.device
) -> dict[str, Any]:
    """PSNR, SSIM and LPIPS between the test images and the member's reconstructions of them
    (of their tiles in a tiled job: the member's input there)."""
    from metrics.quality import reconstruction_quality

    if tiling["enabled"]:
        from tiling import TiledDataset

        test_set = TiledDataset(test_set, tiling["tile_size"], tiling["stride"], mode="all")
    loader = make_loader(test_set, bs, shuffle=False, num_workers=workers)
    pairs = (
        (batch["image"], member.reconstruct_images(batch["image"].to(device))) for batch in loader
    )
    quality = reconstruction_quality(pairs)
    return {"split": "test", "unit": "tile" if tiling["enabled"] else "image", **quality}


def run_job(job_dir: Path) -> dict[str, Any]:
    """Fit and evaluate the job described by ``job_dir/job.json``; write ``results.json``."""
    from lightning_fabric.utilities.seed import seed_everything

    from evaluation import evaluate
    from members.build import build_member, build_trainer
    from pipelines.common import peak_rss_mb

    spec = json.loads((job_dir / JOB_FILE).read_text())
    atomic_write_json(job_dir / "config.json", spec)
    seed_everything(spec["seed"], verbose=False)
    source = DataSource(**{**spec["source"], "data_dir": Path(spec["source"]["data_dir"])})
    category, seed = spec["category"], spec["seed"]
    tiling = spec["tiling"]
    train_set = make_dataset(source, category, "train", seed, spec["image_size"])
    # The held-out share's two halves: the member calibrates its maps on one; it is chosen for
    # a hybrid on the other (with injected defects), which fusion later fits on.
    calibration_set, val_set = (
        (
            make_dataset(source, category, "calibration", seed, spec["image_size"]),
            make_dataset(source, category, "val", seed, spec["image_size"]),
        )
        if source.val_fraction
        else (None, None)
    )
    test_set = make_dataset(source, category, "test", seed, spec["image_size"])
    if calibration_set is not None and len(calibration_set) < 2:
        # Per-pixel statistics need two images at least; members then calibrate without.
        log.warning(
            "only %d calibration image(s): members calibrate without held-out images "
            "(raise data.val_fraction)",
            len(calibration_set),
        )
        calibration_set = None
    if tiling["enabled"]:
        from tiling import TiledDataset

        train_set = TiledDataset(train_set, tiling["tile_size"], tiling["stride"], mode="all")
        if calibration_set is not None:
            calibration_set = TiledDataset(
                calibration_set, tiling["tile_size"], tiling["stride"], mode="all"
            )
    bs, workers = spec["batch_size"], spec["num_workers"]
    train_loader = make_loader(train_set, bs, shuffle=True, num_workers=workers)
    calibration_loader = (
        make_loader(calibration_set, bs, shuffle=False, num_workers=workers)
        if calibration_set
        else None
    )

    member = build_member(spec["member"], spec["member_config"], spec.get("init_from"))
    trainer = build_trainer(spec["device"], spec["trainer"], seed=spec["seed"], out_dir=job_dir)
    log.info(
        "fitting %s on %s/%s (%d training images)",
        spec["member"],
        source.name,
        category,
        len(train_set),
    )
    started = time.perf_counter()
    member.fit(train_loader, calibration_loader, trainer=trainer)
    fit_seconds = time.perf_counter() - started
    peak_fit = peak_rss_mb()
    member.save(job_dir / "weights")
    member.eval()
    if trainer.fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    predict = tiled_predictor(member, tiling) if tiling["enabled"] else member_predictor(member)
    test_loader = make_loader(
        test_set, 1 if tiling["enabled"] else bs, shuffle=False, num_workers=workers
    )
    log.info("evaluating on %d test images", len(test_set))

    def on_device(batch):
        return predict({**batch, "image": batch["image"].to(trainer.fabric.device)})

    evaluation = evaluate(
        on_device, test_loader, pixel_metrics=getattr(test_set, "has_masks", True)
    )
    validation = (
        _validation_evaluation(on_device, val_set, source, spec, 1 if tiling["enabled"] else bs)
        if val_set is not None and len(val_set)
        else None
    )
    latency = _latency_ms(on_device, test_set)
    backbone_speed = (
        None
        if tiling["enabled"]
        else _backbone_images_per_second(member, test_loader, trainer.fabric.device)
    )
    atomic_write_csv(job_dir / "scores.csv", evaluation.records, SCORE_COLUMNS)
    examples = _save_examples(
        member, on_device, test_set, evaluation.records, job_dir / "examples", spec["n_examples"]
    )
    results = {
        "status": "ok",
        "job_id": job_dir.name,
        "dataset": source.name,
        "category": category,
        "member": spec["member"],
        "backbone": spec["member_config"].get("backbone"),
        "image_size": spec["image_size"],
        "tiling": tiling["enabled"],
        # Test figures report the member; validation figures choose it for a hybrid.
        "metrics": evaluation.metrics,
        "validation_metrics": validation.metrics if validation else {},
        "splits": {
            "metrics": f"test ({evaluation.images} images)",
            "validation_metrics": (
                f"val ({len(val_set)} held-out normal images and "
                f"{validation.images - len(val_set)} copies with injected defects)"
                if validation
                else "none: data.val_fraction is 0"
            ),
        },
        "notes": evaluation.notes,
        "cost": {
            "fit_seconds": fit_seconds,
            "train_images": len(train_set),
            "test_images": evaluation.images,
            "images_per_second": evaluation.images_per_second,
            # The same test images through the member's backbone alone, in the same process.
            "backbone_images_per_second": backbone_speed,
            "latency_ms": latency,
            "peak_rss_mb_fit": peak_fit,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": (
                torch.cuda.max_memory_allocated() / 2**20
                if trainer.fabric.device.type == "cuda"
                else None
            ),
            "model_bytes": _folder_bytes(job_dir / "weights"),
            # What a member measures of its own fit (e.g. PatchCore's coreset time).
            **{f"fit_{k}": v for k, v in getattr(member, "fit_stats", {}).items()},
        },
        "examples": examples,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # After the cost figures: LPIPS's network is not part of the member's memory.
    results["reconstruction_quality"] = (
        _reconstruction_quality(member, test_set, tiling, bs, workers, trainer.fabric.device)
        if member.reconstructs
        else None
    )
    atomic_write_json(job_dir / RESULTS_FILE, results)
    return results


def run_jobs(jobs: list[Job], run_dir: Path, timeout_s: float | None = None) -> list[dict]:
    """Run every job not finished yet, each in its own process; a failed or killed job is
    recorded with its error and the others go on. Returns every job's results."""
    import subprocess

    outcomes = []
    for number, job in enumerate(jobs, 1):
        job_dir = job.folder(run_dir)
        label = f"[{number}/{len(jobs)}] {job.job_id}"
        if job_is_complete(job_dir):
            log.info("%s: finished earlier, skipped", label)
            outcomes.append({**job.identity(), **read_results(job_dir)})
            continue
        job_dir.mkdir(parents=True, exist_ok=True)
        previous = job_dir / JOB_FILE
        # Compared as job.json holds it: tuples (a source's categories) come back as lists.
        spec = json.loads(json.dumps(job.spec, default=str))
        if previous.is_file() and json.loads(previous.read_text()) != spec:
            # The same cell with other settings: its checkpoints belong to the old settings.
            import shutil

            shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        atomic_write_json(job_dir / JOB_FILE, job.spec)
        (job_dir / RESULTS_FILE).unlink(missing_ok=True)
        log.info("%s: running", label)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pipelines.jobs", str(job_dir)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout_s,
            )
            returncode, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            returncode, stderr = None, f"timed out after {timeout_s} s"
        results = read_results(job_dir)
        if returncode != 0 or results is None or results.get("status") != "ok":
            error = (
                (results or {}).get("error") or _last_line(stderr) or f"exit status {returncode}"
            )
            if returncode is not None and returncode < 0:
                error = f"killed by signal {-returncode}"
            results = {"status": "failed", "job_id": job.job_id, "error": error}
            atomic_write_json(job_dir / RESULTS_FILE, results)
            log.error("%s: failed: %s (see %s)", label, error, job_dir / "log.txt")
        else:
            log.info("%s: done in %.0f s", label, time.perf_counter() - started)
        outcomes.append({**job.identity(), **results})
    return outcomes


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""


def main(argv: list[str] | None = None) -> int:
    """Run one job in this process; on failure record it in ``results.json`` and exit 1."""
    from pipelines.common import describe_error, setup_logging

    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs", description=__doc__)
    parser.add_argument("job_dir", type=Path)
    args = parser.parse_args(argv)
    setup_logging(args.job_dir / "log.txt")
    try:
        run_job(args.job_dir)
    except Exception as exc:
        log.error("job failed:\n%s", traceback.format_exc())
        atomic_write_json(
            args.job_dir / RESULTS_FILE,
            {"status": "failed", "job_id": args.job_dir.name, "error": describe_error(exc)},
        )
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

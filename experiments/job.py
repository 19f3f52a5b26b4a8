"""One benchmark job's experiment: fit the member, evaluate it on test and validation data,
measure its cost, save examples, and write ``results.json`` last (see ``experiments.job_folder``).

It runs in a process of its own (``experiments.runner`` starts one per job), so a crash or a
kill costs only that job, and its peak memory is its own. Under DDP (``device.strategy: ddp``
with several devices or nodes) every rank runs it: the ranks fit the member together, and rank 0
alone writes the job's folder (config, weights, evaluation, results).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts.io import atomic_write_csv, atomic_write_json
from data.sources import DataSource, make_dataset, make_loader, source_from_record
from experiments.job_folder import JOB_FILE, RESULTS_FILE, SCORE_COLUMNS
from experiments.logs import describe_error, setup_rank_logging
from experiments.memory import peak_rss_mb
from members.device import synchronize, wait_for

log = logging.getLogger(__name__)


def tiled_predictor(member, tiling: Mapping[str, Any]):
    """A predict function running ``member`` tile by tile over full-resolution images."""
    from tiling import infer_tiled, infer_tiled_options

    options = infer_tiled_options(tiling)

    def predict(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = [], []
        for image in batch["image"]:
            out = infer_tiled(member, image, **options)
            maps.append(torch.as_tensor(out["anomaly_map"]).reshape(1, *image.shape[-2:]))
            scores.append(float(out["pred_score"]))
        return torch.tensor(scores), torch.stack(maps)

    return predict


def member_predictor(member):
    """A predict function running ``member`` on whole (resized) images."""

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
        wait_for(predict(batch))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if times else float("nan")


@torch.no_grad()
def _backbone_and_head_speed(member, loader, device) -> tuple[float | None, float | None]:
    """Images/s of the member's backbone feature pass alone over ``loader`` (the ceiling its
    own images/s is compared with), and milliseconds per image of its head: the member's
    answer given those features (what a hybrid pays after its shared backbone pass). None,
    None for members without a backbone."""
    from members.backbones import FeatureExtractor

    extractor = getattr(member, "feature_extractor", None)
    if not isinstance(extractor, FeatureExtractor):
        return None, None
    images, backbone_seconds, head_seconds = 0, 0.0, 0.0
    for batch in loader:
        batch_images = batch["image"].to(device)
        synchronize(device)
        started = time.perf_counter()
        features = dict(zip(extractor.layers, extractor(batch_images)))
        synchronize(device)
        backbone_seconds += time.perf_counter() - started
        started = time.perf_counter()
        member(batch_images, features)
        synchronize(device)
        head_seconds += time.perf_counter() - started
        images += len(batch_images)
    if not images or backbone_seconds <= 0:
        return None, None
    return images / backbone_seconds, 1000 * head_seconds / images


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _save_examples(member, predict, dataset, records, folder: Path, n: int) -> list[dict]:
    """Heatmap overlays of the ``n`` best and ``n`` worst cases: defective images scored
    highest/lowest and normal images scored lowest/highest; a defective image's true mask is
    outlined (``tiling.Decision``)."""
    from data.datasets import collate_samples
    from tiling import Decision, save_heatmap_overlay

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
        mask = sample.get("mask") if record["label"] == 1 else None
        truth = None if mask is None else torch.as_tensor(mask).reshape(maps.shape[-2:])
        save_heatmap_overlay(
            sample["image"], maps[0], folder / name, decision=Decision(truth=truth)
        )
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
    return evaluate(predict, batches, pixel_metrics=True, intervals=False)


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


@dataclass
class JobData:
    """A job's splits at the member's input size: training images (tiles, for a tiled job),
    the held-out share's halves (the member calibrates its maps on ``calibration``; it is
    chosen for a hybrid on ``val``, with injected defects, which fusion later fits on; None
    without a held-out share) and the test split."""

    source: DataSource
    train: Any
    calibration: Any
    val: Any
    test: Any


def run_job_process(job_dir: str) -> int:
    """Run one job in this process (a fresh one, ``experiments.process``; ``python -m
    pipelines.jobs JOB_DIR`` from a shell): 0 when ``results.json`` is written; on a failure,
    the error recorded there (by rank 0) and on stderr, and 1."""
    folder = Path(job_dir)
    writer = setup_rank_logging(folder / "log.txt")
    try:
        run_job(folder)
    except Exception as exc:
        log.error("job failed:\n%s", traceback.format_exc())
        if writer:
            atomic_write_json(
                folder / RESULTS_FILE,
                {"status": "failed", "job_id": folder.name, "error": describe_error(exc)},
            )
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    return 0


def run_job(job_dir: Path) -> dict[str, Any] | None:
    """Fit and evaluate the job described by ``job_dir/job.json``; write ``results.json`` and
    return the results (None on a DDP rank other than 0, which only helps to fit)."""
    from lightning_fabric.utilities.seed import seed_everything

    from members.build import build_member, build_trainer

    spec = json.loads((job_dir / JOB_FILE).read_text())
    seed_everything(spec["seed"], verbose=False)
    trainer = build_trainer(spec["device"], spec["trainer"], seed=spec["seed"], out_dir=job_dir)
    trainer.launch()  # under DDP the other ranks start here, each running this job
    if trainer.is_global_zero:
        atomic_write_json(job_dir / "config.json", spec)
    data = job_data(spec, job_dir)
    member = build_member(spec["member"], spec["member_config"], spec.get("init_from"))
    fit_seconds = fit_job_member(member, data, spec, trainer)
    if not trainer.is_global_zero:
        return None  # rank 0 alone saves, evaluates and writes the results
    peak_fit = peak_rss_mb()
    member.save(job_dir / "weights")
    member.eval()
    device = trainer.fabric.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    figures = evaluate_job_member(member, data, spec, device, job_dir)
    results = job_results(job_dir, spec, data, member, figures)
    results["cost"].update(
        fit_seconds=fit_seconds,
        peak_rss_mb_fit=peak_fit,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    )
    # After the cost figures: LPIPS's network is not part of the member's memory.
    results["reconstruction_quality"] = (
        _reconstruction_quality(
            member, data.test, spec["tiling"], spec["batch_size"], spec["num_workers"], device
        )
        if member.reconstructs
        else None
    )
    atomic_write_json(job_dir / RESULTS_FILE, results)
    return results


def job_data(spec: Mapping[str, Any], job_dir: Path) -> JobData:
    """The job's splits (``JobData``); a tiled job trains and calibrates on tiles."""
    source = source_from_record(spec["source"], job_dir)
    category, seed, size = spec["category"], spec["seed"], spec["image_size"]
    train_set = make_dataset(source, category, "train", seed, size)
    calibration_set, val_set = (
        (
            make_dataset(source, category, "calibration", seed, size),
            make_dataset(source, category, "val", seed, size),
        )
        if source.val_fraction
        else (None, None)
    )
    if calibration_set is not None and len(calibration_set) < 2:
        # Per-pixel statistics need two images at least; members then calibrate without.
        log.warning(
            "only %d calibration image(s): members calibrate without held-out images "
            "(raise data.val_fraction)",
            len(calibration_set),
        )
        calibration_set = None
    tiling = spec["tiling"]
    if tiling["enabled"]:
        from tiling import TiledDataset

        def tiles(dataset: Any) -> Any:
            return TiledDataset(dataset, tiling["tile_size"], tiling["stride"], mode="all")

        train_set = tiles(train_set)
        if calibration_set is not None:
            calibration_set = tiles(calibration_set)
    test_set = make_dataset(source, category, "test", seed, size)
    return JobData(source, train_set, calibration_set, val_set, test_set)


def fit_job_member(member: Any, data: JobData, spec: Mapping[str, Any], trainer: Any) -> float:
    """Fit ``member`` on the training split (calibrating on the calibration split); returns
    the seconds it took."""
    bs, workers = spec["batch_size"], spec["num_workers"]
    train_loader = make_loader(data.train, bs, shuffle=True, num_workers=workers)
    calibration_loader = (
        make_loader(data.calibration, bs, shuffle=False, num_workers=workers)
        if data.calibration
        else None
    )
    log.info(
        "fitting %s on %s/%s (%d training images, %d process(es))",
        spec["member"],
        data.source.name,
        spec["category"],
        len(data.train),
        trainer.fabric.world_size,
    )
    started = time.perf_counter()
    member.fit(train_loader, calibration_loader, trainer=trainer)
    return time.perf_counter() - started


def evaluate_job_member(
    member: Any, data: JobData, spec: Mapping[str, Any], device: Any, job_dir: Path
) -> dict[str, Any]:
    """The fitted member on test (figures, ``scores.csv``, examples), on val with injected
    defects, and its speed: latency, and the backbone's images/s beside the head's time."""
    from evaluation import evaluate

    tiled = spec["tiling"]["enabled"]
    predict = tiled_predictor(member, spec["tiling"]) if tiled else member_predictor(member)
    bs = 1 if tiled else spec["batch_size"]
    test_loader = make_loader(data.test, bs, shuffle=False, num_workers=spec["num_workers"])
    log.info("evaluating on %d test images", len(data.test))

    def on_device(batch):
        return predict({**batch, "image": batch["image"].to(device)})

    evaluation = evaluate(
        on_device, test_loader, pixel_metrics=getattr(data.test, "has_masks", True)
    )
    validation = (
        _validation_evaluation(on_device, data.val, data.source, spec, bs)
        if data.val is not None and len(data.val)
        else None
    )
    latency = _latency_ms(on_device, data.test)
    backbone_speed, head_ms = (
        (None, None) if tiled else _backbone_and_head_speed(member, test_loader, device)
    )
    atomic_write_csv(job_dir / "scores.csv", evaluation.records, SCORE_COLUMNS)
    examples = _save_examples(
        member, on_device, data.test, evaluation.records, job_dir / "examples", spec["n_examples"]
    )
    return {
        "evaluation": evaluation,
        "validation": validation,
        "latency_ms": latency,
        "backbone_images_per_second": backbone_speed,
        "head_ms_per_image": head_ms,
        "examples": examples,
    }


def job_results(
    job_dir: Path,
    spec: Mapping[str, Any],
    data: JobData,
    member: Any,
    figures: Mapping[str, Any],
) -> dict[str, Any]:
    """``results.json`` but the fit's time and the peak memories (``run_job`` adds them)."""
    evaluation, validation = figures["evaluation"], figures["validation"]
    return {
        "status": "ok",
        "job_id": job_dir.name,
        "dataset": data.source.name,
        "category": spec["category"],
        "member": spec["member"],
        "backbone": spec["member_config"].get("backbone"),
        "image_size": spec["image_size"],
        "tiling": spec["tiling"]["enabled"],
        # Test figures report the member; validation figures choose it for a hybrid.
        "metrics": evaluation.metrics,
        "validation_metrics": validation.metrics if validation else {},
        # How far the test figures could move on another draw of test images.
        "intervals": evaluation.intervals,
        "splits": {
            "metrics": f"test ({evaluation.images} images)",
            "validation_metrics": (
                f"val ({len(data.val)} held-out normal images and "
                f"{validation.images - len(data.val)} copies with injected defects)"
                if validation
                else "none: data.val_fraction is 0"
            ),
        },
        "notes": evaluation.notes,
        "cost": {
            "train_images": len(data.train),
            "test_images": evaluation.images,
            "images_per_second": evaluation.images_per_second,
            # The same test images through the member's backbone alone, in the same process.
            "backbone_images_per_second": figures["backbone_images_per_second"],
            # The member after its backbone, on the same images: what sharing cannot save.
            "head_ms_per_image": figures["head_ms_per_image"],
            "latency_ms": figures["latency_ms"],
            "model_bytes": _folder_bytes(job_dir / "weights"),
            # What a member measures of its own fit (e.g. PatchCore's coreset time).
            **{f"fit_{k}": v for k, v in getattr(member, "fit_stats", {}).items()},
        },
        "examples": figures["examples"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

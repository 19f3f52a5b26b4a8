"""Scoring a detector on a labeled split: streaming detection metrics and per-image records.

Used by the benchmark (each member), the ensemble (the hybrid against each member) and the
retraining job (champion against challenger). A detector is anything that maps a batch of
images to scores and maps: a member, a member behind tiled inference, or a hybrid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data.images import size_pair, to_tensor
from data.validation import labeled_defect_sample
from metrics import get_metric
from metrics.bootstrap import PairedBootstrap

# (scores [B], maps [B, 1, H, W]) for a batch of samples.
PredictFn = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Bootstrap intervals of ``metrics`` (``PairedBootstrap.compute``'s, one detector's
    # ``intervals`` by metric); None without both labels.
    intervals: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _scalar(value: Any) -> float:
    if isinstance(value, dict):
        for key in ("f1", "value", "score"):
            if key in value:
                return float(value[key])
    if hasattr(value, "f1"):
        return float(value.f1)
    return float(value)


def evaluate(
    predict: PredictFn,
    batches: Iterable[dict[str, Any]],
    pixel_metrics: bool = True,
    intervals: bool = True,
) -> Evaluation:
    """Run ``predict`` over ``batches`` and compute image metrics and, when ``pixel_metrics``
    and the split has defective pixels, pixel metrics; with ``intervals``, their bootstrap
    intervals too. Maps stream into the metrics batch by batch; only per-image scores (and a
    pixel sample for the intervals) are kept."""
    image_metrics = {name: get_metric(name) for name in IMAGE_METRICS}
    pixel = {name: get_metric(name) for name in PIXEL_METRICS} if pixel_metrics else {}
    bootstrap = PairedBootstrap() if intervals else None
    records: list[dict[str, Any]] = []
    seconds = 0.0
    any_defect_pixels = False
    for batch in batches:
        started = time.perf_counter()
        scores, maps = predict(batch)
        seconds += time.perf_counter() - started
        scores = scores.detach().float().cpu()
        labels = torch.as_tensor(batch["label"]).long().cpu()
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"non-finite scores for {batch['path']}")
        for metric in image_metrics.values():
            metric.update(scores, labels)
        if pixel:
            masks = batch["mask"].float().cpu()
            maps = maps.detach().float().cpu()
            if maps.shape[-2:] != masks.shape[-2:]:
                maps = torch.nn.functional.interpolate(maps, size=masks.shape[-2:], mode="bilinear")
            any_defect_pixels |= bool(masks.any())
            for metric in pixel.values():
                metric.update(maps, masks)
        for i, path in enumerate(batch["path"]):
            if bootstrap:
                pixels = ({"member": maps[i]}, masks[i]) if pixel else (None, None)
                bootstrap.update(int(labels[i]), {"member": float(scores[i])}, *pixels)
            records.append(
                {
                    "path": path,
                    "label": int(labels[i]),
                    "defect_type": batch["defect_type"][i],
                    "score": float(scores[i]),
                }
            )
    if not records:
        raise ValueError("nothing to evaluate: the test split is empty")
    values: dict[str, float] = {}
    notes: list[str] = []
    labels_seen = {r["label"] for r in records}
    if labels_seen == {0, 1}:
        values.update({name: _scalar(m.compute()) for name, m in image_metrics.items()})
    else:
        notes.append("image metrics skipped: the test split lacks normal or defective images")
    if pixel and any_defect_pixels:
        values.update({name: _scalar(m.compute()) for name, m in pixel.items()})
    elif pixel_metrics:
        notes.append("pixel metrics skipped: no ground-truth masks with defective pixels")
    # One detector: its intervals and sample figures by metric, without its name.
    summary = bootstrap and bootstrap.compute()
    member_intervals = summary and {
        **summary,
        "intervals": summary["intervals"]["member"],
        "figures_from_sample": summary["figures_from_sample"]["member"],
    }
    return Evaluation(values, records, len(records), seconds, notes, member_intervals)


def evaluate_hybrid(
    hybrid,
    dataset,
    progress: bool = False,
    member_outputs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    hybrid_for: Callable[[int], Any] | None = None,
    intervals: bool = True,
) -> dict[str, Any]:
    """The hybrid and each of its members on a labeled split, from one pass over the images.

    Returns ``metrics`` per detector (``hybrid`` and each member: image AUROC/AP/F1-max, and
    pixel AUROC/AUPRO where masks exist), ``intervals`` (``metrics.bootstrap.PairedBootstrap``:
    each detector's intervals, and the hybrid minus each member), ``grading`` (the grading
    stage on the true defect regions, and end to end on the detected regions matched to
    truth; image level accuracy), ``records`` (per image) and ``seconds`` (hybrid inference
    time).

    ``member_outputs[i]``: image ``i``'s member scores and maps, already computed (the time
    is then fusion and grading only). ``hybrid_for(i)``: the hybrid that scores image ``i``
    (cross-validation: each image by the hybrid fitted without its fold). ``intervals``:
    False skips the bootstrap (``intervals`` is then None).
    """
    from tqdm.auto import tqdm

    from grading.evaluation import grading_figures, grading_scores
    from grading.matching import match_regions

    detectors = ["hybrid", *hybrid.names]
    image_metrics = {d: {n: get_metric(n) for n in IMAGE_METRICS} for d in detectors}
    pixel_metrics = {d: {n: get_metric(n) for n in ("pixel_auroc", "aupro")} for d in detectors}
    bootstrap = PairedBootstrap() if intervals else None
    has_masks = bool(getattr(dataset, "has_masks", True))
    records, stage_pairs, detected_pairs, levels = [], [], [], []
    seconds = 0.0
    for index in tqdm(range(len(dataset)), desc="test", disable=not progress):
        sample = dataset[index]
        model = hybrid_for(index) if hybrid_for else hybrid
        started = time.perf_counter()
        out = model.predict(sample["image"], member_outputs[index] if member_outputs else None)
        seconds += time.perf_counter() - started
        label = torch.tensor([int(sample["label"])])
        scores = {"hybrid": out["score"], **out["member_scores"]}
        maps = {"hybrid": out["anomaly_map"], **dict(zip(hybrid.names, out["member_maps"]))}
        for name in detectors:
            for metric in image_metrics[name].values():
                metric.update(torch.tensor([scores[name]]), label)
            if has_masks:
                for metric in pixel_metrics[name].values():
                    metric.update(torch.as_tensor(maps[name])[None, None], sample["mask"][None])
        if bootstrap:
            bootstrap.update(
                int(sample["label"]), scores, maps if has_masks else None, sample.get("mask")
            )
        if "level" in sample:
            levels.append((out["level"], int(sample["level"])))
        if sample["label"] and "mask" in sample:
            # Real datasets: each mask component is a defect of the folder's type, no level.
            labeled = labeled_defect_sample(sample)
            instances, defects = labeled["instances"], labeled["defects"]
        else:
            instances, defects = None, []
        if defects:
            stage_pairs += model.grade_truth(
                sample["image"], instances, defects, out["anomaly_map"]
            )
            detected_pairs += [
                (region, truth)
                for region, truth in match_regions(out["regions"], instances, defects)
                if truth is not None
            ]
        records.append(
            {
                "path": sample["path"],
                "label": int(sample["label"]),
                "defect_type": sample["defect_type"],
                "score": out["score"],
                "flagged": out["label"],
                "level": out["level"],
                "true_level": sample.get("level"),
                "regions": len(out["regions"]),
            }
        )
    labels_seen = {r["label"] for r in records}
    metrics: dict[str, dict[str, float]] = {}
    for name in detectors:
        values = {}
        if labels_seen == {0, 1}:
            values.update({k: _scalar(m.compute()) for k, m in image_metrics[name].items()})
        if has_masks and 1 in labels_seen:
            values.update({k: _scalar(m.compute()) for k, m in pixel_metrics[name].items()})
        metrics[name] = values
    grading: dict[str, Any] = {
        "stage_on_true_regions": grading_scores(stage_pairs),
        "end_to_end": grading_scores(detected_pairs),
        **grading_figures(stage_pairs, detected_pairs, levels),
    }
    if levels:
        predicted, truth = (torch.tensor(v) for v in zip(*levels))
        grading["image_level_accuracy"] = float((predicted == truth).float().mean())
        grading["image_level_within_one"] = float(((predicted - truth).abs() <= 1).float().mean())
    return {
        "metrics": metrics,
        # How far each figure, and the hybrid's lead over each member, could move on another
        # draw of images (None without both labels).
        "intervals": bootstrap and bootstrap.compute("hybrid", metrics),
        "grading": grading,
        "operating_point": operating_point_figures(records),
        "records": records,
        "seconds": seconds,
    }


def evaluate_on_unseen_panels(
    hybrid,
    category_dir,
    seed: int,
    count: int,
    channels: int = 3,
    progress: bool = False,
) -> dict[str, Any] | None:
    """A fitted hybrid on ``count`` new panels of the generator that wrote a synthetic dataset
    (``category_dir``), with a ``seed`` nothing was fitted or chosen on; every defect's type and
    level is known. None for a dataset the generator did not write, or ``count`` 0."""
    from data.synthetic import PanelSet, generator_of_dataset

    generator = generator_of_dataset(category_dir, seed)
    if generator is None or not count:
        return None
    panels = PanelSet(generator, count, channels=channels)
    evaluation = evaluate_hybrid(hybrid, panels, progress=progress)
    return {
        "split": f"unseen panels (generator seed {seed})",
        "images": len(panels),
        "metrics": evaluation["metrics"]["hybrid"],
        "intervals": evaluation["intervals"] and evaluation["intervals"]["intervals"]["hybrid"],
        "grading": evaluation["grading"],
        "operating_point": evaluation["operating_point"],
    }


def operating_point_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the hybrid's image threshold does on a split: the share of defect-free images it
    flags, the share of defective ones it passes, and the levels defect-free images get."""
    normal = [r for r in records if not r["label"]]
    defective = [r for r in records if r["label"]]
    levels: dict[str, int] = {}
    for record in normal:
        levels[str(record["level"])] = levels.get(str(record["level"]), 0) + 1
    return {
        "false_alarm_rate": float(np.mean([bool(r["flagged"]) for r in normal]))
        if normal
        else float("nan"),
        "miss_rate": float(np.mean([not r["flagged"] for r in defective]))
        if defective
        else float("nan"),
        "normal_images": len(normal),
        "defective_images": len(defective),
        "levels_of_normal_images": dict(sorted(levels.items())),
    }


def cross_validate_hybrid(
    make_hybrid: Callable[[], Any],
    validation: list[dict[str, Any]],
    dataset,
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 4,
    fit_workers: int | None = 1,
) -> tuple[dict[str, Any], Any]:
    """Fit on the dataset's own labeled defects without ever scoring an image with a hybrid
    that saw it.

    The test split is cut into ``folds`` folds, stratified by label. Each fold is scored by a
    hybrid fitted on ``validation`` (held-out normals and injected defects) plus the other
    folds' images (real defects with their masks and type names); the metrics pool these
    out-of-fold answers. Member outputs are computed once per image and reused by every fold.
    ``batch_size``: images per batch through the members. ``fit_workers``: processes fitting
    the folds' hybrids and the final one side by side (``fusion.fitting.fit_hybrids``).
    Returns ``(evaluation, hybrid)``: ``evaluate_hybrid``'s result with a ``cross_validation``
    entry, and the hybrid to keep, fitted on ``validation`` and the whole split.
    """
    from sklearn.model_selection import StratifiedKFold

    from fusion.fitting import fit_hybrids

    probe = make_hybrid()
    started = time.perf_counter()
    samples = [labeled_defect_sample(dataset[index]) for index in range(len(dataset))]
    outputs = probe.member_outputs_many(
        (to_tensor(s["image"]) for s in samples), batch_size, progress, "test members"
    )
    labeled = [{**s, "member_outputs": out} for s, out in zip(samples, outputs)]
    member_seconds = time.perf_counter() - started
    validation_outputs = probe.member_outputs_many(
        (to_tensor(s["image"]) for s in validation), batch_size, progress, "validation members"
    )
    validation = [{**s, "member_outputs": out} for s, out in zip(validation, validation_outputs)]
    labels = np.array([s["label"] for s in labeled])
    k = min(folds, int(labels.sum()), int((labels == 0).sum()))
    if k < 2:
        raise ValueError(
            f"cross-validation needs at least 2 defective and 2 normal test images, got "
            f"{int(labels.sum())} and {int((labels == 0).sum())}"
        )
    fold_of = np.empty(len(labels), dtype=int)
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = fold
    # The k folds' hybrids, then the one to keep, fitted on everything.
    sample_sets = [
        validation + [s for s, f in zip(labeled, fold_of) if f != fold] for fold in range(k)
    ]
    *hybrids, final = fit_hybrids(
        make_hybrid, [*sample_sets, validation + labeled], fit_workers, progress, "fits"
    )
    evaluation = evaluate_hybrid(
        hybrids[0], dataset, progress, outputs, lambda index: hybrids[fold_of[index]]
    )
    evaluation["seconds"] += member_seconds
    evaluation["cross_validation"] = {
        "folds": k,
        "defective_images": int(labels.sum()),
        "normal_images": int((labels == 0).sum()),
        "types": sorted({d["type"] for s in labeled for d in s["defects"]}),
        # What each fold's choosing combiners (auto, rank_or_member) chose (None: a fixed
        # combiner): folds that choose differently pool their answers less well than one rule.
        "fold_choices": [
            {
                level: choice and choice["chosen"]
                for level, choice in hybrid.validation_["fusion_choice"].items()
            }
            for hybrid in hybrids
        ],
    }
    return evaluation, final


def shared_work_cost(hybrid, images: list[torch.Tensor]) -> dict[str, float]:
    """Milliseconds per image of the hybrid's members run together (shared backbones run once
    per batch; with tiling, every tile batch goes through all members) against the sum of each
    member run on its own, on the same images."""
    from members.member_set import MemberSet
    from tiling import infer_tiled, infer_tiled_options

    tiling, size = hybrid.options["tiling"], size_pair(hybrid.options["image_size"])
    if tiling:
        options = infer_tiled_options(tiling)

        def run(member_set: MemberSet, count: int) -> None:
            for image in images[:count]:
                infer_tiled(member_set, image, **options)
    elif size is not None:
        # Each image resized to the members' input first: test images may differ in size.
        batch = torch.cat(
            [
                torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")
                for image in images
            ]
        )

        def run(member_set: MemberSet, count: int) -> None:
            member_set(batch[:count])
    else:

        def run(member_set: MemberSet, count: int) -> None:
            for image in images[:count]:  # native sizes, which may differ: one at a time
                member_set(image[None])

    shared = hybrid.member_set
    timings = {}
    with torch.no_grad():
        run(shared, 1)  # warm-up
        started = time.perf_counter()
        run(shared, len(images))
        timings["members_together_ms"] = (time.perf_counter() - started) * 1000 / len(images)
        total = 0.0
        for name in shared.names:
            alone = MemberSet({name: shared.members[name]}, share_backbones=False)
            started = time.perf_counter()
            run(alone, len(images))
            elapsed = (time.perf_counter() - started) * 1000 / len(images)
            timings[f"{name}_alone_ms"] = elapsed
            total += elapsed
    timings["members_sum_ms"] = total
    timings["saving"] = 1 - timings["members_together_ms"] / total if total > 0 else float("nan")
    return timings

"""Scoring a detector on a labeled split: streaming detection metrics and per-image records.

Used by the benchmark (each member), the ensemble (the hybrid against each member) and the
retraining job (champion against challenger). A detector is anything that maps a batch of
images to scores and maps: a member, a member behind tiled inference, or a hybrid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from metrics import get_metric

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
) -> Evaluation:
    """Run ``predict`` over ``batches`` and compute image metrics and, when ``pixel_metrics``
    and the split has defective pixels, pixel metrics. Maps stream into the metrics batch by
    batch; only per-image scores are kept."""
    image_metrics = {name: get_metric(name) for name in IMAGE_METRICS}
    pixel = {name: get_metric(name) for name in PIXEL_METRICS} if pixel_metrics else {}
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
    return Evaluation(values, records, len(records), seconds, notes)

"""Scores of the grading stage against truth.

``SEMUMetric``: mean SEMU of labelled regions (mask per image), measured as the grading stage
measures them, with the same ``metrics.severity.semu`` the synthetic generator uses.
``grading_scores``: level accuracy (exact, within one) and type macro-F1 of graded regions paired
with their truth defects. ``grading_figures``: what an inspection engineer checks end to end:
which true defects were found (recall per true level), the level and type confusion matrices,
how far the measured area and contrast are from the truth, and the median level the images of
each true level got.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import f1_score

from grading.regions import Region, measure_region
from metrics.quality import MeanOverImages, image_batch


def grading_scores(pairs: Sequence[tuple[Region, Mapping[str, Any]]]) -> dict[str, float]:
    """Exact and within-one level accuracy (over defects with a true level) and type macro-F1
    (``unknown`` counts as wrong) of graded regions paired with their truth defects."""
    nan = float("nan")
    if not pairs:
        return {"level_accuracy": nan, "level_within_one": nan, "type_macro_f1": nan, "n": 0}
    leveled = [(region, defect) for region, defect in pairs if defect.get("level") is not None]
    predicted = np.array([region.level for region, _ in leveled])
    truth = np.array([int(defect["level"]) for _, defect in leveled])
    true_types = [str(defect["type"]) for _, defect in pairs]
    types = [str(region.type) for region, _ in pairs]
    return {
        "level_accuracy": float((predicted == truth).mean()) if leveled else nan,
        "level_within_one": float((np.abs(predicted - truth) <= 1).mean()) if leveled else nan,
        "type_macro_f1": float(
            f1_score(true_types, types, labels=sorted(set(true_types)), average="macro")
        ),
        "n": len(pairs),
        "n_with_level": len(leveled),
    }


def _relative_errors(pairs: Sequence[tuple[Region, Mapping[str, Any]]], key: str) -> np.ndarray:
    values = [
        (getattr(region, key), float(truth[key]))
        for region, truth in pairs
        if truth.get(key) not in (None, 0)
    ]
    if not values:
        return np.array([])
    # Of magnitudes: a dark and a bright defect read too weak both give a negative error.
    measured, true = np.abs(np.asarray(values, dtype=np.float64)).T
    return (measured - true) / true


def measurement_errors(pairs: Sequence[tuple[Region, Mapping[str, Any]]]) -> dict[str, Any]:
    """Median relative error of the magnitude (signed: the bias; negative reads too small) and
    median absolute relative error of the measured ``area_px`` and ``contrast_pct`` against the
    truth's, overall and per type."""
    out: dict[str, Any] = {}
    for key in ("area_px", "contrast_pct"):
        errors = _relative_errors(pairs, key)
        by_type = {}
        for kind in sorted({str(t["type"]) for _, t in pairs}):
            typed = _relative_errors([(r, t) for r, t in pairs if str(t["type"]) == kind], key)
            if typed.size:
                by_type[kind] = float(np.median(np.abs(typed)))
        out[key] = {
            "n": int(errors.size),
            "median_abs_relative_error": float(np.median(np.abs(errors))) if errors.size else None,
            "median_relative_error": float(np.median(errors)) if errors.size else None,
            "median_abs_relative_error_by_type": by_type,
        }
    return out


def confusion(true: Sequence[Any], predicted: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Counts ``{true: {predicted: n}}`` (labels as strings, sorted)."""
    table: dict[str, dict[str, int]] = {}
    for t, p in zip(true, predicted):
        row = table.setdefault(str(t), {})
        row[str(p)] = row.get(str(p), 0) + 1
    return {t: dict(sorted(row.items())) for t, row in sorted(table.items())}


def grading_figures(
    stage_pairs: Sequence[tuple[Region, Mapping[str, Any]]],
    detected_pairs: Sequence[tuple[Region, Mapping[str, Any]]],
    image_levels: Sequence[tuple[int, int]] = (),
    graded_from: int = 2,
) -> dict[str, Any]:
    """End-to-end figures of the grading stage.

    ``stage_pairs``: every true defect, graded on its own true region (one pair per defect).
    ``detected_pairs``: the regions the hybrid found, each with the true defect it overlaps
    most. ``image_levels``: ``(predicted, true)`` image levels (0: defect-free).

    Returns ``regions_found_end_to_end`` (the share of true defects a detected region
    touches), ``detection_recall_by_level`` (found / present per true level), the recall of the
    defects of level ``graded_from`` and above, ``level_confusion`` and ``type_confusion``
    (true -> predicted, over detected regions), ``measurement`` (``measurement_errors`` on the
    detected regions and on the true regions) and ``median_level_by_true_level`` (images).
    """
    found = {id(truth) for _, truth in detected_pairs}
    recall: dict[str, float] = {}
    present_graded = found_graded = 0
    levels = sorted({int(t["level"]) for _, t in stage_pairs if t.get("level") is not None})
    for level in levels:
        truths = [t for _, t in stage_pairs if t.get("level") == level]
        hits = sum(id(t) in found for t in truths)
        recall[str(level)] = hits / len(truths)
        if level >= graded_from:
            present_graded += len(truths)
            found_graded += hits
    leveled = [(r, t) for r, t in detected_pairs if t.get("level") is not None]
    by_true_level: dict[str, list[int]] = {}
    for predicted, true in image_levels:
        by_true_level.setdefault(str(true), []).append(int(predicted))
    detected = sum(id(t) in found for _, t in stage_pairs)
    return {
        "defects": len(stage_pairs),
        "defects_detected": detected,
        # The share of true defect regions that a region at the operating point touches.
        "regions_found_end_to_end": detected / len(stage_pairs) if stage_pairs else float("nan"),
        "detection_recall_by_level": recall,
        f"detection_recall_level_{graded_from}_and_above": (
            found_graded / present_graded if present_graded else float("nan")
        ),
        "level_confusion": confusion(
            [int(t["level"]) for _, t in leveled], [r.level for r, _ in leveled]
        ),
        "type_confusion": confusion(
            [t["type"] for _, t in detected_pairs], [r.type for r, _ in detected_pairs]
        ),
        "measurement": {
            "detected_regions": measurement_errors(detected_pairs),
            "true_regions": measurement_errors(stage_pairs),
        },
        "median_level_by_true_level": {
            level: float(np.median(values)) for level, values in sorted(by_true_level.items())
        },
    }


class SEMUMetric(MeanOverImages):
    """Mean SEMU of the labelled regions in ``masks`` (connected components) of ``images``."""

    name = "semu"

    def __init__(self, pixel_pitch_mm: float = 0.1) -> None:
        self.pixel_pitch_mm = pixel_pitch_mm
        super().__init__()

    def update(self, images: Any, masks: Any) -> None:
        images, masks = image_batch(images), image_batch(masks)
        for image, mask in zip(images.mean(1).numpy(), masks[:, 0].numpy() > 0.5):
            labels, count = ndimage.label(mask)
            for k in range(1, count + 1):
                region = labels == k
                found = measure_region(image, region, region.astype(float), self.pixel_pitch_mm)
                self._add([found.semu])

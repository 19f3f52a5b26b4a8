"""Scores of the grading stage against truth: level accuracy and type macro-F1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from grading.regions import Region


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

"""Scores of the grading stage against truth: level accuracy and type macro-F1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from grading.regions import Region


def grading_scores(pairs: Sequence[tuple[Region, Mapping[str, Any]]]) -> dict[str, float]:
    """Exact and within-one level accuracy and type macro-F1 (``unknown`` counts as wrong) of
    graded regions paired with their truth defects."""
    if not pairs:
        nan = float("nan")
        return {"level_accuracy": nan, "level_within_one": nan, "type_macro_f1": nan, "n": 0}
    predicted = np.array([region.level for region, _ in pairs])
    truth = np.array([int(defect["level"]) for _, defect in pairs])
    true_types = [str(defect["type"]) for _, defect in pairs]
    types = [str(region.type) for region, _ in pairs]
    return {
        "level_accuracy": float((predicted == truth).mean()),
        "level_within_one": float((np.abs(predicted - truth) <= 1).mean()),
        "type_macro_f1": float(
            f1_score(true_types, types, labels=sorted(set(true_types)), average="macro")
        ),
        "n": len(pairs),
    }

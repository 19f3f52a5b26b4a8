"""The ranking composite of a detector's figures (documented in the README): a weighted mean of
the detection metrics it has, ``0.3 image AUROC + 0.2 image AP + 0.2 pixel AUROC + 0.2 AUPRO +
0.1 pixel F1-max``, renormalized over the metrics present (image-level-only datasets have no
pixel metrics). The benchmark ranks jobs by it, ``ensemble`` may choose members by it and
``retrain`` may compare challenger and champion by it.
"""

from __future__ import annotations

import math

COMPOSITE_WEIGHTS = {
    "image_auroc": 0.3,
    "image_ap": 0.2,
    "pixel_auroc": 0.2,
    "aupro": 0.2,
    "pixel_f1_max": 0.1,
}


def composite(metrics: dict[str, float]) -> float:
    """The ranking score of one detector's figures (nan when it has none of the metrics)."""
    present = {
        k: w
        for k, w in COMPOSITE_WEIGHTS.items()
        if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])
    }
    if not present:
        return float("nan")
    return sum(metrics[k] * w for k, w in present.items()) / sum(present.values())

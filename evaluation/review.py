"""The test images an engineer must look at after an evaluation, with their overlays.

At the hybrid's operating point, two kinds of test image are wrong: a **miss** (a defective
image the hybrid did not flag) and a **false alarm** (a defect-free image it flagged). The worst
misses are the defective images scored lowest (furthest from being caught); the false alarms
are listed from the highest score down (the surest wrong answers). Each gets an overlay that
shows the decision (``tiling.Decision``): the heatmap, the pixel threshold's contour, the
regions found with their type and level, and the true mask's outline.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tiling import save_heatmap_overlay

# The folder, beside the report, that holds the overlays of the cases.
REVIEW_FOLDER = "review"
MISSED = "missed"
FALSE_ALARM = "false alarm"


class ReviewCases:
    """Keeps, while a split is scored, the ``per_kind`` worst misses and the ``per_kind``
    highest-scored false alarms (``offer``), then writes their overlays (``write``). Only
    their fused maps and regions are kept, not the member maps."""

    def __init__(self, per_kind: int = 8) -> None:
        self.per_kind = per_kind
        self.counts = {MISSED: 0, FALSE_ALARM: 0}
        # Heaps whose smallest key is the case to drop first: the highest-scored miss, the
        # lowest-scored false alarm.
        self._heaps: dict[str, list[tuple[float, int, Any]]] = {MISSED: [], FALSE_ALARM: []}

    def offer(self, index: int, label: int, prediction: Any) -> None:
        """Image ``index`` of the split, its true ``label`` and its ``fusion.hybrid.Prediction``."""
        if label and not prediction.label:
            kind, key = MISSED, -prediction.score
        elif not label and prediction.label:
            kind, key = FALSE_ALARM, prediction.score
        else:
            return
        self.counts[kind] += 1
        heap = self._heaps[kind]
        case = (key, index, replace(prediction, member_maps=None))
        if len(heap) < self.per_kind:
            heapq.heappush(heap, case)
        elif key > heap[0][0]:
            heapq.heapreplace(heap, case)

    def write(self, dataset: Any, folder: Path) -> list[dict[str, Any]]:
        """Write each kept case's overlay to ``folder`` (``dataset[index]`` gives its image and
        true mask) and return one entry per case, worst first within each kind: ``kind``,
        ``path``, ``score``, ``level``, ``regions`` (type and level of each) and ``overlay``
        (``<folder name>/<file>``: relative to the folder's parent, where the report is)."""
        entries = []
        for kind, heap in self._heaps.items():
            for rank, (_, index, prediction) in enumerate(sorted(heap, reverse=True), 1):
                sample = dataset[index]
                mask = sample.get("mask")
                truth = None
                if mask is not None and int(sample["label"]):
                    truth = np.asarray(mask).reshape(prediction.anomaly_map.shape)
                stem = Path(str(sample["path"])).stem
                name = f"{kind.replace(' ', '-')}-{rank:02d}-{stem}.png"
                fused = prediction.anomaly_map
                overlay = save_heatmap_overlay(
                    sample["image"],
                    fused,
                    folder / name,
                    vmin=0.0,
                    vmax=max(2 * prediction.pixel_threshold, float(np.max(fused))),
                    decision=prediction.decision(truth),
                )
                entries.append(
                    {
                        "kind": kind,
                        "path": str(sample["path"]),
                        "score": prediction.score,
                        "level": prediction.level,
                        "regions": [
                            f"{r.type or 'untyped'} L{r.level}" for r in prediction.regions
                        ],
                        "overlay": f"{folder.name}/{overlay.name}",
                    }
                )
        return entries

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
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from tiling import save_heatmap_overlay

log = logging.getLogger(__name__)

# The folder, beside the report, that holds the overlays of the cases.
REVIEW_FOLDER = "review"
MISSED = "missed"
FALSE_ALARM = "false alarm"


class ReviewCases:
    """Keeps, while a split is scored, the ``per_kind`` worst misses and the ``per_kind``
    highest-scored false alarms (``offer``), each with its overlay in ``folder``, written when
    it is kept and removed when a worse case takes its place: no map is held in memory.

    Overlays an earlier run left in ``folder`` are removed first: the folder holds this
    evaluation's cases only."""

    def __init__(self, folder: Path, per_kind: int = 8) -> None:
        self.folder = Path(folder)
        self.per_kind = per_kind
        self.counts = {MISSED: 0, FALSE_ALARM: 0}
        # Heaps whose smallest key is the case to drop first: the highest-scored miss, the
        # lowest-scored false alarm; of equal scores, the later image.
        self._heaps: dict[str, list[tuple[tuple[float, int], dict[str, Any]]]] = {
            MISSED: [],
            FALSE_ALARM: [],
        }
        if self.folder.is_dir():
            for stale in self.folder.glob("*.png"):
                if stale.name.startswith((_file_kind(MISSED), _file_kind(FALSE_ALARM))):
                    stale.unlink()

    def offer(self, index: int, sample: dict[str, Any], prediction: Any) -> None:
        """Image ``index`` of the split (``sample``: its ``image``, ``label``, ``path`` and
        ``mask``) and its ``fusion.hybrid.Prediction``."""
        label = int(sample["label"])
        if label and not prediction.label:
            kind, key = MISSED, -prediction.score
        elif not label and prediction.label:
            kind, key = FALSE_ALARM, prediction.score
        else:
            return
        self.counts[kind] += 1
        heap = self._heaps[kind]
        rank = (key, -index)
        if not math.isfinite(key) or (len(heap) == self.per_kind and rank <= heap[0][0]):
            return
        case = (rank, self._case(kind, index, sample, prediction))
        if len(heap) < self.per_kind:
            heapq.heappush(heap, case)
        else:
            _, dropped = heapq.heapreplace(heap, case)
            if dropped["overlay"]:
                (self.folder.parent / dropped["overlay"]).unlink(missing_ok=True)

    def _case(self, kind: str, index: int, sample: dict[str, Any], prediction: Any) -> dict:
        mask = sample.get("mask")
        truth = None
        if mask is not None and int(sample["label"]):
            truth = np.asarray(mask).reshape(prediction.anomaly_map.shape)
        name = f"{_file_kind(kind)}{index:05d}-{Path(str(sample['path'])).stem}.png"
        fused = prediction.anomaly_map
        case = {
            "kind": kind,
            "path": str(sample["path"]),
            "score": prediction.score,
            "level": prediction.level,
            "regions": [region.label for region in prediction.regions],
            "overlay": f"{self.folder.name}/{name}",
        }
        try:
            save_heatmap_overlay(
                sample["image"],
                fused,
                self.folder / name,
                vmin=0.0,
                vmax=max(2 * prediction.pixel_threshold, float(np.max(fused))),
                decision=prediction.decision(truth),
            )
        except OSError as exc:  # a full disk: the case is still listed, the scoring goes on
            log.warning("could not write the overlay of %s: %s", sample["path"], exc)
            case.update(overlay=None, overlay_error=str(exc))
        return case

    def summary(self) -> dict[str, Any]:
        """``counts`` of each kind, ``per_kind`` and ``cases``: the kept ones, worst first within
        each kind (``kind``, ``path``, ``score``, ``level``, ``regions`` as type and level,
        ``overlay``: ``<folder name>/<file>``, relative to the folder's parent)."""
        cases = [
            case
            for heap in self._heaps.values()
            for _, case in sorted(heap, key=lambda item: (-item[0][0], -item[0][1]))
        ]
        return {"counts": dict(self.counts), "per_kind": self.per_kind, "cases": cases}


def _file_kind(kind: str) -> str:
    return kind.replace(" ", "-") + "-"

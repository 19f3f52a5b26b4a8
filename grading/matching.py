"""Regions paired with the truth defects they stand for.

``match_regions``: each detected region with the truth defect it overlaps most (None: a false
detection). ``truth_regions``: each truth defect's own region, measured as a detection of it
would be. Grading is fitted on both views and scored on both (``grading.evaluation``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from grading.regions import Region, luminance, measure_region


def match_regions(
    regions: Sequence[Region], instances: np.ndarray | None, defects: Sequence[Mapping[str, Any]]
) -> list[tuple[Region, Mapping[str, Any] | None]]:
    """Each region with the truth defect it overlaps most (None: a false detection)."""
    by_id = {int(d["id"]): d for d in defects}
    out = []
    for region in regions:
        truth = None
        if instances is not None:
            x0, y0, x1, y1 = region.bbox
            instances = np.asarray(instances)
            ids = instances.reshape(instances.shape[-2:])[y0:y1, x0:x1][region.mask]
            ids = ids[ids > 0]
            if ids.size:
                truth = by_id.get(int(np.bincount(ids).argmax()))
        out.append((region, truth))
    return out


def truth_regions(
    image: np.ndarray,
    fused: np.ndarray,
    instances: np.ndarray,
    defects: Sequence[Mapping[str, Any]],
    pixel_pitch_mm: float,
) -> list[tuple[Region, Mapping[str, Any]]]:
    """Each true defect measured as a region: its mask (``instances == id``), grown by two
    pixels as a detection would be, measured on ``image`` like any detected region."""
    lum = luminance(image)
    instances = np.asarray(instances).reshape(fused.shape)
    out = []
    for defect in defects:
        mask = instances == int(defect["id"])
        if mask.any():
            detection = ndimage.binary_dilation(mask, iterations=2)
            out.append((measure_region(lum, detection, fused, pixel_pitch_mm), defect))
    return out

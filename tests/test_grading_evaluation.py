"""End-to-end grading figures: recall per true level, confusion matrices, measurement errors."""

from __future__ import annotations

import numpy as np
import pytest

from grading.evaluation import grading_figures, measurement_errors
from grading.regions import Region


def region(level: int, kind: str, area: int, contrast: float) -> Region:
    return Region(
        bbox=[0, 0, 1, 1],
        area_px=area,
        area_mm2=area * 0.01,
        contrast_pct=contrast,
        semu=1.0,
        score=1.0,
        mean_score=1.0,
        type=kind,
        level=level,
    )


def truth(level: int, kind: str, area: int, contrast: float) -> dict:
    return {"type": kind, "level": level, "area_px": area, "contrast_pct": contrast}


def test_grading_figures_count_found_defects_confusions_and_errors():
    defects = [
        truth(1, "spot_mura", 100, 2.0),  # faint: missed
        truth(2, "spot_mura", 200, 4.0),
        truth(3, "scratch", 50, -10.0),
        truth(4, "scratch", 80, -20.0),
    ]
    stage = [(region(d["level"], d["type"], d["area_px"], d["contrast_pct"]), d) for d in defects]
    detected = [
        (region(2, "spot_mura", 220, 3.0), defects[1]),  # area +10 %, contrast -25 %
        (region(2, "spot_mura", 50, -8.0), defects[2]),  # wrong type, one level low
        (region(4, "scratch", 80, -20.0), defects[3]),
    ]
    figures = grading_figures(stage, detected, image_levels=[(0, 0), (1, 0), (2, 2), (4, 4)])
    assert figures["defects"] == 4 and figures["defects_detected"] == 3
    assert figures["detection_recall_by_level"] == {"1": 0.0, "2": 1.0, "3": 1.0, "4": 1.0}
    assert figures["detection_recall_level_2_and_above"] == 1.0
    assert figures["level_confusion"] == {"2": {"2": 1}, "3": {"2": 1}, "4": {"4": 1}}
    assert figures["type_confusion"] == {
        "scratch": {"scratch": 1, "spot_mura": 1},
        "spot_mura": {"spot_mura": 1},
    }
    errors = figures["measurement"]["detected_regions"]
    assert errors["area_px"]["median_relative_error"] == pytest.approx(0.0)  # 0.1, 0, 0
    assert errors["contrast_pct"]["median_abs_relative_error"] == pytest.approx(0.2)  # .25 .2 0
    assert figures["measurement"]["true_regions"]["area_px"]["median_abs_relative_error"] == 0
    assert figures["median_level_by_true_level"] == {"0": 0.5, "2": 2.0, "4": 4.0}


def test_measurement_errors_are_signed_relative_to_the_truth():
    defects = [truth(2, "spot_mura", 100, -4.0) for _ in range(3)]
    pairs = [(region(2, "spot_mura", 100, c), d) for c, d in zip((-3.0, -3.6, -4.4), defects)]
    errors = measurement_errors(pairs)["contrast_pct"]
    # Of the magnitude: these dark spots read 10 % too weak (the bias), however signed.
    assert errors["median_relative_error"] == pytest.approx(-0.1)
    assert errors["median_abs_relative_error"] == pytest.approx(0.1)
    assert errors["median_abs_relative_error_by_type"] == {"spot_mura": pytest.approx(0.1)}
    assert measurement_errors([])["area_px"]["n"] == 0
    assert np.isnan(grading_figures([], [])["detection_recall_level_2_and_above"])


def test_region_threshold_finds_the_small_defects_a_pixel_f1_threshold_loses():
    from grading.graders import ThresholdCalibrator

    rng = np.random.default_rng(0)
    maps, masks = [], []
    for index in range(24):
        anomaly_map = rng.normal(0.0, 0.05, (64, 64))
        mask = np.zeros((64, 64), bool)
        if index % 2:  # a large, strong defect and a small, fainter one
            mask[10:40, 10:40] = True
            anomaly_map[4:46, 4:46] += 0.7  # the map spreads beyond the large defect's mask
            anomaly_map[10:40, 10:40] += 0.3
            mask[50:53, 50:53] = True
            anomaly_map[50:53, 50:53] += 0.45
        maps.append(anomaly_map)
        masks.append(mask)
    pixel = ThresholdCalibrator("f1").fit(maps, masks)
    region = ThresholdCalibrator("region").fit(maps, masks)
    # Pixel F1 trims the large defects' spread and with it the small ones.
    small_found = [m[50:53, 50:53].max() >= pixel.threshold_ for m in maps[1::2]]
    assert not any(small_found)
    assert all(m[50:53, 50:53].max() >= region.threshold_ for m in maps[1::2])
    # ... and it raises no region on the noise.
    assert all(m.max() < region.threshold_ for m in maps[0::2])
    assert region.method_ == "region" and region.region_f1_ == 1.0
    unlabeled = ThresholdCalibrator("region").fit(maps[0::2], masks[0::2])
    assert unlabeled.method_ == "quantile"  # no defects: a quantile of the normal pixels

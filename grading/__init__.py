"""Grading: defect regions of the fused map, their measurements, severity level and type."""

from grading.graders import (
    UNKNOWN,
    OrdinalGrader,
    RuleGrader,
    ThresholdCalibrator,
    TypeClassifier,
)
from grading.regions import Region, find_regions, luminance, measure_region

__all__ = [
    "UNKNOWN",
    "OrdinalGrader",
    "Region",
    "RuleGrader",
    "ThresholdCalibrator",
    "TypeClassifier",
    "find_regions",
    "luminance",
    "measure_region",
]

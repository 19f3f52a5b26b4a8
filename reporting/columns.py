"""How a benchmark job's results are shown: its variant's name, the figures the leaderboard and
the report list for it, and which values count as figures."""

from __future__ import annotations

import math
from typing import Any

from data.images import size_label

METRIC_COLUMNS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")
# The 95 % bootstrap intervals of the headline test figures (``intervals`` of a job).
INTERVAL_COLUMNS = ("image_auroc_interval", "aupro_interval")
COST_COLUMNS = (
    "fit_seconds",
    "images_per_second",
    "backbone_images_per_second",
    "head_ms_per_image",
    "latency_ms",
    "peak_rss_mb",
    "model_bytes",
)
# Reconstruction members' figures on the test split (``reconstruction_quality`` of a job).
RECONSTRUCTION_COLUMNS = ("psnr_db", "ssim", "ms_ssim", "lpips")
# A job's row in leaderboard.csv and in the report's job table: the test composite beside the
# validation one (the ensemble chooses members on it), then its figures.
JOB_COLUMNS = (
    "overall_rank",
    "variant",
    "dataset",
    "category",
    "status",
    "composite",
    "val_composite",
    *METRIC_COLUMNS,
    *INTERVAL_COLUMNS,
    *COST_COLUMNS,
    *RECONSTRUCTION_COLUMNS,
)
# The parts of a variant's name, in columns of their own in leaderboard.csv (to filter on).
VARIANT_COLUMNS = ("member", "backbone", "image_size", "tiling")


def finite(value: Any) -> bool:
    """A number that is neither nan nor infinite (a missing figure is not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def variant_name(row: dict[str, Any]) -> str:
    """A job's variant across categories and datasets: member, backbone, size or tiling."""
    parts = [row["member"]]
    if row.get("backbone"):
        parts.append(str(row["backbone"]))
    if row.get("tiling"):
        parts.append("tiled")
    elif row.get("image_size"):
        parts.append(f"{size_label(row['image_size'])}px")
    return " / ".join(parts)

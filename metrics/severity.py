"""SEMU and severity levels, shared by the synthetic generator and the grading stage.

SEMU (SEMI D31-1102) expresses a mura's contrast in units of the just-noticeable difference:
``semu = |Cx| / (1.97 / Sx**0.33 + 0.72)`` with ``Cx`` the mean contrast in percent of the local
background and ``Sx`` the area in mm². Pixel, line and scratch defects are outside SEMU's scope;
their level comes from size and contrast rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

MURA_TYPES: tuple[str, ...] = ("spot_mura", "line_mura", "area_mura")
DEFECT_TYPES: tuple[str, ...] = (
    "spot_mura",
    "line_mura",
    "area_mura",
    "dark_pixel",
    "bright_pixel",
    "line_defect",
    "scratch",
    "particle",
)

# Upper edges of levels 1..4; level 5 is everything at or above the last edge.
SEMU_LEVEL_EDGES: tuple[float, float, float, float] = (1.0, 2.0, 3.0, 5.0)

# Rules for types outside SEMU's scope: each of area (px) and |contrast| (%) falls into a bin
# 1..5 by these edges, and the level is the rounded-up mean of the two bins, so a defect must be
# both large and strong to reach level 5.
DEFAULT_LEVEL_RULES: dict[str, dict[str, list[float]]] = {
    "dark_pixel": {"area_px": [2, 5, 10, 20], "contrast_pct": [20, 40, 60, 80]},
    "bright_pixel": {"area_px": [2, 5, 10, 20], "contrast_pct": [20, 40, 70, 110]},
    "line_defect": {"area_px": [64, 128, 256, 512], "contrast_pct": [5, 10, 20, 40]},
    "scratch": {"area_px": [40, 80, 160, 320], "contrast_pct": [5, 10, 20, 40]},
    "particle": {"area_px": [10, 25, 60, 150], "contrast_pct": [10, 20, 40, 60]},
}


def jnd_contrast(area_mm2: float | np.ndarray) -> float | np.ndarray:
    """Contrast in percent that makes a region of ``area_mm2`` exactly 1 SEMU."""
    area = np.asarray(area_mm2, dtype=np.float64)
    if np.any(area <= 0):
        raise ValueError(f"area_mm2 must be positive, got {area_mm2!r}")
    out = 1.97 / area**0.33 + 0.72
    return float(out) if out.ndim == 0 else out


def semu(contrast_pct: float | np.ndarray, area_mm2: float | np.ndarray) -> float | np.ndarray:
    """SEMU of a region with mean contrast ``contrast_pct`` (%, signed) and area ``area_mm2``."""
    out = np.abs(np.asarray(contrast_pct, dtype=np.float64)) / jnd_contrast(area_mm2)
    return float(out) if np.ndim(out) == 0 else out


def bin_level(value: float, edges: Sequence[float]) -> int:
    """Level 1..len(edges)+1 of ``value`` given ascending upper edges (value >= edge moves up)."""
    if len(edges) != 4 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"level edges must be 4 strictly ascending numbers, got {list(edges)}")
    return 1 + int(np.searchsorted(np.asarray(edges, dtype=np.float64), value, side="right"))


def level_from_semu(semu_value: float, edges: Sequence[float] = SEMU_LEVEL_EDGES) -> int:
    """Severity level 1-5 of a mura from its SEMU (L1 below the JND, L5 at 5 SEMU and above)."""
    return bin_level(semu_value, edges)


def level_from_rules(
    defect_type: str,
    area_px: float,
    contrast_pct: float,
    rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> int:
    """Severity level 1-5 of a non-mura defect from its size and contrast rules."""
    rules = DEFAULT_LEVEL_RULES if rules is None else rules
    if defect_type not in rules:
        raise KeyError(
            f"no level rule for defect type {defect_type!r}; rules exist for {sorted(rules)}"
        )
    rule = rules[defect_type]
    by_area = bin_level(area_px, rule["area_px"])
    by_contrast = bin_level(abs(contrast_pct), rule["contrast_pct"])
    return int(math.ceil((by_area + by_contrast) / 2))


def defect_level(
    defect_type: str,
    *,
    area_px: float,
    area_mm2: float,
    contrast_pct: float,
    semu_edges: Sequence[float] = SEMU_LEVEL_EDGES,
    rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> int:
    """Level 1-5 of one defect: SEMU bins for mura types, size/contrast rules for the rest.

    Types that are neither mura nor covered by a rule (a real dataset's own type names) are
    graded by SEMU, the one measure that is defined for any region.
    """
    rules = DEFAULT_LEVEL_RULES if rules is None else rules
    if defect_type in MURA_TYPES or defect_type not in rules:
        return level_from_semu(semu(contrast_pct, area_mm2), semu_edges)
    return level_from_rules(defect_type, area_px, contrast_pct, rules)

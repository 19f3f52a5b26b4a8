"""Synthetic OLED panels with graded, typed ground truth.

A lit panel is a luminance image: a gray level, a smooth low-frequency non-uniformity of a few
percent, vignetting, an optional sub-pixel grid, then shot and read noise. Panels of a line are
not alike (all off by default): each panel's luminance is off by up to ``gain_pct`` percent; its
non-uniformity, vignetting and noise amplitudes are the configured ones times a factor in
``[1 - panel_variation, 1 + panel_variation]``; and it carries up to ``background_mura`` faint
mura blemishes within spec (spot, line or area mura below ``background_mura_semu`` SEMU each,
unlabeled: part of the background). These draws have a random stream of their own, so they do
not change which defects a panel gets. Defects of the eight default types are multiplicative
luminance changes ``I * (1 + a * p)`` with a profile ``p`` in [0, 1] and an amplitude ``a``:

- ``spot_mura`` soft round blob; ``line_mura`` soft band; ``area_mura`` large irregular cloud;
- ``dark_pixel`` / ``bright_pixel`` 1-30 px clusters; ``line_defect`` full or partial row or
  column; ``scratch`` thin curved line; ``particle`` small sharp-edged dark blob.

Truth of a defect: its mask (``p >= 0.5`` for soft profiles, ``p > 0`` for sharp ones), bbox
``[x0, y0, x1, y1]`` (exclusive ends), ``contrast_pct`` = the mean over the mask of
``(I_defect - I_background) / I_background * 100`` where the background is the panel without
that defect (so ``contrast_pct = 100 * a * mean(p over mask)``), ``area_px``, ``area_mm2`` (from
``pixel_pitch_mm``), ``semu`` and ``level`` (SEMU bins for mura, size and contrast rules for the
others; ``metrics.severity``). Target levels are drawn with ``level_weights`` (uniform by default;
a production line's mix is mostly faint, near the just-noticeable difference), and size and
contrast are then chosen to land in that level, so every level occurs for every type and the
drawn mix is the mix the defects get: a mura's SEMU is drawn across its level's band (level 1:
0.35 to 1 SEMU); a pixel, line, scratch or particle defect gets an area bin and a contrast bin of
its rule whose rounded-up mean is the level, and an area and a contrast drawn across those bins
(so a level-1 line is short and faint, a level-1 dark pixel one pixel at low contrast).

``inject_defects`` puts the same defects into any real defect-free image (contrast relative to
the local luminance), which gives labeled validation data where real defects are scarce.

``write_dataset`` writes panels in the MVTec layout plus ``truth.jsonl`` (one line per test
image with every defect's fields); ``python -m pipelines.synthetic`` writes the embedded
default's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from data.images import size_pair
from metrics.severity import (
    DEFAULT_LEVEL_RULES,
    DEFECT_TYPES,
    MURA_TYPES,
    SEMU_LEVEL_EDGES,
    defect_level,
    jnd_contrast,
    semu,
)

SHARP_TYPES = ("dark_pixel", "bright_pixel", "line_defect", "scratch", "particle")
# SEMU ranges to draw from for each mura level (edges from SEMU_LEVEL_EDGES by default).
_LOWEST_SEMU, _HIGHEST_SEMU_FACTOR = 0.35, 1.6
# Area (px) of a sharp defect: the bins of its level rule, from a quarter of the first edge to
# twice the last; and what each type can be (a cluster of 1-30 px, a line at least 16 px long).
_LOWEST_AREA_FACTOR, _HIGHEST_AREA_FACTOR = 0.25, 2.0
_MAX_CLUSTER_PX, _MIN_LINE_PX = 30, 16


@dataclass
class Defect:
    """One rendered defect: its profile window and its truth."""

    type: str
    window: tuple[slice, slice]
    profile: np.ndarray  # float32 in [0, 1], the size of the window
    amplitude: float  # relative luminance change at profile 1
    mask: np.ndarray  # bool, the size of the window
    truth: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _fade(n: int, share: float = 0.2) -> np.ndarray:
    """1 inside, falling smoothly (smoothstep) to 0 over the outer ``share`` of ``n`` at both
    ends."""
    ramp = np.clip((np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5) / (share * n), 0, 1)
    return ramp * ramp * (3 - 2 * ramp)


def _panel_size(size: int | Sequence[int]) -> tuple[int, int]:
    height, width = size_pair(size) or (0, 0)
    if min(height, width) < 32:
        raise ValueError(f"panel size must be at least 32 px, got {size!r}")
    return height, width


class PanelGenerator:
    """Seeded generator of lit-panel images with defects of known type, contrast and level.

    The same ``(seed, split, index)`` always gives the same image, in any call order.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 256,
        gray_level: float = 0.4,
        nonuniformity_pct: float = 3.0,
        vignetting_pct: float = 4.0,
        shot_noise: float = 0.002,
        read_noise: float = 0.001,
        subpixel_grid: bool = False,
        grid_depth_pct: float = 1.5,
        rgb: bool = False,
        pixel_pitch_mm: float = 0.1,
        defect_types: Sequence[str] = DEFECT_TYPES,
        max_defects: int = 2,
        semu_edges: Sequence[float] = SEMU_LEVEL_EDGES,
        level_rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        level_weights: Sequence[float] | None = None,
        gain_pct: float = 0.0,
        panel_variation: float = 0.0,
        background_mura: int = 0,
        background_mura_semu: float = 0.25,
        seed: int = 0,
    ) -> None:
        unknown = sorted(set(defect_types) - set(DEFECT_TYPES))
        if unknown:
            raise ValueError(f"unknown defect type(s) {unknown}; known: {list(DEFECT_TYPES)}")
        if not 0 < gray_level < 1:
            raise ValueError(f"gray_level must be in (0, 1), got {gray_level}")
        if pixel_pitch_mm <= 0:
            raise ValueError(f"pixel_pitch_mm must be positive, got {pixel_pitch_mm}")
        if max_defects < 1:
            raise ValueError(f"max_defects must be >= 1, got {max_defects}")
        if level_weights is not None:
            weights = np.asarray(level_weights, dtype=float)
            if weights.shape != (5,) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(
                    f"level_weights must be 5 non-negative numbers (levels 1-5) with a positive "
                    f"sum, got {list(level_weights)}"
                )
            level_weights = (weights / weights.sum()).tolist()
        if not 0 <= gain_pct < 100:
            raise ValueError(f"gain_pct must be in [0, 100), got {gain_pct}")
        if not 0 <= panel_variation <= 1:
            raise ValueError(f"panel_variation must be in [0, 1], got {panel_variation}")
        if background_mura < 0:
            raise ValueError(f"background_mura must be >= 0, got {background_mura}")
        if not 0 < background_mura_semu < 1:
            raise ValueError(
                f"background_mura_semu must be in (0, 1): within spec, below the just-noticeable "
                f"difference, got {background_mura_semu}"
            )
        self.size = _panel_size(size)
        self.gray_level = gray_level
        self.nonuniformity_pct = nonuniformity_pct
        self.vignetting_pct = vignetting_pct
        self.shot_noise = shot_noise
        self.read_noise = read_noise
        self.subpixel_grid = subpixel_grid
        self.grid_depth_pct = grid_depth_pct
        self.rgb = rgb
        self.pixel_pitch_mm = pixel_pitch_mm
        self.defect_types = tuple(defect_types)
        self.max_defects = max_defects
        self.semu_edges = tuple(semu_edges)
        self.level_rules = dict(DEFAULT_LEVEL_RULES if level_rules is None else level_rules)
        self.level_weights = level_weights
        self.gain_pct = gain_pct
        self.panel_variation = panel_variation
        self.background_mura = background_mura
        self.background_mura_semu = background_mura_semu
        self.seed = seed

    # --- background ----------------------------------------------------------------------

    def panel_settings(self, rng: np.random.Generator) -> dict[str, float]:
        """One panel's own look: luminance ``gain``, ``nonuniformity_pct``, ``vignetting_pct``
        and ``noise_scale``, drawn within ``gain_pct`` and ``panel_variation`` of the nominal."""

        def spread() -> float:
            return 1 + self.panel_variation * float(rng.uniform(-1, 1))

        return {
            "gain": 1 + self.gain_pct / 100 * float(rng.uniform(-1, 1)),
            "nonuniformity_pct": self.nonuniformity_pct * spread(),
            "vignetting_pct": self.vignetting_pct * spread(),
            "noise_scale": spread(),
        }

    def background(
        self, rng: np.random.Generator, settings: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """The defect-free panel before noise and background mura, float32 ``[H, W]``, with
        ``settings`` from ``panel_settings`` (None: the nominal ones)."""
        settings = settings or {}
        nonuniformity = settings.get("nonuniformity_pct", self.nonuniformity_pct)
        vignetting = settings.get("vignetting_pct", self.vignetting_pct)
        height, width = self.size
        coarse = ndimage.gaussian_filter(rng.normal(size=(8, 8)), 1.2)
        coarse = coarse / max(np.abs(coarse).max(), 1e-12)
        field_ = ndimage.zoom(coarse, (height / 8, width / 8), order=3, mode="reflect")
        field_ = field_[:height, :width].astype(np.float32)
        ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
        xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        center = rng.uniform(-0.2, 0.2, 2)
        vignette = 1 - vignetting / 100 * ((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / 2
        gray = self.gray_level * settings.get("gain", 1.0)
        panel = gray * (1 + nonuniformity / 100 * field_) * vignette
        if self.subpixel_grid:
            grid = np.ones(width, np.float32)
            grid[2::3] -= self.grid_depth_pct / 100
            panel = panel * grid[None, :]
        return panel.astype(np.float32)

    def background_blemishes(self, rng: np.random.Generator) -> list[Defect]:
        """Up to ``background_mura`` faint mura within spec (each below
        ``background_mura_semu``, at free places of one another): part of a defect-free panel."""
        occupied = np.zeros(self.size, bool)
        blemishes = []
        for _ in range(int(rng.integers(0, self.background_mura + 1))):
            defect_type = str(rng.choice(MURA_TYPES))
            profile, mask = self._fitted_profile(defect_type, 1, rng)
            window = self._place(mask, rng, occupied)
            if window is None:
                continue
            area_mm2 = float(mask.sum()) * self.pixel_pitch_mm**2
            contrast = rng.uniform(0, self.background_mura_semu) * jnd_contrast(area_mm2)
            amplitude = self._sign(defect_type, rng) * contrast / 100 / profile[mask].mean()
            blemishes.append(Defect(defect_type, window, profile, float(amplitude), mask))
        return blemishes

    def add_noise(
        self, image: np.ndarray, rng: np.random.Generator, scale: float = 1.0
    ) -> np.ndarray:
        """Shot and read noise, their amplitudes times ``scale``."""
        sigma = scale * np.sqrt(self.shot_noise**2 * np.clip(image, 0, None) + self.read_noise**2)
        noisy = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(noisy, 0.0, 1.0).astype(np.float32)

    # --- defects -------------------------------------------------------------------------

    def _contrast_for_level(
        self, defect_type: str, level: int, area_px: int, rng
    ) -> tuple[float, int]:
        """A contrast magnitude (%) that puts a defect of ``area_px`` into ``level`` (or the
        nearest level the size allows), and the level reached."""
        area_mm2 = area_px * self.pixel_pitch_mm**2
        if defect_type in MURA_TYPES or defect_type not in self.level_rules:
            edges = (_LOWEST_SEMU, *self.semu_edges, self.semu_edges[-1] * _HIGHEST_SEMU_FACTOR)
            target = rng.uniform(edges[level - 1], edges[level])
            return float(target * jnd_contrast(area_mm2)), level
        rule = self.level_rules[defect_type]
        area_edges = np.asarray(rule["area_px"], dtype=float)
        by_area = 1 + int(np.searchsorted(area_edges, area_px, side="right"))
        # level = ceil((by_area + by_contrast) / 2): the contrast bins that reach ``level``.
        wanted = [b for b in (2 * level - by_area - 1, 2 * level - by_area) if 1 <= b <= 5]
        if not wanted:
            wanted = [min(max(2 * level - by_area, 1), 5)]
        by_contrast = int(rng.choice(wanted))
        contrast_edges = [
            0.5 * rule["contrast_pct"][0],
            *rule["contrast_pct"],
            1.4 * rule["contrast_pct"][-1],
        ]
        low, high = contrast_edges[by_contrast - 1], contrast_edges[by_contrast]
        return float(rng.uniform(low, high * 0.999)), int(math.ceil((by_area + by_contrast) / 2))

    def _area_range(
        self, defect_type: str, level: int, rng: np.random.Generator
    ) -> tuple[int, int]:
        """The integer areas (px, both ends included) of one area bin of the type's rule from
        which a contrast bin reaches ``level`` (level = ceil((area bin + contrast bin) / 2))."""
        rule = self.level_rules.get(defect_type, DEFAULT_LEVEL_RULES[defect_type])
        edges = rule["area_px"]  # a type without a rule (graded by SEMU) keeps the default sizes
        edges = [_LOWEST_AREA_FACTOR * edges[0], *edges, _HIGHEST_AREA_FACTOR * edges[-1]]
        area_bin = int(rng.integers(max(1, 2 * level - 6), min(5, 2 * level - 1) + 1))
        low, high = edges[area_bin - 1], edges[area_bin]
        return max(1, math.ceil(low)), max(1, math.ceil(high) - 1)

    def _profile(self, defect_type: str, level: int, rng: np.random.Generator) -> np.ndarray:
        """The defect's profile in a window of its own, float32 in [0, 1]; a type with a level
        rule gets an area in one of the rule's area bins that can reach ``level``."""
        height, width = self.size
        side = min(height, width)
        if defect_type == "spot_mura":
            sigma = rng.uniform(0.012, 0.045) * side
            r = int(3 * sigma) + 1
            yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
            aspect = rng.uniform(0.7, 1.0)
            return np.exp(-(xx**2 + (yy / aspect) ** 2) / (2 * sigma**2)).astype(np.float32)
        if defect_type == "line_mura":
            length = int(rng.uniform(0.3, 0.8) * side)
            sigma = rng.uniform(1.2, 3.5) * max(1.0, side / 256)
            half = int(3 * sigma) + 1
            across = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * sigma**2))
            along = np.clip(
                np.minimum(np.arange(length), np.arange(length)[::-1]) / (0.1 * length), 0, 1
            )
            band = (along[:, None] * across[None, :]).astype(np.float32)
            return band if rng.random() < 0.5 else band.T.copy()
        if defect_type == "area_mura":
            h, w = (int(rng.uniform(0.2, 0.4) * s) for s in self.size)
            noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), min(h, w) / 8)
            noise = (noise - noise.min()) / max(np.ptp(noise), 1e-12)
            yy, xx = np.mgrid[0:h, 0:w]
            ellipse = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
            envelope = np.clip(1.2 - ellipse, 0, 1)
            cloud = ndimage.gaussian_filter(envelope * (0.4 + 0.6 * noise), min(h, w) / 20)
            # Faded out towards the window's border: a cloud has no edge to detect it by.
            cloud = cloud * _fade(h)[:, None] * _fade(w)[None, :]
            return (cloud / cloud.max()).astype(np.float32)
        if defect_type not in SHARP_TYPES:
            raise ValueError(f"unknown defect type {defect_type!r}")
        low, high = self._area_range(defect_type, level, rng)
        if defect_type in ("dark_pixel", "bright_pixel"):
            count = int(rng.integers(min(low, _MAX_CLUSTER_PX), min(high, _MAX_CLUSTER_PX) + 1))
            cells = {(0, 0)}
            while len(cells) < count:
                y, x = list(cells)[rng.integers(len(cells))]
                dy, dx = ((1, 0), (-1, 0), (0, 1), (0, -1))[rng.integers(4)]
                cells.add((y + dy, x + dx))
            ys, xs = np.array(sorted(cells)).T
            out = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), np.float32)
            out[ys - ys.min(), xs - xs.min()] = 1
            return out
        if defect_type == "line_defect":
            # A row or column segment 1-2 px wide and 16 px to the panel's side long whose area
            # falls in the bin (the nearest length where none does).
            width_px = int(rng.integers(1, 3))
            shortest = min(max(_MIN_LINE_PX, math.ceil(low / width_px)), side)
            longest = max(min(side, high // width_px), shortest)
            line = np.ones((int(rng.integers(shortest, longest + 1)), width_px), np.float32)
            return line if rng.random() < 0.5 else line.T.copy()
        area = rng.uniform(low, high + 1)
        if defect_type == "scratch":
            # A quadratic Bezier curve: its pixel count grows with its span (about 1.2 px per
            # px of span, twice that when thick), so a first rendering rescales the span.
            points = rng.uniform(0, 1, (3, 2))
            thick = bool(rng.random() < 0.5)
            span = float(np.clip(area / (2.4 if thick else 1.2), 4, side - 2))
            first = self._scratch(points, span, thick)
            return self._scratch(
                points, float(np.clip(span * area / first.sum(), 4, side - 2)), thick
            )
        # particle: a disc with a wobbly edge, its radius from the drawn area
        radius = float(np.clip(np.sqrt(area / np.pi), 0.6, side / 4))
        r = int(radius) + 2
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        angle = np.arctan2(yy, xx)
        wobble = 1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
        return (np.hypot(yy, xx) <= radius * wobble).astype(np.float32)

    @staticmethod
    def _scratch(points: np.ndarray, span: float, thick: bool) -> np.ndarray:
        """A quadratic Bezier curve through control ``points`` (in [0, 1]) scaled to ``span``
        px, one pixel wide or two (``thick``)."""
        size = int(np.ceil(span)) + 2
        p0, p1, p2 = points * span
        t = np.linspace(0, 1, 4 * size)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        out = np.zeros((size + 1, size + 1), np.float32)
        out[np.round(curve[:, 0]).astype(int) + 1, np.round(curve[:, 1]).astype(int) + 1] = 1
        if thick:
            out = ndimage.binary_dilation(out > 0, np.ones((2, 2), bool)).astype(np.float32)
        return out

    def _sign(self, defect_type: str, rng: np.random.Generator) -> float:
        if defect_type in ("dark_pixel", "particle"):
            return -1.0
        if defect_type == "bright_pixel":
            return 1.0
        return 1.0 if rng.random() < 0.5 else -1.0

    def _fitted_profile(
        self, defect_type: str, level: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """A profile cut to the panel, and its mask (``p >= 0.5`` soft, ``p > 0`` sharp)."""
        profile = self._profile(defect_type, level, rng)[: self.size[0], : self.size[1]]
        return profile, profile >= 0.5 if defect_type not in SHARP_TYPES else profile > 0

    def _place(
        self, mask: np.ndarray, rng: np.random.Generator, occupied: np.ndarray
    ) -> tuple[slice, slice] | None:
        """A window for ``mask`` that does not touch ``occupied`` (then marked, with a 2 px
        margin), or None after 30 tries."""
        height, width = self.size
        ph, pw = mask.shape
        for _ in range(30):
            y0 = int(rng.integers(0, height - ph + 1))
            x0 = int(rng.integers(0, width - pw + 1))
            window = (slice(y0, y0 + ph), slice(x0, x0 + pw))
            if not (occupied[window] & mask).any():
                occupied[window] |= ndimage.binary_dilation(mask, iterations=2)
                return window
        return None

    def make_defect(
        self,
        defect_type: str,
        rng: np.random.Generator,
        occupied: np.ndarray,
        level: int | None = None,
        image: np.ndarray | None = None,
    ) -> Defect | None:
        """Render one defect at a free place of ``occupied`` (a bool map, updated); None if no
        free place was found. With ``image``, a brightening is capped so it does not saturate."""
        if level is None and self.level_weights is None:
            level = int(rng.integers(1, 6))
        elif level is None:
            level = int(rng.choice(np.arange(1, 6), p=self.level_weights))
        profile, mask = self._fitted_profile(defect_type, level, rng)
        window = self._place(mask, rng, occupied)
        if window is None:
            return None
        area_px = int(mask.sum())
        magnitude, level = self._contrast_for_level(defect_type, level, area_px, rng)
        sign = self._sign(defect_type, rng)
        if sign < 0:
            magnitude = min(magnitude, 95.0)  # a pixel cannot get darker than black
        elif image is not None:
            # Saturated pixels would lose contrast: stay below full scale.
            peak = float(np.max(image[window]))
            magnitude = min(magnitude, max(100 * (0.97 / max(peak, 1e-6) - 1), 0.1))
        mean_profile = float(profile[mask].mean())
        amplitude = sign * magnitude / 100 / mean_profile
        return Defect(defect_type, window, profile, amplitude, mask, {"target_level": level})

    def _truth(self, defect: Defect, ident: int) -> dict[str, Any]:
        ys, xs = np.nonzero(defect.mask)
        y0, x0 = defect.window[0].start, defect.window[1].start
        area_px = int(defect.mask.sum())
        area_mm2 = area_px * self.pixel_pitch_mm**2
        contrast = 100 * defect.amplitude * float(defect.profile[defect.mask].mean())
        return {
            "id": ident,
            "type": defect.type,
            "bbox": [
                int(x0 + xs.min()),
                int(y0 + ys.min()),
                int(x0 + xs.max() + 1),
                int(y0 + ys.max() + 1),
            ],
            "contrast_pct": round(contrast, 6),
            "area_px": area_px,
            "area_mm2": round(area_mm2, 6),
            "semu": round(float(semu(contrast, area_mm2)), 6),
            "level": defect_level(
                defect.type,
                area_px=area_px,
                area_mm2=area_mm2,
                contrast_pct=contrast,
                semu_edges=self.semu_edges,
                rules=self.level_rules,
            ),
        }

    def apply(
        self, image: np.ndarray, defects: Sequence[Defect]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Multiply the defects into ``image`` ([H, W] or [H, W, C]); returns the image, the
        binary mask, the instance map (0 background, k the k-th defect) and the truth list."""
        out = image.copy()
        mask = np.zeros(image.shape[:2], bool)
        instances = np.zeros(image.shape[:2], np.uint16)
        truth = []
        for k, defect in enumerate(defects, 1):
            factor = 1 + defect.amplitude * defect.profile
            if out.ndim == 3:
                factor = factor[..., None]
            out[defect.window] = out[defect.window] * factor
            mask[defect.window] |= defect.mask
            instances[defect.window][defect.mask] = k
            truth.append(self._truth(defect, k))
        return np.clip(out, 0.0, 1.0), mask, instances, truth

    # --- samples -------------------------------------------------------------------------

    def generate(self, index: int, defective: bool, split: str = "test") -> dict[str, Any]:
        """One panel: ``image`` (float32 [H, W] or [H, W, 3] in [0, 1]), ``mask``, ``instances``,
        ``defects`` (truth dicts), ``label``, ``level``, ``background`` (noise-free, without
        defects, with its background mura), ``background_mura`` (their truth dicts: not defects),
        ``settings`` (``panel_settings``) and ``pixel_pitch_mm``."""
        rng = _rng(self.seed, split, index, int(defective))
        # The panel's own look from a stream of its own: the defects drawn do not depend on it.
        look_rng = _rng(self.seed, split, index, int(defective), "look")
        settings = self.panel_settings(look_rng)
        clean = self.background(rng, settings)
        clean, _, _, blemishes = self.apply(clean, self.background_blemishes(look_rng))
        defects: list[Defect] = []
        if defective:
            occupied = np.zeros(self.size, bool)
            count = int(rng.integers(1, self.max_defects + 1))
            for _ in range(count):
                defect = self.make_defect(
                    str(rng.choice(self.defect_types)), rng, occupied, image=clean
                )
                if defect is not None:
                    defects.append(defect)
        image, mask, instances, truth = self.apply(clean, defects)
        image = self.add_noise(image, rng, settings["noise_scale"])
        if self.rgb:
            tint = np.array([1.0, 0.98, 1.02], np.float32)
            image = np.clip(image[..., None] * tint, 0, 1)
        return {
            "image": image,
            "mask": mask,
            "instances": instances,
            "defects": truth,
            "label": int(bool(truth)),
            "level": max((d["level"] for d in truth), default=0),
            "background": clean,
            "background_mura": blemishes,
            "settings": settings,
            "pixel_pitch_mm": self.pixel_pitch_mm,
        }

    def generate_normal(self, index: int, split: str = "train") -> dict[str, Any]:
        return self.generate(index, defective=False, split=split)

    def generate_defective(self, index: int, split: str = "test") -> dict[str, Any]:
        return self.generate(index, defective=True, split=split)


class PanelSet:
    """``count`` panels of ``generator`` rendered on demand, as dataset samples (the first
    ``defect_fraction`` of them defective): ``image`` ``[C, H, W]`` tensor (grey repeated to
    ``channels``), ``mask`` ``[1, H, W]``, ``instances``, ``defects``, ``label``, ``level``,
    ``defect_type``, ``path``. With a seed nothing was fitted on, these are unseen panels."""

    has_masks = True

    def __init__(
        self,
        generator: PanelGenerator,
        count: int,
        defect_fraction: float = 0.5,
        channels: int = 3,
        split: str = "unseen",
    ) -> None:
        if count < 1:
            raise ValueError(f"a panel set needs at least one panel, got {count}")
        self.generator = generator
        self.count = count
        self.defective = int(round(count * defect_fraction))
        self.channels = channels
        self.split = split

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        sample = self.generator.generate(index, index < self.defective, self.split)
        image = torch.from_numpy(np.atleast_3d(sample["image"]).transpose(2, 0, 1).copy())
        if image.shape[0] != self.channels:
            image = image[:1].expand(self.channels, -1, -1).contiguous()
        defects = sample["defects"]
        return {
            "image": image,
            "mask": torch.from_numpy(sample["mask"].astype(np.float32))[None],
            "instances": torch.from_numpy(sample["instances"].astype(np.int32)),
            "defects": defects,
            "label": sample["label"],
            "level": sample["level"],
            "defect_type": dominant_type(defects) if defects else "good",
            "path": f"{self.split}/seed{self.generator.seed}/{index:05d}",
        }


def generator_of_dataset(category_dir: str | os.PathLike, seed: int) -> PanelGenerator | None:
    """The generator that wrote a synthetic dataset (its ``meta.json``), with another ``seed``;
    None for a folder the generator did not write."""
    path = Path(category_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        params = dict(json.loads(path.read_text())["generator"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a synthetic dataset description ({exc})") from exc
    params["seed"] = seed
    return PanelGenerator(**params)


def inject_defects(
    image: np.ndarray,
    seed: int | np.random.Generator = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
    n_defects: int = 1,
    pixel_pitch_mm: float = 0.1,
    levels: Sequence[int] | None = None,
    **generator_kwargs: Any,
) -> dict[str, Any]:
    """Add ``n_defects`` synthetic defects into a real defect-free ``image`` (float [H, W] or
    [H, W, C] in [0, 1]) as multiplicative luminance changes; contrast is relative to the local
    luminance. Returns the same fields as ``PanelGenerator.generate``."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    generator = PanelGenerator(
        size=image.shape[:2],
        pixel_pitch_mm=pixel_pitch_mm,
        defect_types=defect_types,
        **generator_kwargs,
    )
    occupied = np.zeros(image.shape[:2], bool)
    defects = []
    for k in range(n_defects):
        level = None if levels is None else int(levels[k % len(levels)])
        defect = generator.make_defect(
            str(rng.choice(list(defect_types))), rng, occupied, level, image=image
        )
        if defect is not None:
            defects.append(defect)
    out, mask, instances, truth = generator.apply(image, defects)
    return {
        "image": out,
        "mask": mask,
        "instances": instances,
        "defects": truth,
        "label": int(bool(truth)),
        "level": max((d["level"] for d in truth), default=0),
        "background": image,
        "pixel_pitch_mm": pixel_pitch_mm,
    }


# --- writing the MVTec layout -------------------------------------------------------------


def dominant_type(defects: Sequence[Mapping[str, Any]]) -> str:
    """The type of the highest-level defect (ties: the larger one)."""
    return max(defects, key=lambda d: (d["level"], d["area_px"]))["type"]


def write_dataset(
    out: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    size: int | Sequence[int],
    seed: int = 0,
    category: str = "panel",
    defect_fraction: float = 0.5,
    **generator_kwargs: Any,
) -> Path:
    """Write ``out/<category>/`` in MVTec layout with ``truth.jsonl`` and ``meta.json``.

    The category is built in a temporary folder and renamed into place at the end, so a killed
    run never leaves a half dataset that looks complete."""
    from data.images import write_png

    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if not 0 <= defect_fraction <= 1:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = PanelGenerator(size=size, seed=seed, **generator_kwargs)
    bits = 8 if generator.rgb else 16
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=out))
    try:
        for i in range(n_train):
            sample = generator.generate_normal(i, split="train")
            write_png(tmp / "train" / "good" / f"{i:06d}.png", sample["image"], bits)
        n_defective = int(round(n_test * defect_fraction))
        lines = []
        for i in range(n_test):
            sample = generator.generate(i, defective=i < n_defective, split="test")
            folder = dominant_type(sample["defects"]) if sample["defects"] else "good"
            stem = f"{i:06d}"
            write_png(tmp / "test" / folder / f"{stem}.png", sample["image"], bits)
            if sample["defects"]:
                gt = tmp / "ground_truth" / folder
                write_png(gt / f"{stem}_mask.png", sample["mask"])
                _write_instances(gt / f"{stem}_instances.png", sample["instances"])
            lines.append(
                json.dumps(
                    {
                        "path": f"test/{folder}/{stem}.png",
                        "label": sample["label"],
                        "level": sample["level"],
                        "pixel_pitch_mm": generator.pixel_pitch_mm,
                        "defects": sample["defects"],
                    }
                )
            )
        (tmp / "truth.jsonl").write_text("\n".join(lines) + "\n")
        meta = {
            "generator": {k: v for k, v in vars(generator).items()},
            "n_train": n_train,
            "n_test": n_test,
            "defect_fraction": defect_fraction,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=list))
        target = out / category
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / category


def _write_instances(path: Path, instances: np.ndarray) -> None:
    import io

    from PIL import Image

    from artifacts.io import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(instances.astype(np.uint16)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    size: int | Sequence[int],
    seed: int = 0,
    category: str = "panel",
    defect_fraction: float = 0.5,
    **generator_kwargs: Any,
) -> Path:
    """The data dir of a cached synthetic dataset with these parameters (written if absent)."""
    params = {
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
        "category": category,
        "defect_fraction": defect_fraction,
        **generator_kwargs,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    data_dir = Path(root) / f"synthetic-{key}"
    if not (data_dir / category / "truth.jsonl").is_file():
        write_dataset(data_dir, **params)
    return data_dir

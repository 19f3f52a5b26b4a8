"""Paired bootstrap intervals: how far each detector's figures, and the differences between
detectors scored on the same images, could move on another draw of test images.

A test split of a hundred images leaves image AP uncertain by several hundredths, so "the
hybrid beats its best member by 0.01" means nothing without an interval. Images are resampled
with replacement within each label (the split's counts of normal and defective images stay), and
every detector is scored on the same resamples, so a difference's interval accounts for the
images the detectors share (a paired comparison). Intervals are percentile intervals.

Image AUROC and AP are recomputed exactly on every resample (ties count half, and AP steps at
distinct scores, as scikit-learn's). Pixel AUROC and AUPRO are recomputed from histograms of a
fixed random sample of each image's pixels: every normal pixel is represented by weight, and
every ground-truth region (8-connected, as ``AUPROMetric``) is sampled on its own, so a small
defect keeps its say in AUPRO. A thousand resamples then cost seconds whatever the map size;
the histograms' own figures stay within a few thousandths of the exact metrics (tested), and
only the intervals come from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from metrics.detection import (
    aupro_of_histograms,
    auroc_of_histograms,
    average_precision_of_histograms,
    miss_rates_of_histograms,
    to_numpy,
)


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins that ``edges`` (rising, interior) cut."""
    return np.bincount(np.searchsorted(edges, values, "right"), minlength=len(edges) + 1).astype(
        np.float64
    )


class PairedBootstrap:
    """Collects, image by image, every detector's score and (optionally) a pixel sample of its
    map, then gives each detector's intervals and the intervals of ``reference`` minus each
    other detector.

    ``resamples``: bootstrap draws; ``confidence``: the intervals' coverage;
    ``normal_pixels`` and ``region_pixels``: how many pixels of an image's normal area and of
    each of its defect regions are kept (the same pixels for every detector); ``bins``: the
    pixel histograms' bins (quantiles of the kept scores, per detector); ``fpr_limit``: AUPRO's.
    """

    def __init__(
        self,
        resamples: int = 1000,
        confidence: float = 0.95,
        normal_pixels: int = 2048,
        region_pixels: int = 1024,
        bins: int = 1024,
        fpr_limit: float = 0.3,
        seed: int = 0,
    ) -> None:
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {resamples}")
        self.resamples, self.confidence = resamples, confidence
        self.normal_pixels, self.region_pixels = normal_pixels, region_pixels
        self.bins, self.fpr_limit, self.seed = bins, fpr_limit, seed
        self.reset()

    def reset(self) -> None:
        """Forget every image."""
        self.names: list[str] | None = None
        self.labels: list[int] = []
        self.scores: list[list[float]] = []
        # Per image: [detectors, kept normal pixels] and the normal pixels each stands for.
        self.normal_values: list[np.ndarray] = []
        self.normal_weights: list[float] = []
        # Per region: [detectors, kept pixels], its image and its size in pixels.
        self.region_values: list[np.ndarray] = []
        self.region_images: list[int] = []
        self.region_sizes: list[int] = []
        self.pixels = True
        # Which pixels are kept; the resamples draw from a fresh generator of the same seed, so
        # ``compute`` gives the same intervals however often it is called.
        self.pixel_rng = np.random.default_rng(self.seed)

    def update(
        self,
        label: int,
        scores: Mapping[str, float],
        maps: Mapping[str, Any] | None = None,
        mask: Any = None,
    ) -> None:
        """One image: its label, each detector's score and, for pixel intervals, each
        detector's map and the ground-truth mask (at the maps' size)."""
        if self.names is None:
            self.names = list(scores)
        elif list(scores) != self.names:
            raise ValueError(f"detectors {list(scores)} differ from the first image's {self.names}")
        image_scores = [float(scores[name]) for name in self.names]
        if not np.isfinite(image_scores).all():
            raise ValueError(f"non-finite image scores: {dict(zip(self.names, image_scores))}")
        image = len(self.labels)
        self.labels.append(int(label))
        self.scores.append(image_scores)
        if maps is None or mask is None:
            self.pixels = False
        if not self.pixels:
            return
        truth = np.squeeze(to_numpy(mask)) > 0.5
        flat_maps = {}
        for name in self.names:
            values = np.squeeze(to_numpy(maps[name]))
            if values.shape != truth.shape:
                raise ValueError(f"{name}'s map {values.shape} and the mask {truth.shape} differ")
            flat_maps[name] = values.reshape(-1)

        def kept_values(pixels: np.ndarray) -> np.ndarray:
            """[detectors, kept pixels] (only the kept pixels are copied: maps can be large)."""
            values = np.stack([flat_maps[name][pixels] for name in self.names]).astype(np.float32)
            if not np.isfinite(values).all():
                raise ValueError(f"non-finite map values in image {image}")
            return values

        normal = np.flatnonzero(~truth.reshape(-1))
        kept = self._sample(normal, self.normal_pixels)
        self.normal_values.append(kept_values(kept))
        self.normal_weights.append(len(normal) / len(kept) if len(kept) else 0.0)
        regions, count = ndimage.label(truth, structure=np.ones((3, 3), dtype=bool))
        if not count:
            return
        flat = regions.reshape(-1)
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(1, count + 2))
        for k in range(count):
            pixels = order[starts[k] : starts[k + 1]]
            self.region_values.append(kept_values(self._sample(pixels, self.region_pixels)))
            self.region_images.append(image)
            self.region_sizes.append(len(pixels))

    def _sample(self, pixels: np.ndarray, limit: int) -> np.ndarray:
        if len(pixels) <= limit:
            return pixels
        return np.sort(self.pixel_rng.choice(pixels, limit, replace=False))

    def _resample_counts(self, labels: np.ndarray) -> np.ndarray:
        """How often each image is drawn in each resample, [resamples, images]: within each
        group of normal images, defective images with a defect region and defective ones
        without (no masks), so every resample keeps each group's count and pixel figures
        always have regions to score."""
        rng = np.random.default_rng(self.seed)
        group = labels.copy()
        group[np.unique(np.asarray(self.region_images, dtype=int))] = 2
        counts = np.zeros((self.resamples, len(labels)))
        for value in np.unique(group):
            members = np.flatnonzero(group == value)
            counts[:, members] = rng.multinomial(
                len(members), np.full(len(members), 1.0 / len(members)), size=self.resamples
            )
        return counts

    def _image_figures(self, counts: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """[detectors, resamples] image AUROC, AP and the miss rates at the false-alarm
        budgets (``metrics.detection.FALSE_ALARM_BUDGETS``): each resample's mass of normal
        and defective images at each distinct score."""
        scores = np.asarray(self.scores)  # [images, detectors]
        auroc, ap, missed = [], [], []
        for d in range(scores.shape[1]):
            order = np.argsort(scores[:, d], kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(scores[order, d]) > 0])
            drawn = counts[:, order]
            defective = labels[order] == 1
            normal_mass = np.add.reduceat(drawn * ~defective, starts, axis=1)
            defective_mass = np.add.reduceat(drawn * defective, starts, axis=1)
            auroc.append(auroc_of_histograms(normal_mass, defective_mass))
            ap.append(average_precision_of_histograms(normal_mass, defective_mass))
            missed.append(miss_rates_of_histograms(normal_mass, defective_mass))
        return {
            "image_auroc": np.array(auroc),
            "image_ap": np.array(ap),
            **{key: np.array([m[key] for m in missed]) for key in missed[0]},
        }

    def _pixel_figures(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """[detectors, resamples] pixel AUROC and AUPRO from the binned pixel samples."""
        normal_weights = np.asarray(self.normal_weights)
        region_images = np.asarray(self.region_images)
        region_counts = counts[:, region_images]  # how often each region is drawn
        region_share = region_counts / region_counts.sum(1, keepdims=True)
        auroc, aupro = [], []
        for d in range(len(self.names)):
            normal_values = [v[d] for v in self.normal_values]
            region_values = [v[d] for v in self.region_values]
            pooled = np.concatenate(normal_values + region_values)
            edges = np.unique(np.quantile(pooled, np.linspace(0, 1, self.bins + 1))[1:-1])
            normal = np.stack([_histogram(v, edges) for v in normal_values])
            normal *= normal_weights[:, None]
            # Each region's share of pixels per bin (sums to one).
            regions = np.stack([_histogram(v, edges) / len(v) for v in region_values])
            normal_mass = counts @ normal
            defective_mass = (region_counts * np.asarray(self.region_sizes)) @ regions
            auroc.append(auroc_of_histograms(normal_mass, defective_mass))
            aupro.append(aupro_of_histograms(normal_mass, region_share @ regions, self.fpr_limit))
        return {"pixel_auroc": np.array(auroc), "aupro": np.array(aupro)}

    @property
    def has_pixel_figures(self) -> bool:
        """Whether every image came with maps and a mask, and the masks hold defects."""
        return self.pixels and bool(self.region_values) and sum(self.normal_weights) > 0

    def figures(self, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every detector's figures, ``[detectors, resamples]``, on images drawn ``counts``
        times each (``[resamples, images]``; None: the split as it is, one column)."""
        labels = np.asarray(self.labels)
        counts = np.ones((1, len(labels))) if counts is None else counts
        draws = self._image_figures(counts, labels)
        if self.has_pixel_figures:
            draws.update(self._pixel_figures(counts))
        return draws

    def compute(
        self, reference: str | None = None, exact: Mapping[str, Mapping[str, float]] | None = None
    ) -> dict[str, Any] | None:
        """Each detector's intervals and, with ``reference``, the intervals of ``reference``
        minus every other detector, with a verdict: ``higher`` or ``lower`` where the interval
        excludes zero, else ``within noise``. ``exact`` (the exact metrics per detector) adds
        the point differences. None where the split lacks normal or defective images."""
        labels = np.asarray(self.labels)
        if self.names is None or set(labels.tolist()) != {0, 1}:
            return None
        if reference is not None and reference not in self.names:
            raise KeyError(f"reference {reference!r} is not a detector: {self.names}")
        draws = self.figures(self._resample_counts(labels))
        pixel_note = "no pixel intervals: some images had no maps, masks or defect regions"
        if self.has_pixel_figures:
            pixel_note = (
                f"pixel figures from {self.normal_pixels} normal pixels an image and "
                f"{self.region_pixels} pixels a defect region at most, {self.bins} bins"
            )
        whole = self.figures()
        tail = 100 * (1 - self.confidence) / 2
        intervals = {
            name: {
                metric: [float(v) for v in np.percentile(values[d], [tail, 100 - tail])]
                for metric, values in draws.items()
            }
            for d, name in enumerate(self.names)
        }
        result: dict[str, Any] = {
            "method": "paired bootstrap: images resampled with replacement within each label "
            "(defective images with a mask apart from those without), every detector scored on "
            "the same resamples; percentile intervals",
            "resamples": self.resamples,
            "confidence": self.confidence,
            "images": len(labels),
            "pixels": pixel_note,
            "intervals": intervals,
            # What the histograms make of the split as it is: beside the exact figures, the
            # error of the pixel sample and bins.
            "figures_from_sample": {
                name: {metric: float(values[d, 0]) for metric, values in whole.items()}
                for d, name in enumerate(self.names)
            },
        }
        if reference is None:
            return result
        r = self.names.index(reference)
        differences: dict[str, dict[str, Any]] = {}
        for d, name in enumerate(self.names):
            if d == r:
                continue
            differences[name] = {}
            for metric, values in draws.items():
                low, high = np.percentile(values[r] - values[d], [tail, 100 - tail])
                entry = {
                    "interval": [float(low), float(high)],
                    "verdict": "higher" if low > 0 else "lower" if high < 0 else "within noise",
                }
                mine, theirs = (exact or {}).get(reference, {}), (exact or {}).get(name, {})
                if metric in mine and metric in theirs:
                    entry["difference"] = float(mine[metric] - theirs[metric])
                differences[name][metric] = entry
        result["reference"] = reference
        result["differences"] = differences
        return result

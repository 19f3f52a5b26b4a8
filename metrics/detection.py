"""Detection metrics with streaming updates.

Image-level metrics keep every score (there is one per image). Pixel-level metrics must not keep
full-resolution maps, so they keep pixel scores exactly while there are at most ``max_exact``
of them and then switch to a shared histogram of about ``bins`` bins. Most bin edges are
quantiles of the scores seen so far, so each bin holds about as many of them whatever the maps'
scale: a strictly increasing rescaling of the maps (a rank normalizer, a log) leaves which
scores share a bin, and so the metrics, unchanged, and a heavy-tailed map is resolved where its
scores are, not spread over a few bins of a range stretched by its outliers. A twentieth of the
edges on each side extend evenly over half the range seen, for later values outside it (values
beyond those count in the edge bins).

Error bound in binned mode: a pair of (normal, defect) pixels whose scores fall in the same bin
is counted as a tie (1/2). The AUROC error is therefore at most half the fraction of such
pairs, ``sum_b n_b * d_b / (N * D) / 2``, which ``error_bound`` reports; thresholds (F1-max,
AUPRO's FPR levels) are resolved to one bin width. In exact mode the bound is 0.

AUPRO follows MVTec AD: the per-region overlap (PRO) is averaged over every connected
ground-truth region (8-connectivity) of every image, as a function of the false positive rate
over all normal pixels; the area under that curve up to FPR 0.3 is divided by 0.3. Region pixel
scores are always kept exactly (defective pixels are few); the FPR axis is sampled at 1000
points in [0, 0.3].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score


def to_numpy(values: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


class Metric:
    """``update`` with a batch, ``compute`` the value, ``reset`` to start again."""

    name = "metric"

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, *args: Any) -> None:
        raise NotImplementedError

    def compute(self) -> Any:
        raise NotImplementedError


class _ImageScores(Metric):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: Any, labels: Any) -> None:
        scores, labels = to_numpy(scores).reshape(-1), to_numpy(labels).reshape(-1)
        if scores.shape != labels.shape:
            raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or Inf")
        self._scores.append(scores.astype(np.float64))
        self._labels.append(labels.astype(np.int64))

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._scores:
            raise ValueError(f"{self.name}: no data; call update() first")
        scores, labels = np.concatenate(self._scores), np.concatenate(self._labels)
        if len(np.unique(labels)) < 2:
            raise ValueError(f"{self.name} needs normal and defective images")
        return scores, labels


class ImageAUROCMetric(_ImageScores):
    name = "image_auroc"

    def compute(self) -> float:
        return float(roc_auc_score(*self._data()[::-1]))


class ImageAPMetric(_ImageScores):
    name = "image_ap"

    def compute(self) -> float:
        scores, labels = self._data()
        return float(average_precision_score(labels, scores))


def _f1_max(
    thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, positives: int
) -> dict[str, float]:
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(positives, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"f1": float(f1[best]), "threshold": float(thresholds[best])}


class ImageF1MaxMetric(_ImageScores):
    """The best F1 over all thresholds; ``compute`` returns ``{"f1", "threshold"}`` (scores at
    or above the threshold are called defective)."""

    name = "image_f1_max"

    def compute(self) -> dict[str, float]:
        scores, labels = self._data()
        thresholds = np.unique(scores)[::-1]
        order = np.sort(scores[labels == 1])
        normal = np.sort(scores[labels == 0])
        tp = len(order) - np.searchsorted(order, thresholds, side="left")
        fp = len(normal) - np.searchsorted(normal, thresholds, side="left")
        return _f1_max(thresholds, tp, fp, len(order))


class PixelScores:
    """Normal and defective pixel scores: exact up to ``max_exact`` pixels, then binned."""

    def __init__(self, max_exact: int = 20_000_000, bins: int = 100_000) -> None:
        self.max_exact = max_exact
        self.bins = bins
        self.exact: dict[int, list[np.ndarray]] = {0: [], 1: []}
        self.counts: dict[int, np.ndarray] | None = None
        self.edges: np.ndarray | None = None
        self.total = 0

    @property
    def binned(self) -> bool:
        return self.counts is not None

    def add(self, values: np.ndarray, label: int) -> None:
        values = values.astype(np.float32, copy=False).reshape(-1)
        if values.size == 0:
            return
        if not np.isfinite(values).all():
            raise ValueError("anomaly maps contain NaN or Inf")
        self.total += values.size
        if self.binned:
            self._bin(values, label)
            return
        self.exact[label].append(values.copy())
        if self.total > self.max_exact:
            self._switch_to_bins()

    def _switch_to_bins(self) -> None:
        # Sorted first: the same order statistics, which np.quantile then picks about three
        # times faster (the sort included) than from the values as they came.
        everything = np.sort(np.concatenate([v for part in self.exact.values() for v in part]))
        low, high = float(everything[0]), float(everything[-1])
        span = max(high - low, 1e-12)
        tail = max(self.bins // 20, 1)
        seen = np.quantile(everything, np.linspace(0.0, 1.0, max(self.bins - 2 * tail, 1) + 1))
        del everything
        below = np.linspace(low - span / 2, low, tail + 1)[:-1]
        above = np.linspace(high, high + span / 2, tail + 1)[1:]
        self.edges = np.unique(np.concatenate([below, seen, above]))
        count = len(self.edges) - 1
        self.counts = {0: np.zeros(count, np.int64), 1: np.zeros(count, np.int64)}
        for label, parts in self.exact.items():
            for values in parts:
                self._bin(values, label)
        self.exact = {0: [], 1: []}

    def _bin(self, values: np.ndarray, label: int) -> None:
        # Bin k holds edges[k] <= v < edges[k + 1]; the first and last bins also hold what
        # lies beyond them. Counted by searching the inner edges in the sorted values: ten
        # times faster than searching each value among 100,000 edges, and the same counts.
        below = np.searchsorted(np.sort(values), self.edges[1:-1], side="left")
        self.counts[label] += np.diff(below, prepend=0, append=values.size)

    def arrays(self, label: int) -> np.ndarray:
        parts = self.exact[label]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Descending thresholds with true and false positive counts (score >= threshold)."""
        if self.binned:
            normal, defect = self.counts[0], self.counts[1]
            thresholds = self.edges[:-1][::-1]
            tp = np.cumsum(defect[::-1])
            fp = np.cumsum(normal[::-1])
            return thresholds, tp, fp, int(defect.sum()), int(normal.sum())
        defect, normal = np.sort(self.arrays(1)), np.sort(self.arrays(0))
        thresholds = np.unique(np.concatenate([defect, normal]))[::-1]
        tp = len(defect) - np.searchsorted(defect, thresholds, side="left")
        fp = len(normal) - np.searchsorted(normal, thresholds, side="left")
        return thresholds, tp, fp, len(defect), len(normal)

    def error_bound(self) -> float:
        """Upper bound of the AUROC error from binning (0 when exact)."""
        if not self.binned:
            return 0.0
        n, d = self.counts[0], self.counts[1]
        return float((n * d).sum() / max(n.sum() * d.sum(), 1) / 2)


def _maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = to_numpy(maps), to_numpy(masks)
    if maps.ndim == 4:
        maps = maps[:, 0]
    if masks.ndim == 4:
        masks = masks[:, 0]
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    return maps, masks > 0.5


class _PixelMetric(Metric):
    def __init__(self, max_exact: int = 20_000_000, bins: int = 100_000) -> None:
        self.max_exact, self.bins = max_exact, bins
        self.reset()

    def reset(self) -> None:
        self.scores = PixelScores(self.max_exact, self.bins)

    def update(self, maps: Any, masks: Any) -> None:
        maps, masks = _maps_and_masks(maps, masks)
        self.scores.add(maps[~masks], 0)
        self.scores.add(maps[masks], 1)

    @property
    def error_bound(self) -> float:
        return self.scores.error_bound()

    def _curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        thresholds, tp, fp, positives, negatives = self.scores.curve()
        if positives == 0 or negatives == 0:
            raise ValueError(f"{self.name} needs normal and defective pixels")
        return thresholds, tp, fp, positives, negatives


class PixelAUROCMetric(_PixelMetric):
    name = "pixel_auroc"

    def compute(self) -> float:
        _, tp, fp, positives, negatives = self._curve()
        tpr = np.concatenate([[0.0], tp / positives])
        fpr = np.concatenate([[0.0], fp / negatives])
        return float(np.trapezoid(tpr, fpr))


class PixelF1MaxMetric(_PixelMetric):
    """Best pixel F1 over thresholds; ``compute`` returns ``{"f1", "threshold"}``."""

    name = "pixel_f1_max"

    def compute(self) -> dict[str, float]:
        thresholds, tp, fp, positives, _ = self._curve()
        return _f1_max(thresholds, tp, fp, positives)


class AUPROMetric(_PixelMetric):
    """Normalized area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD)."""

    name = "aupro"

    def __init__(self, fpr_limit: float = 0.3, steps: int = 1000, **kwargs: Any) -> None:
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit, self.steps = fpr_limit, steps
        super().__init__(**kwargs)

    def reset(self) -> None:
        super().reset()
        self.regions: list[np.ndarray] = []

    def update(self, maps: Any, masks: Any) -> None:
        maps, masks = _maps_and_masks(maps, masks)
        structure = np.ones((3, 3), dtype=bool)
        for anomaly_map, mask in zip(maps, masks):
            self.scores.add(anomaly_map[~mask], 0)
            if mask.any():
                labels, count = ndimage.label(mask, structure=structure)
                order = np.argsort(labels, axis=None, kind="stable")
                flat = labels.reshape(-1)[order]
                values = anomaly_map.reshape(-1)[order]
                starts = np.searchsorted(flat, np.arange(1, count + 2))
                for k in range(count):
                    self.regions.append(
                        np.sort(values[starts[k] : starts[k + 1]]).astype(np.float32)
                    )

    def compute(self) -> float:
        if not self.regions:
            raise ValueError("aupro needs defective pixels (ground-truth regions)")
        thresholds, _, fp, _, negatives = self.scores.curve()
        if negatives == 0:
            raise ValueError("aupro needs normal pixels")
        fpr = fp / negatives
        # Thresholds reaching each FPR level on the grid (FPR rises as thresholds fall).
        grid = np.linspace(0.0, self.fpr_limit, self.steps + 1)
        index = np.searchsorted(fpr, grid, side="right") - 1
        # Below the first step no normal pixel may pass: the threshold sits just above them.
        above_all = np.nextafter(thresholds[0], np.inf)
        level = np.where(index >= 0, thresholds[np.clip(index, 0, None)], above_all)
        pro = np.zeros_like(grid)
        for region in self.regions:
            pro += (len(region) - np.searchsorted(region, level, side="left")) / len(region)
        pro /= len(self.regions)
        return float(np.trapezoid(pro, grid) / self.fpr_limit)


def _reverse_cumsum(mass: np.ndarray) -> np.ndarray:
    """Mass at or above each bin (bins in rising score order, along the last axis)."""
    return np.cumsum(mass[..., ::-1], axis=-1)[..., ::-1]


def auroc_of_histograms(normal: np.ndarray, defective: np.ndarray) -> np.ndarray:
    """AUROC from score masses per bin (``[..., bins]``, rising scores): the chance that a
    defective draw scores above a normal one, ties counting half."""
    below = np.cumsum(normal, axis=-1) - normal
    wins = (defective * (below + 0.5 * normal)).sum(-1)
    return wins / (defective.sum(-1) * normal.sum(-1))


def average_precision_of_histograms(normal: np.ndarray, defective: np.ndarray) -> np.ndarray:
    """Average precision from score masses per bin: precision at each distinct threshold,
    weighted by the defective mass it adds (scikit-learn's step-wise definition)."""
    true_pos, false_pos = _reverse_cumsum(defective), _reverse_cumsum(normal)
    flagged = true_pos + false_pos
    precision = np.divide(true_pos, flagged, out=np.zeros_like(true_pos), where=flagged > 0)
    return (defective * precision).sum(-1) / defective.sum(-1)


def aupro_of_histograms(
    normal: np.ndarray, overlap: np.ndarray, fpr_limit: float = 0.3
) -> np.ndarray:
    """AUPRO from the normal pixels' mass per bin and the mean region's share of pixels per bin
    (``overlap`` sums to one): the area under per-region overlap against false-positive rate,
    up to ``fpr_limit``, divided by it. Within a bin the curve is a straight line."""
    fpr = _reverse_cumsum(normal) / normal.sum(-1, keepdims=True)
    pro = _reverse_cumsum(overlap)
    # Thresholds fall from above every score (0, 0) to below every score (1, 1).
    zero = np.zeros((*fpr.shape[:-1], 1))
    fpr = np.concatenate([zero, fpr[..., ::-1]], axis=-1)
    pro = np.concatenate([zero, pro[..., ::-1]], axis=-1)
    f0, f1, p0, p1 = fpr[..., :-1], fpr[..., 1:], pro[..., :-1], pro[..., 1:]
    end = np.minimum(f1, fpr_limit)
    start = np.minimum(f0, fpr_limit)
    step = np.where(f1 > f0, f1 - f0, 1.0)
    pro_at_end = p0 + (p1 - p0) * np.clip((end - f0) / step, 0.0, 1.0)
    return ((end - start) * (p0 + pro_at_end) / 2).sum(-1) / fpr_limit


# The false-alarm budgets whose miss rates every evaluation reports (shares of defect-free
# images a plant may flag).
FALSE_ALARM_BUDGETS = (0.01, 0.02, 0.05)


def miss_rate_key(budget: float) -> str:
    """``miss_rate_at_0.01``: the name of the miss rate at a false-alarm budget."""
    return f"miss_rate_at_{budget:g}"


def miss_rates_of_histograms(
    normal: np.ndarray, defective: np.ndarray, budgets: tuple[float, ...] = FALSE_ALARM_BUDGETS
) -> dict[str, np.ndarray]:
    """The miss rate at each false-alarm budget from score masses per bin (``[..., bins]``,
    rising scores): the threshold is the lowest bin edge at which the normal mass at or above
    it is at most ``budget`` of all normal mass (ties flag together, so a tie that would cross
    the budget stays unflagged); the miss rate is the defective mass below it."""
    normal_above = _reverse_cumsum(normal)
    below = np.cumsum(defective, axis=-1) - defective  # defective mass under each bin
    total_normal, total_defective = normal.sum(-1, keepdims=True), defective.sum(-1)
    out = {}
    for budget in budgets:
        allowed = normal_above <= budget * total_normal + 1e-9 * total_normal
        # The first bin from which on flagging stays within budget; none: nothing flagged.
        first = np.where(allowed.any(-1), allowed.argmax(-1), normal.shape[-1])
        missed = np.take_along_axis(
            np.concatenate([below, defective.sum(-1, keepdims=True)], axis=-1),
            first[..., None],
            axis=-1,
        )[..., 0]
        out[miss_rate_key(budget)] = missed / total_defective
    return out


def miss_rates(
    scores: np.ndarray, labels: np.ndarray, budgets: tuple[float, ...] = FALSE_ALARM_BUDGETS
) -> dict[str, float]:
    """The share of defective images missed where the threshold flags at most each budget's
    share of the defect-free images of the same split (the miss-rate curve read at the
    budget; the operating point's own threshold comes from held-out images instead)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    distinct, at = np.unique(scores, return_inverse=True)
    normal = np.bincount(at[~labels], minlength=len(distinct)).astype(np.float64)
    defective = np.bincount(at[labels], minlength=len(distinct)).astype(np.float64)
    return {k: float(v) for k, v in miss_rates_of_histograms(normal, defective, budgets).items()}


def miss_rate_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-alarm and miss rates at every threshold (from flagging nothing to flagging all)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    false_alarm = np.array([(scores[~labels] >= t).mean() for t in thresholds])
    missed = np.array([(scores[labels] < t).mean() for t in thresholds])
    return false_alarm, missed


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` ranked by ``scores``: the trapezoid under
    the curve through each distinct score (tied scores are one point), its collinear points
    left out, computed as ``sklearn.metrics.roc_auc_score`` computes it, to the last bit (forward
    selection compares figures exactly: a different rounding would break its ties differently),
    without its input checks, which cost forward selection's thousands of calls several times
    the arithmetic."""
    positive = np.asarray(labels).astype(bool)
    n_positive = int(positive.sum())
    if n_positive == 0 or n_positive == positive.size:
        raise ValueError("AUROC needs both normal and defective samples")
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")[::-1]
    values, positive = values[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(values)), positive.size - 1]  # last of each score
    true_positives = np.cumsum(positive, dtype=np.float64)[ends]
    false_positives = 1 + ends - true_positives
    if len(false_positives) > 2:
        bends = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        keep = np.flatnonzero(np.r_[True, bends, True])
        false_positives, true_positives = false_positives[keep], true_positives[keep]
    false_rate = np.r_[0, false_positives] / false_positives[-1]
    true_rate = np.r_[0, true_positives] / true_positives[-1]
    return float(np.trapezoid(true_rate, false_rate))


def aupro_of_pixels(
    scores: np.ndarray, labels: np.ndarray, regions: np.ndarray, fpr_limit: float = 0.3
) -> float:
    """AUPRO of scored pixel rows (a sample of some maps' pixels) rather than of whole maps:
    ``regions`` names the ground-truth region each defective row belongs to (normal rows: any
    value). A defective row weighs one over its region's rows, so the overlap at a threshold is
    the mean per-region overlap; the area under it up to ``fpr_limit`` is divided by
    ``fpr_limit``, as ``AUPROMetric`` does (which steps along its FPR grid, where this
    interpolates between distinct scores: equal on continuous scores, but where many scores
    tie, as on a constant map, this gives the diagonal's area, 0.15, and it 0)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if not labels.any() or labels.all():
        raise ValueError("aupro needs normal and defective pixels")
    _, inverse, counts = np.unique(
        np.asarray(regions)[labels], return_inverse=True, return_counts=True
    )
    distinct, at = np.unique(scores, return_inverse=True)
    normal = np.bincount(at[~labels], minlength=len(distinct)).astype(np.float64)
    overlap = np.bincount(at[labels], 1.0 / counts[inverse], minlength=len(distinct))
    return float(aupro_of_histograms(normal, overlap / len(counts), fpr_limit))


METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (
        ImageAUROCMetric,
        ImageAPMetric,
        ImageF1MaxMetric,
        PixelAUROCMetric,
        PixelF1MaxMetric,
        AUPROMetric,
    )
}

"""Per-member score normalizers, fitted on validation data (scikit-learn estimators).

Members score on incomparable scales (a kNN distance, a Mahalanobis distance, a reconstruction
error), so each member's scores are normalized before they are fused. ``X`` is ``[n, M]``: one
column per member, rows are images (image level) or pixels (pixel level, a sample of them).
Statistics come from the normal rows (``y == 0``; all rows when ``y`` is None), because normal
validation data is what every deployment has. A NaN cell is left out of its column's statistics:
where members' reference images differ (``ScoreFusion``'s per-member ``normalize_on``), each
member's column holds its own.

- ``MinMaxNormalizer``: ``(x - threshold) / (max - min) + 0.5``, clipped to [0, 1], so each
  member's own threshold maps to 0.5 (the threshold: F1-optimal when ``y`` holds defects, else
  the ``quantile`` of normal scores).
- ``ZScoreNormalizer``: ``(x - mean) / std`` of the normal scores.
- ``RankNormalizer``: the empirical CDF of the normal scores, the fraction of normal scores below
  ``x``, through a table of at most ``n_quantiles`` quantiles (pixel maps have millions of
  values). Above the largest normal score the CDF would saturate at 1 and tie every clear
  defect; it continues linearly instead, in units of the normal range, so stronger anomalies
  still rank higher.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from metrics.detection import ImageF1MaxMetric


def _normal_rows(X: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """The normal rows of ``X``; NaN cells stay (left out of their column's statistics)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected scores [n_samples, n_members], got shape {X.shape}")
    normal = X if y is None else X[np.asarray(y).ravel() == 0]
    if np.isinf(normal).any():
        raise ValueError("scores contain Inf")
    counts = (~np.isnan(normal)).sum(axis=0)
    if len(normal) == 0 or counts.min() < 2:
        raise ValueError(
            f"normalizers need at least 2 normal samples for each member, got {counts.tolist()} "
            "(scores that are NaN do not count)"
        )
    return normal


def _by_column(normal: np.ndarray, statistic) -> np.ndarray:
    """``statistic(values, axis=0)`` of each column's values that are not NaN (all columns at
    once where none is)."""
    missing = np.isnan(normal)
    if not missing.any():
        return statistic(normal, axis=0)
    return np.stack(
        [statistic(column[~gap], axis=0) for column, gap in zip(normal.T, missing.T)], axis=-1
    )


def has_both_classes(y: np.ndarray | None) -> bool:
    return y is not None and len(np.unique(np.asarray(y).ravel())) == 2


class MinMaxNormalizer(TransformerMixin, BaseEstimator):
    def __init__(self, quantile: float = 0.99) -> None:
        self.quantile = quantile

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> MinMaxNormalizer:
        X = np.asarray(X, dtype=np.float64)
        normal = _normal_rows(X, y)
        self.min_, self.max_ = _by_column(X, np.min), _by_column(X, np.max)
        if has_both_classes(y):
            thresholds = []
            for column in X.T:
                known = ~np.isnan(column)
                metric = ImageF1MaxMetric()
                metric.update(column[known], np.asarray(y).ravel()[known])
                thresholds.append(metric.compute()["threshold"])
            self.threshold_ = np.asarray(thresholds)
        else:
            self.threshold_ = _by_column(
                normal, lambda v, axis: np.quantile(v, self.quantile, axis=axis)
            )
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "threshold_")
        span = np.maximum(self.max_ - self.min_, 1e-12)
        return np.clip((np.asarray(X, np.float64) - self.threshold_) / span + 0.5, 0.0, 1.0)


class ZScoreNormalizer(TransformerMixin, BaseEstimator):
    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> ZScoreNormalizer:
        normal = _normal_rows(X, y)
        self.mean_ = _by_column(normal, np.mean)
        self.std_ = np.maximum(_by_column(normal, np.std), 1e-12)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "mean_")
        return (np.asarray(X, np.float64) - self.mean_) / self.std_


class RankNormalizer(TransformerMixin, BaseEstimator):
    def __init__(self, n_quantiles: int = 1000) -> None:
        self.n_quantiles = n_quantiles

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> RankNormalizer:
        """``levels_`` ``[count]`` and ``quantiles_`` ``[count, M]``; where members have
        different numbers of normal scores (NaN cells), each its own table: ``levels_``
        ``[count, M]``, a shorter table's last entry repeated to the longest's length."""
        normal = _normal_rows(X, y)
        counts = np.minimum(self.n_quantiles, (~np.isnan(normal)).sum(axis=0))
        count = int(counts.max())
        if (counts == count).all():
            self.levels_ = np.linspace(0.0, 1.0, count)
            self.quantiles_ = _by_column(
                normal, lambda v, axis: np.quantile(v, self.levels_, axis=axis)
            )
            return self
        levels, quantiles = [], []
        for column, own in zip(normal.T, counts):
            grid = np.linspace(0.0, 1.0, own)
            table = np.quantile(column[~np.isnan(column)], grid)
            levels.append(np.pad(grid, (0, count - own), mode="edge"))
            quantiles.append(np.pad(table, (0, count - own), mode="edge"))
        self.levels_, self.quantiles_ = np.stack(levels, axis=1), np.stack(quantiles, axis=1)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "quantiles_")
        X = np.asarray(X, np.float64)
        out = np.empty_like(X)
        for m in range(X.shape[1]):
            table = self.quantiles_[:, m]
            levels = self.levels_ if self.levels_.ndim == 1 else self.levels_[:, m]
            out[:, m] = np.interp(X[:, m], table, levels)
            span = max(table[-1] - table[0], 1e-12)
            above = X[:, m] > table[-1]
            out[above, m] = 1.0 + (X[above, m] - table[-1]) / span
        return out


NORMALIZERS = {"minmax": MinMaxNormalizer, "zscore": ZScoreNormalizer, "rank": RankNormalizer}


def get_normalizer(name: str, **params) -> TransformerMixin:
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {sorted(NORMALIZERS)}")
    return NORMALIZERS[name](**params)

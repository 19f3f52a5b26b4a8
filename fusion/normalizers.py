"""Per-member score normalizers, fitted on validation data (scikit-learn estimators).

Members score on incomparable scales (a kNN distance, a Mahalanobis distance, a reconstruction
error), so each member's scores are normalized before they are fused. ``X`` is ``[n, M]``: one
column per member, rows are images (image level) or pixels (pixel level, a sample of them).
Statistics come from the normal rows (``y == 0``; all rows when ``y`` is None), because normal
validation data is what every deployment has.

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
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected scores [n_samples, n_members], got shape {X.shape}")
    normal = X if y is None else X[np.asarray(y).ravel() == 0]
    if len(normal) < 2:
        raise ValueError(f"normalizers need at least 2 normal samples, got {len(normal)}")
    if not np.isfinite(normal).all():
        raise ValueError("scores contain NaN or Inf")
    return normal


def has_both_classes(y: np.ndarray | None) -> bool:
    return y is not None and len(np.unique(np.asarray(y).ravel())) == 2


class MinMaxNormalizer(TransformerMixin, BaseEstimator):
    def __init__(self, quantile: float = 0.99) -> None:
        self.quantile = quantile

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> MinMaxNormalizer:
        X = np.asarray(X, dtype=np.float64)
        normal = _normal_rows(X, y)
        self.min_, self.max_ = X.min(axis=0), X.max(axis=0)
        if has_both_classes(y):
            thresholds = []
            for column in X.T:
                metric = ImageF1MaxMetric()
                metric.update(column, np.asarray(y).ravel())
                thresholds.append(metric.compute()["threshold"])
            self.threshold_ = np.asarray(thresholds)
        else:
            self.threshold_ = np.quantile(normal, self.quantile, axis=0)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "threshold_")
        span = np.maximum(self.max_ - self.min_, 1e-12)
        return np.clip((np.asarray(X, np.float64) - self.threshold_) / span + 0.5, 0.0, 1.0)


class ZScoreNormalizer(TransformerMixin, BaseEstimator):
    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> ZScoreNormalizer:
        normal = _normal_rows(X, y)
        self.mean_ = normal.mean(axis=0)
        self.std_ = np.maximum(normal.std(axis=0), 1e-12)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "mean_")
        return (np.asarray(X, np.float64) - self.mean_) / self.std_


class RankNormalizer(TransformerMixin, BaseEstimator):
    def __init__(self, n_quantiles: int = 1000) -> None:
        self.n_quantiles = n_quantiles

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> RankNormalizer:
        normal = _normal_rows(X, y)
        count = min(self.n_quantiles, len(normal))
        self.levels_ = np.linspace(0.0, 1.0, count)
        self.quantiles_ = np.quantile(normal, self.levels_, axis=0)  # [count, M]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "quantiles_")
        X = np.asarray(X, np.float64)
        out = np.empty_like(X)
        for m in range(X.shape[1]):
            table = self.quantiles_[:, m]
            out[:, m] = np.interp(X[:, m], table, self.levels_)
            span = max(table[-1] - table[0], 1e-12)
            above = X[:, m] > table[-1]
            out[above, m] = 1.0 + (X[above, m] - table[-1]) / span
        return out


NORMALIZERS = {"minmax": MinMaxNormalizer, "zscore": ZScoreNormalizer, "rank": RankNormalizer}


def get_normalizer(name: str, **params) -> TransformerMixin:
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {sorted(NORMALIZERS)}")
    return NORMALIZERS[name](**params)

"""Fusion of normalized member scores into one score (scikit-learn estimators).

``ScoreFusion`` is a normalizer (``fusion.normalizers``) followed by a combiner:

- ``mean``, ``max``: of the normalized scores;
- ``rank``: rank-mean, the mean of the members' normal-score ECDFs (it implies ``normalizer =
  "rank"``);
- ``weighted``: a weighted mean; ``weights`` given, or, when fitted with labels, each member's
  validation AUROC above chance (``max(auroc - 0.5, 0)``), so a member that does not separate
  gets no say;
- ``learned``: a classifier on the normalized scores (``learner``: logistic regression or
  gradient boosting), fitted on labeled validation data; the fused score is its defect
  probability.

The same estimator fuses image scores (rows are images) and pixel maps (rows are pixels of the
tile-merged, full-resolution maps).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_is_fitted

from fusion.normalizers import get_normalizer, has_both_classes

COMBINERS = ("mean", "max", "rank", "weighted", "learned")
LEARNERS = ("logistic", "boosting")


class ScoreFusion(BaseEstimator):
    """Normalize each member's scores, then combine them.

    Args:
        combiner: one of ``COMBINERS``.
        normalizer: ``minmax``, ``zscore`` or ``rank`` (forced to ``rank`` by ``combiner="rank"``).
        weights: member weights for ``weighted`` (None: from validation AUROC, or equal).
        learner: ``logistic`` or ``boosting`` for ``learned``.
        seed: for the learner.
    """

    def __init__(
        self,
        combiner: str = "rank",
        normalizer: str = "rank",
        weights: list[float] | None = None,
        learner: str = "logistic",
        seed: int = 0,
    ) -> None:
        self.combiner = combiner
        self.normalizer = normalizer
        self.weights = weights
        self.learner = learner
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> ScoreFusion:
        if self.combiner not in COMBINERS:
            raise ValueError(f"unknown combiner {self.combiner!r}; choose one of {COMBINERS}")
        X = np.asarray(X, np.float64)
        y = None if y is None else np.asarray(y).ravel().astype(int)
        self.normalizer_ = get_normalizer("rank" if self.combiner == "rank" else self.normalizer)
        normalized = self.normalizer_.fit(X, y).transform(X)
        self.n_members_ = X.shape[1]
        if self.combiner == "weighted":
            self.weights_ = self._weights(normalized, y)
        if self.combiner == "learned":
            if not has_both_classes(y):
                raise ValueError("the learned combiner needs labeled normal and defective samples")
            if self.learner == "logistic":
                model = LogisticRegression(class_weight="balanced", max_iter=1000)
            elif self.learner == "boosting":
                model = HistGradientBoostingClassifier(
                    max_iter=100, class_weight="balanced", random_state=self.seed
                )
            else:
                raise ValueError(f"unknown learner {self.learner!r}; choose one of {LEARNERS}")
            self.model_ = model.fit(normalized, y)
        return self

    def _weights(self, normalized: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        if self.weights is not None:
            weights = np.asarray(self.weights, np.float64)
            if weights.shape != (normalized.shape[1],) or (weights < 0).any():
                raise ValueError(
                    f"weights must be {normalized.shape[1]} non-negative numbers, "
                    f"got {self.weights}"
                )
        elif has_both_classes(y):
            weights = np.array([max(roc_auc_score(y, col) - 0.5, 0.0) for col in normalized.T])
        else:
            weights = np.ones(normalized.shape[1])
        if weights.sum() <= 0:
            weights = np.ones(normalized.shape[1])
        return weights / weights.sum()

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Fused scores ``[n]`` of member scores ``[n, M]``."""
        check_is_fitted(self, "normalizer_")
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_members_:
            raise ValueError(f"expected scores [n, {self.n_members_}], got shape {X.shape}")
        normalized = self.normalizer_.transform(X)
        if self.combiner in ("mean", "rank"):
            return normalized.mean(axis=1)
        if self.combiner == "max":
            return normalized.max(axis=1)
        if self.combiner == "weighted":
            return normalized @ self.weights_
        return self.model_.predict_proba(normalized)[:, 1]

    def fit_transform(self, X: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return self.fit(X, y).transform(X)

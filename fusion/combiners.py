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
  probability;
- ``auto``: chooses, by cross-validated AUROC on the labeled fitting data, among the combiners
  above and each member alone (rank-normalized), so a hybrid whose fusion does not help
  falls back to its best member instead of diluting it. Folds keep each ``groups`` value
  (the image a pixel comes from) together; ``choose_on`` restricts the comparison to some rows
  (real labeled defects, where there are any, rather than injected ones) while the winner is
  fitted on all. Pixel rows given with their ``regions`` (the ground-truth region of each
  defective pixel) are chosen on the mean of pixel AUROC and AUPRO, the two pixel figures the
  project reports: AUROC alone counts pixels, so a few large defects outweigh many small
  ones. Without both labels it is ``rank``.
- ``rank_or_member``: ``auto`` choosing between ``rank`` and each member alone only: rank-mean
  unless one member alone cross-validates better, so the fusion never dilutes a member that
  is better on its own, and a near-tie among the many flexible combiners (``max``,
  ``learned``, ...) is not there to be won by chance.

The same estimator fuses image scores (rows are images) and pixel maps (rows are pixels of the
tile-merged, full-resolution maps).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from fusion.normalizers import get_normalizer, has_both_classes
from metrics.detection import aupro_of_pixels

COMBINERS = ("mean", "max", "rank", "weighted", "learned", "auto", "rank_or_member")
# The combiners that choose among others by cross-validation.
CHOOSING = ("auto", "rank_or_member")
LEARNERS = ("logistic", "boosting")


def sample_per_group(groups: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of about ``budget`` rows drawn group by group: each group keeps
    ``min(its rows, cap)`` of them, at random, with the largest ``cap`` (at least 1) that fits
    the budget, so small groups (small defects) keep every row and large ones share the rest."""
    _, group_of, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.sum() <= budget:
        return np.arange(len(groups))
    sizes = np.sort(counts)
    below = np.concatenate([[0], np.cumsum(sizes)])  # rows of the groups smaller than each
    # With the i smallest groups whole, the others get (budget - below[i]) // (rest) each.
    caps = (budget - below[:-1]) // np.arange(len(sizes), 0, -1)
    cap = max(int(caps[np.argmax(caps < sizes)]), 1)
    order = rng.permutation(len(groups))
    order = order[np.argsort(group_of[order], kind="stable")]  # random within each group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(order)) - starts[group_of[order]]
    return np.sort(order[position < cap])


class ScoreFusion(BaseEstimator):
    """Normalize each member's scores, then combine them.

    Args:
        combiner: one of ``COMBINERS``.
        normalizer: ``minmax``, ``zscore`` or ``rank`` (forced to ``rank`` by ``combiner="rank"``).
        weights: member weights for ``weighted`` (None: from validation AUROC, or equal).
        learner: ``logistic`` or ``boosting`` for ``learned``.
        seed: for the learner, and the folds and row sample of ``auto``.
        folds: cross-validation folds of ``auto``.
        max_selection_rows: rows (a seeded sample) on which ``auto`` compares its candidates.

    ``auto`` and ``rank_or_member`` answer on one scale whatever they chose (a rank
    normalizer on the chosen fusion's output, ``output_normalizer_``, fitted on the normal
    reference rows) and keep ``candidate_auroc_`` (candidate name: cross-validated AUROC),
    ``candidate_aupro_`` (the same for AUPRO; empty without ``regions``), ``chosen_`` (the
    winner's name) and ``fusion_`` (the winner, fitted on all rows).
    """

    def __init__(
        self,
        combiner: str = "rank",
        normalizer: str = "rank",
        weights: list[float] | None = None,
        learner: str = "logistic",
        seed: int = 0,
        folds: int = 5,
        max_selection_rows: int = 200_000,
    ) -> None:
        self.combiner = combiner
        self.normalizer = normalizer
        self.weights = weights
        self.learner = learner
        self.seed = seed
        self.folds = folds
        self.max_selection_rows = max_selection_rows

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        choose_on: np.ndarray | None = None,
        normalize_on: np.ndarray | None = None,
        regions: np.ndarray | None = None,
    ) -> ScoreFusion:
        """``groups``, ``choose_on``, ``regions``: for ``auto`` (above). ``normalize_on``: the
        rows (a boolean mask) whose normal scores fit the normalizer; None: all rows."""
        if self.combiner not in COMBINERS:
            raise ValueError(f"unknown combiner {self.combiner!r}; choose one of {COMBINERS}")
        X = np.asarray(X, np.float64)
        y = None if y is None else np.asarray(y).ravel().astype(int)
        for name, rows in (("normalize_on", normalize_on), ("regions", regions)):
            if rows is not None and len(rows) != len(X):
                raise ValueError(f"{name} has {len(rows)} rows, the scores {len(X)}")
        if self.combiner in CHOOSING:
            return self._fit_choosing(X, y, groups, choose_on, normalize_on, regions)
        self.normalizer_ = get_normalizer("rank" if self.combiner == "rank" else self.normalizer)
        reference = slice(None) if normalize_on is None else np.asarray(normalize_on, bool)
        self.normalizer_.fit(X[reference], None if y is None else y[reference])
        normalized = self.normalizer_.transform(X)
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

    def candidates(self, n_members: int) -> dict[str, ScoreFusion]:
        """What ``auto`` chooses among: every fixed combiner, then each member alone
        (``rank_or_member``: ``rank``, then each member alone)."""
        fixed = ("rank",) if self.combiner == "rank_or_member" else COMBINERS
        out = {
            name: ScoreFusion(name, self.normalizer, None, self.learner, self.seed)
            for name in fixed
            if name not in CHOOSING
        }
        for m in range(n_members):
            alone = np.eye(n_members)[m].tolist()
            out[f"member {m}"] = ScoreFusion("weighted", "rank", alone, seed=self.seed)
        return out

    def _fit_choosing(
        self,
        X: np.ndarray,
        y: np.ndarray | None,
        groups: np.ndarray | None,
        choose_on: np.ndarray | None,
        normalize_on: np.ndarray | None,
        regions: np.ndarray | None,
    ):
        candidates = self.candidates(X.shape[1])
        rows = np.arange(len(X)) if choose_on is None else np.flatnonzero(choose_on)
        self.candidate_auroc_, self.candidate_aupro_ = {}, {}
        if y is None or not has_both_classes(y[rows]):
            self.chosen_ = "rank"
        else:
            rng = np.random.default_rng(self.seed)
            if len(rows) > self.max_selection_rows:
                rows = self._selection_rows(rows, y, regions, rng)
            X_sel, y_sel = X[rows], y[rows]
            g_sel = None if groups is None else np.asarray(groups).ravel()[rows]
            r_sel = None if regions is None else np.asarray(regions).ravel()[rows]
            folds = min(self.folds, int(np.bincount(y_sel).min()))
            if g_sel is not None:
                folds = min(folds, *(len(np.unique(g_sel[y_sel == c])) for c in (0, 1)))
            if folds < 2:
                raise ValueError(
                    f"the {self.combiner} combiner needs at least 2 normal and 2 defective "
                    "samples (in 2 groups each) to cross-validate its candidates"
                )
            splitter = (
                StratifiedKFold(folds, shuffle=True, random_state=self.seed)
                if g_sel is None
                else StratifiedGroupKFold(folds, shuffle=True, random_state=self.seed)
            )
            splits = list(splitter.split(X_sel, y_sel, g_sel))
            criterion = {}
            for name, candidate in candidates.items():
                out_of_fold = np.empty(len(y_sel))
                try:
                    for train, held in splits:
                        fitted = clone(candidate).fit(X_sel[train], y_sel[train])
                        out_of_fold[held] = fitted.transform(X_sel[held])
                except ValueError:  # a fold without both classes for a learner
                    continue
                self.candidate_auroc_[name] = float(roc_auc_score(y_sel, out_of_fold))
                criterion[name] = self.candidate_auroc_[name]
                if r_sel is not None:
                    self.candidate_aupro_[name] = aupro_of_pixels(out_of_fold, y_sel, r_sel)
                    criterion[name] = (criterion[name] + self.candidate_aupro_[name]) / 2
            # The highest; on a tie the earlier candidate (fusions before single members).
            self.chosen_ = max(criterion, key=criterion.get)
        self.fusion_ = candidates[self.chosen_].fit(X, y, normalize_on=normalize_on)
        # Whatever was chosen answers on one scale: the fraction of the normal reference rows
        # that score below (``learned`` gives probabilities, a member alone its ranks), so the
        # folds of a cross-validation that chose differently pool their answers fairly.
        reference = np.ones(len(X), bool)
        if normalize_on is not None:
            reference = np.asarray(normalize_on, bool)
        if y is not None:
            reference = reference & (y == 0)
        fused_normal = self.fusion_.transform(X[reference])[:, None]
        self.output_normalizer_ = get_normalizer("rank").fit(fused_normal)
        self.normalizer_ = self.fusion_.normalizer_
        self.n_members_ = X.shape[1]
        return self

    def _selection_rows(
        self, rows: np.ndarray, y: np.ndarray, regions: np.ndarray | None, rng: np.random.Generator
    ) -> np.ndarray:
        """``max_selection_rows`` of ``rows``: at random, or, given ``regions``, the defective
        rows region by region (``sample_per_group``, their share of the budget as at random)
        so a small defect beside large ones is not thinned away before AUPRO is measured."""
        if regions is None:
            return np.sort(rng.choice(rows, self.max_selection_rows, replace=False))
        defective = rows[y[rows] == 1]
        normal = rows[y[rows] == 0]
        defect_budget = round(self.max_selection_rows * len(defective) / len(rows))
        kept = defective[sample_per_group(np.asarray(regions)[defective], defect_budget, rng)]
        normal_budget = min(len(normal), self.max_selection_rows - len(kept))
        return np.sort(np.concatenate([kept, rng.choice(normal, normal_budget, replace=False)]))

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
        if self.combiner in CHOOSING:
            fused = self.fusion_.transform(X)[:, None]
            output = getattr(self, "output_normalizer_", None)  # None: fitted before it existed
            return (fused if output is None else output.transform(fused))[:, 0]
        normalized = self.normalizer_.transform(X)
        if self.combiner in ("mean", "rank"):
            return normalized.mean(axis=1)
        if self.combiner == "max":
            return normalized.max(axis=1)
        if self.combiner == "weighted":
            return normalized @ self.weights_
        return self.model_.predict_proba(normalized)[:, 1]

    def fit_transform(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        choose_on: np.ndarray | None = None,
        normalize_on: np.ndarray | None = None,
        regions: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.fit(X, y, groups, choose_on, normalize_on, regions).transform(X)

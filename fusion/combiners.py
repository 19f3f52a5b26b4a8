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
- ``forward``: forward selection of members with weights, on the members' rank-normalized
  scores (always rank: the weights are on ranks), each rank taken out of fold (a fold's
  normalizer fitted on the other folds' normal rows): the member whose ranks score best alone
  enters first; then, one at a time, the member and weight (1, 1/2 or 1/4 of the weight
  already in) that raise the figure of the pooled out-of-fold ranks most enter, while it
  rises by at least ``min_gain``; bagged (``resamples`` bootstrap draws of the rows' groups,
  each member weighted by its mean weight over them, kept where it entered at least
  ``min_share`` of them), since with few labeled defects one choice is a coin toss among
  close members. It chooses on the same rows and by the same figure as
  ``auto`` (real labeled defects where there are any; AUROC, or for pixels the mean of pixel
  AUROC and AUPRO); the choice is made on these rows, so its figures are optimistic, and an
  outer cross-validation (the ensemble's) scores it honestly. The fused score is the
  weighted mean of the entered members' ranks; a member that never entered has weight 0 and
  can be left out of the hybrid (``used_members_``, ``restricted``). Without both labels it
  is rank-mean of every member.

The same estimator fuses image scores (rows are images) and pixel maps (rows are pixels of the
tile-merged, full-resolution maps).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from fusion.normalizers import get_normalizer, has_both_classes
from metrics.detection import aupro_of_pixels, binary_auroc

COMBINERS = ("mean", "max", "rank", "weighted", "learned", "auto", "rank_or_member", "forward")
# The combiners that choose among others by cross-validation.
CHOOSING = ("auto", "rank_or_member")
# Weights a member may enter ``forward`` selection with, relative to the weight already in.
FORWARD_WEIGHTS = (1.0, 0.5, 0.25)
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


def forward_path(
    ranks: np.ndarray, y: np.ndarray, regions: np.ndarray | None, min_gain: float
) -> tuple[np.ndarray, list[dict]]:
    """Forward selection on members' ranks ``[n, M]``: the weights (0 for members that never
    entered) and each step (the member that entered, its share of the weight then, the figure
    after it: AUROC, or with ``regions`` the mean of AUROC and AUPRO; the first step also
    holds every member's figure alone, the last the best figure of each member left out)."""

    def figure(w: np.ndarray) -> tuple[float, float, float | None]:
        fused = ranks @ w
        auroc = binary_auroc(y, fused)
        if regions is None:
            return auroc, auroc, None
        aupro = aupro_of_pixels(fused, y, regions)
        return (auroc + aupro) / 2, auroc, aupro

    weights = np.zeros(ranks.shape[1])
    steps: list[dict] = []
    current = -np.inf
    while True:
        step = None
        tried: dict[int, float] = {}
        entered = weights.sum()
        for m in np.flatnonzero(weights == 0):
            for share in FORWARD_WEIGHTS if entered else (1.0,):
                trial = weights.copy()
                trial[m] = share * entered if entered else 1.0
                value, auroc, aupro = figure(trial / trial.sum())
                tried[int(m)] = max(tried.get(int(m), -np.inf), value)
                if step is None or value > step[0]:
                    step = (value, int(m), trial, auroc, aupro)
        if step is None or (steps and step[0] < current + min_gain):
            if steps:
                steps[-1]["not_entered"] = tried
            return weights, steps
        current, m, weights = step[0], step[1], step[2]
        steps.append(
            {
                "member": m,
                "weight": float(weights[m] / weights.sum()),
                "figure": current,
                "auroc": step[3],
                "aupro": step[4],
                # The first step tried every member alone.
                **({"alone": tried} if not steps else {}),
            }
        )


def fitted_normalizer(
    name: str, X: np.ndarray, y: np.ndarray | None, normalize_on: np.ndarray | None
) -> TransformerMixin:
    """Normalizer ``name`` fitted on the normal scores of ``normalize_on`` (``ScoreFusion.fit``):
    every row (None), the rows marked (``[n]``), or each member's own rows (``[n, M]``: the
    other cells are left out of that member's statistics)."""
    normalizer = get_normalizer(name)
    if normalize_on is None:
        return normalizer.fit(X, y)
    cells = np.asarray(normalize_on, bool)
    if cells.ndim == 2:
        X, cells = np.where(cells, X, np.nan), cells.any(axis=1)
    return normalizer.fit(X[cells], None if y is None else y[cells])


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
        min_gain: what a member must add to the figure to enter ``forward``.
        resamples: bootstrap draws ``forward`` bags its choice over (0: one choice on all
            rows); bag_rows: rows of a draw at most; min_share: the share of draws a member
            must enter to be kept.

    ``auto`` and ``rank_or_member`` answer on one scale whatever they chose (a rank
    normalizer on the chosen fusion's output, ``output_normalizer_``, fitted on the normal
    reference rows) and keep ``candidate_auroc_`` (candidate name: cross-validated AUROC),
    ``candidate_aupro_`` (the same for AUPRO; empty without ``regions``), ``chosen_`` (the
    winner's name) and ``fusion_`` (the winner, fitted on all rows). ``forward`` keeps
    ``weights_`` (one per member, summing to 1), ``selection_`` (each step: the member that
    entered, its weight and the cross-validated figure after it, and the best figure each
    member that did not enter would have given) and ``used_members_``.
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
        min_gain: float = 0.001,
        resamples: int = 30,
        bag_rows: int = 50_000,
        min_share: float = 0.2,
    ) -> None:
        self.combiner = combiner
        self.normalizer = normalizer
        self.weights = weights
        self.learner = learner
        self.seed = seed
        self.folds = folds
        self.max_selection_rows = max_selection_rows
        self.min_gain = min_gain
        self.resamples = resamples
        self.bag_rows = bag_rows
        self.min_share = min_share

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        choose_on: np.ndarray | None = None,
        normalize_on: np.ndarray | None = None,
        regions: np.ndarray | None = None,
    ) -> ScoreFusion:
        """``groups``, ``choose_on``, ``regions``: for ``auto`` (above). ``normalize_on``: what
        the normalizer is fitted on (the normal scores there): rows, a boolean ``[n]``; or each
        member's own rows, a boolean ``[n, M]`` (a member whose answers on some rows come from
        another model than the one it scores with, such as a nested cross-validation's head,
        is ranked against its other rows only); None: all rows."""
        if self.combiner not in COMBINERS:
            raise ValueError(f"unknown combiner {self.combiner!r}; choose one of {COMBINERS}")
        X = np.asarray(X, np.float64)
        if not np.isfinite(X).all():
            raise ValueError("member scores contain NaN or Inf")
        y = None if y is None else np.asarray(y).ravel().astype(int)
        for name, rows in (("normalize_on", normalize_on), ("regions", regions)):
            if rows is not None and len(rows) != len(X):
                raise ValueError(f"{name} has {len(rows)} rows, the scores {len(X)}")
        if normalize_on is not None and np.ndim(normalize_on) == 2:
            if np.shape(normalize_on) != X.shape:
                raise ValueError(
                    f"normalize_on is {np.shape(normalize_on)}, the scores {X.shape}: one "
                    "column per member"
                )
        if self.combiner in CHOOSING:
            return self._fit_choosing(X, y, groups, choose_on, normalize_on, regions)
        if self.combiner == "forward":
            return self._fit_forward(X, y, groups, choose_on, normalize_on, regions)
        name = "rank" if self.combiner == "rank" else self.normalizer
        self.normalizer_ = fitted_normalizer(name, X, y, normalize_on)
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
        """What ``auto`` chooses among: every fixed combiner (not ``forward``, itself a
        choice), then each member alone (``rank_or_member``: ``rank``, then each member
        alone)."""
        fixed = ("rank",) if self.combiner == "rank_or_member" else COMBINERS
        out = {
            name: ScoreFusion(name, self.normalizer, None, self.learner, self.seed)
            for name in fixed
            if name not in (*CHOOSING, "forward")
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
        self.candidate_auroc_, self.candidate_aupro_ = {}, {}
        chosen_rows = self._choosing_rows(X, y, groups, choose_on, regions)
        if chosen_rows is None:
            self.chosen_ = "rank"
        else:
            X_sel, y_sel, r_sel, _, splits = chosen_rows
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
        # (those of every member) that score below (``learned`` gives probabilities, a member
        # alone its ranks), so the folds of a cross-validation that chose differently pool
        # their answers fairly.
        reference = np.ones(len(X), bool)
        if normalize_on is not None:
            reference = np.asarray(normalize_on, bool)
            reference = reference.all(axis=1) if reference.ndim == 2 else reference
        if y is not None:
            reference = reference & (y == 0)
        fused_normal = self.fusion_.transform(X[reference])[:, None]
        self.output_normalizer_ = get_normalizer("rank").fit(fused_normal)
        self.normalizer_ = self.fusion_.normalizer_
        self.n_members_ = X.shape[1]
        return self

    def _choosing_rows(
        self,
        X: np.ndarray,
        y: np.ndarray | None,
        groups: np.ndarray | None,
        choose_on: np.ndarray | None,
        regions: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list] | None:
        """The rows a choosing combiner compares on (``choose_on``, thinned to
        ``max_selection_rows``), their labels, regions, groups and cross-validation splits
        (folds keep each ``groups`` value together); None without both labels among them."""
        rows = np.arange(len(X)) if choose_on is None else np.flatnonzero(choose_on)
        if y is None or not has_both_classes(y[rows]):
            return None
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
        return X_sel, y_sel, r_sel, g_sel, list(splitter.split(X_sel, y_sel, g_sel))

    def _fit_forward(
        self,
        X: np.ndarray,
        y: np.ndarray | None,
        groups: np.ndarray | None,
        choose_on: np.ndarray | None,
        normalize_on: np.ndarray | None,
        regions: np.ndarray | None,
    ) -> ScoreFusion:
        n_members = X.shape[1]
        self.selection_, self.entered_share_ = [], None
        chosen_rows = self._choosing_rows(X, y, groups, choose_on, regions)
        if chosen_rows is None:
            weights = np.ones(n_members)  # nothing to choose on: every member, rank-mean
        else:
            X_sel, y_sel, r_sel, g_sel, splits = chosen_rows
            # Each member's ranks out of fold: a fold's normalizer knows only its other rows.
            ranks = np.empty_like(X_sel)
            for train, held in splits:
                normal = train[y_sel[train] == 0]
                if len(normal) < 2:  # too few to rank against: every normal row
                    normal = np.flatnonzero(y_sel == 0)
                ranks[held] = get_normalizer("rank").fit(X_sel[normal]).transform(X_sel[held])
            weights, self.selection_ = forward_path(ranks, y_sel, r_sel, self.min_gain)
            if self.resamples:
                weights = self._bagged(ranks, y_sel, r_sel, g_sel)
        self.weights_ = weights / weights.sum()
        self.used_members_ = self.weights_ > 0
        self.normalizer_ = fitted_normalizer("rank", X, y, normalize_on)
        self.n_members_ = n_members
        return self

    def without(self, column: int) -> ScoreFusion | None:
        """This fitted ``forward`` fusion with member ``column``'s weight set to 0 (the others'
        renormalized): what the fusion gives without that member, to measure its contribution.
        None where it is the only member weighed, or for another combiner."""
        if self.combiner != "forward" or self.weights_[column] == 0:
            return None
        weights = self.weights_.copy()
        weights[column] = 0.0
        if not weights.any():
            return None
        out = clone(self)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k.endswith("_")})
        out.weights_ = weights / weights.sum()
        out.used_members_ = out.weights_ > 0
        return out

    def _bagged(
        self,
        ranks: np.ndarray,
        y: np.ndarray,
        regions: np.ndarray | None,
        groups: np.ndarray | None,
    ) -> np.ndarray:
        """Forward selection on ``resamples`` bootstrap draws of the rows' groups (parts or
        images, drawn with replacement among those with defects and among the others), at most
        ``bag_rows`` rows each: each member's weight is its mean weight over the draws, and a
        member that entered fewer than ``min_share`` of them (``entered_share_``) is left out:
        its weight is noise, its run time is not. With few labeled defects, which of several
        close members looks best is a coin toss; the bagged choice weighs each by how often it
        wins, so the folds of a cross-validation choose alike (bagging: Breiman 1996)."""
        rng = np.random.default_rng(self.seed)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        names, group_of = np.unique(groups, return_inverse=True)
        order = np.argsort(group_of, kind="stable")
        bounds = np.searchsorted(group_of[order], np.arange(len(names) + 1))
        defective = np.zeros(len(names), bool)
        defective[group_of[y == 1]] = True
        total = np.zeros(ranks.shape[1])
        entered = np.zeros(ranks.shape[1])
        draws = 0
        for _ in range(self.resamples):
            drawn = np.concatenate(
                [
                    rng.choice(np.flatnonzero(defective == side), (defective == side).sum())
                    for side in (True, False)
                ]
            )
            rows = np.concatenate([order[bounds[g] : bounds[g + 1]] for g in drawn])
            if len(rows) > self.bag_rows:
                rows = rng.choice(rows, self.bag_rows, replace=False)
            if len(np.unique(y[rows])) < 2:
                continue
            weights, _ = forward_path(
                ranks[rows], y[rows], None if regions is None else regions[rows], self.min_gain
            )
            total += weights / weights.sum()
            entered += weights > 0
            draws += 1
        self.entered_share_ = entered / max(draws, 1)
        keep = self.entered_share_ >= self.min_share
        if not keep.any():
            keep[np.argmax(self.entered_share_)] = True
        return np.where(keep, total, 0.0)

    def restricted(self, columns: np.ndarray) -> ScoreFusion:
        """This fitted fusion on the members ``columns`` only (indices), for a hybrid that
        leaves out members with no weight: the same fused scores of the kept members."""
        check_is_fitted(self, "normalizer_")
        columns = np.asarray(columns, dtype=int)
        if len(columns) == self.n_members_:
            return self
        if self.combiner != "forward":
            raise ValueError(f"a {self.combiner!r} fusion uses every member; it cannot drop any")
        if self.weights_[np.setdiff1d(np.arange(self.n_members_), columns)].any():
            raise ValueError("only members with weight 0 can be left out")
        out = clone(self)
        out.weights_ = self.weights_[columns] / self.weights_[columns].sum()
        out.used_members_ = out.weights_ > 0
        out.normalizer_ = clone(self.normalizer_)
        levels = self.normalizer_.levels_
        out.normalizer_.levels_ = levels if levels.ndim == 1 else levels[:, columns]
        out.normalizer_.quantiles_ = self.normalizer_.quantiles_[:, columns]
        # The selection record names members by their old columns: the hybrid keeps it, named.
        out.selection_ = []
        if self.entered_share_ is not None:
            out.entered_share_ = self.entered_share_[columns]
        out.n_members_ = len(columns)
        return out

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
        if self.combiner in ("weighted", "forward"):
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

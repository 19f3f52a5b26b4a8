"""Severity levels, defect types and thresholds for measured regions (scikit-learn estimators).

- ``image_threshold``: the image threshold of fused image scores, by the operating point: at
  most a false-alarm rate of the normal images flagged, or F1-optimal.
- ``ThresholdCalibrator``: the pixel threshold of the fused map, on labeled validation maps
  (injected or real defects): F1-optimal over defects found and regions raised (``region``),
  F1-optimal over pixels (``f1``), or a high quantile of normal pixels.
- ``RuleGrader``: the design's levels: SEMU bins for mura (and for types without a rule), size
  and contrast rules for pixel, line, scratch and particle defects.
- ``OrdinalGrader``: learned where labeled levels exist. Cumulative binary logistic models
  ``P(level > k)`` for k = 1..4 (Frank & Hall 2001) on the region measurements, the type and the
  rule level, so at worst it learns to repeat the rules; the level is ``1 + sum_k P(level > k)``
  rounded, which keeps predictions ordered.
- ``fit_grader``: the rules, or the ordinal grader where it beats them in grouped
  cross-validation.
- ``TypeClassifier``: a random forest on region descriptors (measurements, shape, pooled
  backbone features of the region's crop); below ``confidence_threshold`` it answers
  ``unknown``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from grading.regions import Region
from metrics.detection import ImageF1MaxMetric, PixelF1MaxMetric
from metrics.severity import SEMU_LEVEL_EDGES, defect_level

UNKNOWN = "unknown"
LEVELS = (1, 2, 3, 4, 5)
THRESHOLD_METHODS = ("region", "f1", "quantile")
OPERATING_POINTS = ("false_alarm", "f1")
GRADERS = ("auto", "rules", "ordinal")


def image_threshold(
    fused_scores: np.ndarray,
    labels: np.ndarray,
    operating_point: str = "false_alarm",
    false_alarm_rate: float = 0.01,
) -> float:
    """The image threshold (a score at or above it is defective).

    ``false_alarm``: the lowest threshold that flags at most ``false_alarm_rate`` of the normal
    scores (with 15 normal images and a 1 % budget, none: just above the highest). ``f1``: the
    F1-optimal threshold where both classes are present (it trades false alarms for recall at
    the validation data's defect share), else the false-alarm rule."""
    if operating_point == "f1" and len(np.unique(labels)) == 2:
        metric = ImageF1MaxMetric()
        metric.update(fused_scores, labels)
        return float(metric.compute()["threshold"])
    normal = np.sort(np.asarray(fused_scores, np.float64)[np.asarray(labels) == 0])[::-1]
    if normal.size == 0:
        raise ValueError("the false-alarm operating point needs normal validation images")
    allowed = int(np.floor(false_alarm_rate * normal.size + 1e-9))  # normals it may flag
    if allowed >= normal.size:
        return float(normal[-1])
    return float(np.nextafter(normal[allowed], np.inf))


class ThresholdCalibrator(BaseEstimator):
    """Pixel threshold of fused maps. ``fit(maps, masks)`` with lists of ``[H, W]`` arrays.

    ``region``: the threshold with the best F1 of defects found (a mask component touched by a
    region of the thresholded map) against regions raised (a region touching no defect is a
    false one). This is what an inspection counts; pixel F1 is dominated by the pixels of
    large defects and sets a threshold that loses small and faint ones. Candidates are the
    defects' peak values and the normal images' maxima (at most ``candidates`` of them).
    ``f1``: F1-optimal over pixels. Both need defect pixels in the masks and fall back to
    ``quantile`` of the normal pixels without them."""

    def __init__(
        self, method: str = "region", quantile: float = 0.999, candidates: int = 64
    ) -> None:
        self.method = method
        self.quantile = quantile
        self.candidates = candidates

    def fit(self, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> ThresholdCalibrator:
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {THRESHOLD_METHODS}")
        if not len(maps):
            raise ValueError("threshold calibration needs at least one map")
        has_defects = any(np.asarray(m).any() for m in masks)
        if self.method == "region" and has_defects:
            self.threshold_, self.region_f1_ = self._region_threshold(maps, masks)
            self.method_ = "region"
        elif self.method == "f1" and has_defects:
            metric = PixelF1MaxMetric()
            for anomaly_map, mask in zip(maps, masks):
                metric.update(np.asarray(anomaly_map)[None, None], np.asarray(mask)[None, None])
            self.threshold_ = float(metric.compute()["threshold"])
            self.method_ = "f1"
        else:
            normal = np.concatenate(
                [np.asarray(m).ravel()[~np.asarray(k, bool).ravel()] for m, k in zip(maps, masks)]
            )
            self.threshold_ = float(np.quantile(normal, self.quantile))
            self.method_ = "quantile"
        return self

    def _region_threshold(
        self, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> tuple[float, float]:
        images, peaks = [], []
        for anomaly_map, mask in zip(maps, masks):
            anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
            defects, count = ndimage.label(np.asarray(mask, bool).reshape(anomaly_map.shape))
            images.append((anomaly_map, defects))
            if count:
                # Each defect's peak within its box: ndimage.maximum sorts the whole image's
                # labels: 19.5 ms per 1260 x 500 map against 0.6 ms this way.
                boxes = enumerate(ndimage.find_objects(defects), 1)
                peaks.append([anomaly_map[box][defects[box] == k].max() for k, box in boxes])
            else:
                peaks.append([anomaly_map.max()])
        values = np.unique(np.concatenate([np.atleast_1d(p) for p in peaks]))
        if len(values) > self.candidates:
            values = np.unique(np.quantile(values, np.linspace(0, 1, self.candidates)))
        # A defect is found at a threshold when its peak reaches it.
        defect_peaks = np.concatenate(
            [np.atleast_1d(p) for p, (_, defects) in zip(peaks, images) if defects.any()]
        )
        found = (defect_peaks[None, :] >= values[:, None]).sum(axis=1)
        raised = np.zeros(len(values), np.int64)
        true_regions = np.zeros(len(values), np.int64)
        for anomaly_map, defects in images:
            # Each pixel's candidate level (``>= k`` is ``>= values[k - 1]``), labelled level by
            # level on the box that holds the level's pixels: the labelling is the cost.
            level = np.searchsorted(values, anomaly_map, side="right").astype(np.uint8)
            row_max, col_max = level.max(axis=1), level.max(axis=0)
            rows, cols = np.nonzero(defects)
            for k in range(1, int(row_max.max()) + 1):
                r, c = np.flatnonzero(row_max >= k), np.flatnonzero(col_max >= k)
                regions, raised_here = ndimage.label(level[r[0] : r[-1] + 1, c[0] : c[-1] + 1] >= k)
                raised[k - 1] += raised_here
                inside = (rows >= r[0]) & (rows <= r[-1]) & (cols >= c[0]) & (cols <= c[-1])
                touched = regions[rows[inside] - r[0], cols[inside] - c[0]]
                true_regions[k - 1] += len(np.unique(touched[touched > 0]))
        best = (-1.0, float(values[-1]))
        for threshold, found_here, raised_here, true_here in zip(
            values, found, raised, true_regions
        ):
            precision = true_here / raised_here if raised_here else 0.0
            recall = found_here / len(defect_peaks) if len(defect_peaks) else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            if f1 > best[0]:
                best = (float(f1), float(threshold))
        return best[1], best[0]


def _type_of(region: Region) -> str:
    return region.type if region.type not in (None, UNKNOWN) else "spot_mura"


class RuleGrader(BaseEstimator):
    """Levels from the design's rules; ``fit`` learns nothing."""

    def __init__(
        self,
        semu_edges: Sequence[float] = SEMU_LEVEL_EDGES,
        rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ) -> None:
        self.semu_edges = semu_edges
        self.rules = rules

    def fit(self, regions: Sequence[Region] = (), levels: Sequence[int] = ()) -> RuleGrader:
        self.fitted_ = True
        return self

    def predict(self, regions: Sequence[Region]) -> np.ndarray:
        # An unknown type is graded as a mura: by SEMU, defined for any region.
        return np.array(
            [
                defect_level(
                    _type_of(r),
                    area_px=r.area_px,
                    area_mm2=max(r.area_mm2, 1e-9),
                    contrast_pct=r.contrast_pct,
                    semu_edges=self.semu_edges,
                    rules=self.rules,
                )
                for r in regions
            ],
            dtype=int,
        )


LEVEL_FEATURES = ("log_area", "log_abs_contrast", "log_semu", "peak_pct", "aspect", "span")


class OrdinalGrader(BaseEstimator):
    """Learned ordinal levels (see the module docstring)."""

    def __init__(
        self,
        types: Sequence[str] = (),
        semu_edges: Sequence[float] = SEMU_LEVEL_EDGES,
        rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        C: float = 1.0,
    ) -> None:
        self.types = types
        self.semu_edges = semu_edges
        self.rules = rules
        self.C = C

    def _design(self, regions: Sequence[Region]) -> np.ndarray:
        rule_levels = RuleGrader(self.semu_edges, self.rules).predict(regions)
        rows = []
        for region, rule_level in zip(regions, rule_levels):
            one_hot = [float(region.type == t) for t in self.types_]
            measured = [region.features[k] for k in LEVEL_FEATURES]
            rows.append([*measured, float(rule_level), *one_hot])
        return np.asarray(rows, dtype=np.float64)

    def fit(self, regions: Sequence[Region], levels: Sequence[int]) -> OrdinalGrader:
        levels = np.asarray(levels, dtype=int)
        if len(regions) != len(levels) or len(levels) < 2:
            raise ValueError("the ordinal grader needs at least 2 regions with levels")
        self.types_ = sorted(set(self.types) | {r.type for r in regions if r.type})
        X = self._design(regions)
        self.models_: list[object] = []
        for k in LEVELS[:-1]:
            target = (levels > k).astype(int)
            if target.min() == target.max():
                self.models_.append(float(target[0]))  # every region on one side of k
            else:
                model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=2000))
                self.models_.append(model.fit(X, target))
        return self

    def predict(self, regions: Sequence[Region]) -> np.ndarray:
        check_is_fitted(self, "models_")
        if not len(regions):
            return np.zeros(0, dtype=int)
        X = self._design(regions)
        above = np.zeros(len(regions))
        for model in self.models_:
            above += model if isinstance(model, float) else model.predict_proba(X)[:, 1]
        return np.clip(np.rint(1 + above), 1, 5).astype(int)


def fit_grader(
    regions: Sequence[Region],
    levels: Sequence[int],
    defects: Sequence[int],
    grader: str = "auto",
    semu_edges: Sequence[float] = SEMU_LEVEL_EDGES,
    rules: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    seed: int = 0,
) -> tuple[RuleGrader | OrdinalGrader, dict[str, Any]]:
    """The fitted grader and the report of the choice (``chosen``, ``regions``, and where both
    were compared ``rules_accuracy`` and ``ordinal_cv_accuracy``).

    ``regions`` with their true ``levels``; ``defects``: the truth defect each region stands
    for (its regions stay in one fold). ``grader``: ``rules``, ``ordinal``, or ``auto`` (the
    ordinal grader where its cross-validated accuracy beats the rules'; the rules with fewer
    than 10 regions or 2 levels)."""
    fitted_rules = RuleGrader(semu_edges, rules).fit()
    report: dict[str, Any] = {"chosen": "rules", "regions": len(regions)}
    if grader == "rules" or len(regions) < 10 or len(set(levels)) < 2:
        if grader == "ordinal":
            raise ValueError(
                f"grader=ordinal needs labeled levels: {len(regions)} matched regions with "
                f"{len(set(levels))} distinct levels (at least 10 and 2)"
            )
        return fitted_rules, report
    y = np.asarray(levels)
    rule_accuracy = float((fitted_rules.predict(regions) == y).mean())
    # Cross-validated accuracy of the learned grader against the rules' (which learn
    # nothing): it replaces them only where it is better on defects it was not fitted on.
    # A defect's two views (detected and true region) stay in one fold, or the learner
    # would be scored on the twin of a region it learned.
    groups = np.asarray(defects)
    smallest = min(len(np.unique(groups[y == level])) for level in np.unique(y))
    ordinal_accuracy = float("nan")
    if smallest >= 2:
        splitter = StratifiedGroupKFold(min(5, smallest), shuffle=True, random_state=seed)
        cv_predictions = np.zeros(len(y), dtype=int)
        for train, test in splitter.split(np.zeros(len(y)), y, groups):
            model = OrdinalGrader((), semu_edges, rules).fit([regions[i] for i in train], y[train])
            cv_predictions[test] = model.predict([regions[i] for i in test])
        ordinal_accuracy = float((cv_predictions == y).mean())
    report.update(rules_accuracy=rule_accuracy, ordinal_cv_accuracy=ordinal_accuracy)
    if grader == "ordinal" or ordinal_accuracy > rule_accuracy:
        report["chosen"] = "ordinal"
        return OrdinalGrader((), semu_edges, rules).fit(regions, y), report
    return fitted_rules, report


class TypeClassifier(ClassifierMixin, BaseEstimator):
    """Defect type from region descriptors ``X`` ``[n, d]``; ``unknown`` below the confidence
    threshold. ``classes_`` are the type names seen in training."""

    def __init__(
        self, confidence_threshold: float = 0.4, n_estimators: int = 300, seed: int = 0
    ) -> None:
        self.confidence_threshold = confidence_threshold
        self.n_estimators = n_estimators
        self.seed = seed

    def fit(self, X: np.ndarray, y: Sequence[str]) -> TypeClassifier:
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if len(X) != len(y) or len(X) < 2:
            raise ValueError("the type classifier needs at least 2 labeled regions")
        self.model_ = RandomForestClassifier(
            n_estimators=self.n_estimators,
            class_weight="balanced",
            min_samples_leaf=1,
            random_state=self.seed,
            n_jobs=1,
        ).fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """The forest's class probabilities, as ``RandomForestClassifier.predict_proba`` gives
        them: the trees' mean, summed in the same order. Called tree by tree here, because the
        forest's own call dispatches each tree through joblib, which took most of the time of
        grading a panel's few regions."""
        check_is_fitted(self, "model_")
        X = np.ascontiguousarray(X, dtype=np.float32)  # the trees' input type
        total = np.zeros((len(X), len(self.classes_)))
        for tree in self.model_.estimators_:
            total += tree.predict_proba(X, check_input=False)
        return total / len(self.model_.estimators_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Type names, ``unknown`` where the best probability is below the threshold."""
        if not len(X):
            return np.zeros(0, dtype=object)
        return self.names_from_proba(self.predict_proba(X))

    def names_from_proba(self, proba: np.ndarray) -> np.ndarray:
        """``predict``'s type names from ``predict_proba``'s probabilities."""
        best = proba.argmax(axis=1)
        names = self.classes_[best].astype(object)
        names[proba.max(axis=1) < self.confidence_threshold] = UNKNOWN
        return names

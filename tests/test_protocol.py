"""Honest folds: the images of one part never sit on both sides of a cross-validation fold,
and a fold that cannot be scored is refused with a message that names it."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.scoring import grouped_folds, operating_point_figures, rate_interval


def test_folds_keep_a_parts_images_together_and_stay_stratified():
    rng = np.random.default_rng(0)
    groups = [f"kos{g:02d}" for g in np.repeat(np.arange(30), 4)]
    labels = np.array([int(rng.random() < 0.4) for _ in groups])
    fold_of = grouped_folds(labels, groups, 5, seed=0)
    assert sorted(set(fold_of)) == list(range(5))
    for group in set(groups):
        assert len({fold_of[i] for i, g in enumerate(groups) if g == group}) == 1
    for fold in range(5):
        assert labels[fold_of == fold].any() and (labels[fold_of == fold] == 0).any()


def test_too_few_parts_or_uneven_folds_are_refused_by_name():
    labels = np.array([1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"2 normal test images in 2 groups.*1 groups"):
        grouped_folds(labels, ["a", "a", "a", "b", "b", "b"], 5, seed=0)
    # Parts that hold both kinds of image: four folds cannot all get a defect-free one.
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0])
    groups = [str(g) for g in [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5]]
    with pytest.raises(
        ValueError, match=r"fold 4 of 4 holds no defect-free image.*ensemble\.folds"
    ):
        grouped_folds(labels, groups, 5, seed=0)


def test_operating_point_rates_carry_bootstrap_intervals():
    records = [{"label": 0, "flagged": i < 3, "level": 0} for i in range(100)]
    records += [{"label": 1, "flagged": i < 30, "level": 2} for i in range(40)]
    point = operating_point_figures(records)
    assert point["false_alarm_rate"] == pytest.approx(0.03)
    assert point["miss_rate"] == pytest.approx(0.25)
    low, high = point["miss_rate_interval"]
    assert low < 0.25 < high and high - low < 0.35
    assert rate_interval([]) is None and rate_interval([True] * 5) == [1.0, 1.0]


def test_no_head_answers_an_image_of_a_fold_it_trained_on():
    from evaluation.supervision import heads_for_fit, with_heads

    fold_of = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 0])
    for fold in (None, 0, 1, 2):
        outer, labeled = heads_for_fit(fold_of, fold)
        # The validation images: by the head trained without the outer fold (the scored one).
        assert outer == (frozenset() if fold is None else frozenset({fold}))
        # Every other fold's image is in the fit, by a head trained without its fold and the
        # outer one; none of the outer fold's images is.
        assert sorted(i for i, _ in labeled) == [i for i, f in enumerate(fold_of) if f != fold]
        for index, excluded in labeled:
            assert fold_of[index] in excluded and outer <= excluded
            assert excluded != outer  # so the hybrid's own head never answers it
    # Which is why a labeled sample names the member answered apart, a validation one not
    # (the heads' answers are only read when a fit reads the sample).
    samples = [{"image": np.zeros((8, 8)), "label": 0}] * 2
    outputs = [(np.zeros(2), np.zeros((2, 8, 8)))] * 2
    heads = object()
    fitting = with_heads(heads, samples, outputs, "validation", lambda i: outer)
    fitting += with_heads(heads, samples, outputs, "labeled", lambda i: frozenset({0, 1}))
    assert ["answered_apart" in s for s in fitting] == [False, False, True, True]
    assert fitting[2]["answered_apart"] == ("supervised",)

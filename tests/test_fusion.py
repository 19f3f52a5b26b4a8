"""Normalizers and combiners: their definitions, and fusion that beats weak or random members."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fusion import MinMaxNormalizer, RankNormalizer, ScoreFusion, ZScoreNormalizer
from fusion.combiners import sample_per_group
from fusion.normalizers import get_normalizer
from metrics import aupro_of_pixels


def member_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three members on different scales: two informative with independent noise (a kNN-like
    distance and a log-likelihood-like score), one that does not separate at all."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    a = 10.0 + 3.0 * y + rng.normal(0, 2.0, n)
    b = np.exp(0.5 * (1.2 * y + rng.normal(0, 1.0, n)))
    c = rng.normal(0, 1.0, n)
    return np.stack([a, b, c], axis=1), y


def test_minmax_maps_the_threshold_to_one_half():
    X, y = member_scores(400, 0)
    normalizer = MinMaxNormalizer().fit(X, y)
    out = normalizer.transform(normalizer.threshold_[None])
    assert np.allclose(out, 0.5)
    assert (normalizer.transform(X) >= 0).all() and (normalizer.transform(X) <= 1).all()
    unlabeled = MinMaxNormalizer(quantile=0.9).fit(X[y == 0])
    assert np.allclose(unlabeled.threshold_, np.quantile(X[y == 0], 0.9, axis=0))


def test_zscore_standardizes_the_normal_scores():
    X, y = member_scores(400, 1)
    Z = ZScoreNormalizer().fit(X, y).transform(X[y == 0])
    assert np.allclose(Z.mean(axis=0), 0, atol=1e-9) and np.allclose(Z.std(axis=0), 1)


def test_rank_is_the_fraction_of_normal_scores_below():
    rng = np.random.default_rng(2)
    normal = rng.normal(size=(500, 1))
    normalizer = RankNormalizer(n_quantiles=10_000).fit(normal)
    queries = rng.normal(size=(50, 1)) * 0.8
    expected = (normal[None, :, 0] < queries[:, :1]).mean(axis=1)
    assert np.abs(normalizer.transform(queries)[:, 0] - expected).max() <= 1 / 499 + 1e-9
    # A quantile table (pixel maps) stays within one table step of the exact ECDF.
    table = RankNormalizer(n_quantiles=101).fit(normal)
    assert np.abs(table.transform(queries)[:, 0] - expected).max() <= 0.02
    # Above every normal score the rank keeps increasing instead of saturating.
    top = normal.max()
    assert table.transform(np.array([[top + 1], [top + 2]])).ravel().tolist() == sorted(
        table.transform(np.array([[top + 1], [top + 2]])).ravel().tolist()
    )
    assert table.transform(np.array([[top + 1]]))[0, 0] > 1


@pytest.mark.parametrize("combiner", ["mean", "rank", "weighted", "learned"])
def test_fusion_of_two_informative_members_beats_the_worse_one(combiner):
    X, y = member_scores(600, 3)
    X_val, y_val = member_scores(300, 4)
    fusion = ScoreFusion(combiner).fit(X_val[:, :2], y_val)
    fused = roc_auc_score(y, fusion.transform(X[:, :2]))
    members = [roc_auc_score(y, X[:, m]) for m in range(2)]
    assert fused > min(members) + 0.02, (fused, members)


def test_fusion_beats_a_random_combiner():
    X, y = member_scores(600, 5)
    rng = np.random.default_rng(0)
    fused = roc_auc_score(y, ScoreFusion("rank").fit(X).transform(X))
    random_weights = rng.dirichlet(np.ones(3), size=20)
    normalized = RankNormalizer().fit(X).transform(X)
    random_auc = np.mean([roc_auc_score(y, normalized @ w) for w in random_weights])
    assert fused > random_auc


def test_learned_combiner_scores_at_least_as_high_as_rank_mean_on_held_out_data():
    X_val, y_val = member_scores(400, 6)
    X_test, y_test = member_scores(800, 7)
    rank = roc_auc_score(y_test, ScoreFusion("rank").fit(X_val, y_val).transform(X_test))
    for learner in ("logistic", "boosting"):
        fusion = ScoreFusion("learned", "zscore", learner=learner).fit(X_val, y_val)
        learned = roc_auc_score(y_test, fusion.transform(X_test))
        assert learned >= rank - 0.01, (learner, learned, rank)
    weighted = ScoreFusion("weighted").fit(X_val, y_val)
    assert weighted.weights_[2] < 0.15  # the member that does not separate gets little say


def strong_and_weak(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A member that separates well beside one that barely does."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return np.stack([3.0 * y + rng.normal(0, 1, n), 0.4 * y + rng.normal(0, 1, n)], 1), y


def test_auto_combiner_fuses_complementary_members_and_keeps_a_dominant_one_alone():
    # Two members with independent noise: fusing them beats either, and auto fuses.
    X_val, y_val = member_scores(600, 9)
    X_test, y_test = member_scores(1500, 10)
    auto = ScoreFusion("auto").fit(X_val[:, :2], y_val)
    assert not auto.chosen_.startswith("member"), auto.candidate_auroc_
    best = max(roc_auc_score(y_test, X_test[:, m]) for m in range(2))
    assert roc_auc_score(y_test, auto.transform(X_test[:, :2])) > best + 0.02

    # A strong member beside a weak one: the rank mean dilutes the strong one; auto keeps it.
    X_val, y_val = strong_and_weak(600, 11)
    X_test, y_test = strong_and_weak(1500, 12)
    auto = ScoreFusion("auto").fit(X_val, y_val)
    strong = roc_auc_score(y_test, X_test[:, 0])
    rank_mean = roc_auc_score(y_test, ScoreFusion("rank").fit(X_val, y_val).transform(X_test))
    fused = roc_auc_score(y_test, auto.transform(X_test))
    assert rank_mean < strong - 0.01  # the dilution auto must avoid
    assert fused > rank_mean + 0.01 and fused >= strong - 0.01, (auto.chosen_, fused, strong)
    assert set(auto.candidate_auroc_) >= {"rank", "mean", "learned", "member 0", "member 1"}
    # Unlabeled data gives no basis for a choice: rank mean.
    assert ScoreFusion("auto").fit(X_val).chosen_ == "rank"


def test_rank_or_member_fuses_unless_a_member_alone_is_better():
    # Complementary members: the rank mean beats either, and is kept.
    X_val, y_val = member_scores(600, 9)
    X_test, y_test = member_scores(1500, 10)
    fusion = ScoreFusion("rank_or_member").fit(X_val[:, :2], y_val)
    assert fusion.chosen_ == "rank" and set(fusion.candidate_auroc_) == {
        "rank",
        "member 0",
        "member 1",
    }
    best = max(roc_auc_score(y_test, X_test[:, m]) for m in range(2))
    assert roc_auc_score(y_test, fusion.transform(X_test[:, :2])) > best + 0.02
    # A strong member beside a weak one: the rank mean would dilute it; it is used alone.
    X_val, y_val = strong_and_weak(600, 11)
    X_test, y_test = strong_and_weak(1500, 12)
    fusion = ScoreFusion("rank_or_member").fit(X_val, y_val)
    assert fusion.chosen_ == "member 0"
    rank_mean = ScoreFusion("rank").fit(X_val, y_val).transform(X_test)
    fused = fusion.transform(X_test)
    assert roc_auc_score(y_test, fused) > roc_auc_score(y_test, rank_mean) + 0.01


def test_forward_selection_keeps_what_helps_and_leaves_out_what_does_not():
    # Two informative members with independent noise and one that does not separate: the two
    # enter, the random one does not, and the fusion beats each member on unseen data.
    X_val, y_val = member_scores(600, 9)
    X_test, y_test = member_scores(1500, 10)
    fusion = ScoreFusion("forward").fit(X_val, y_val)
    assert fusion.weights_[2] == 0 and (fusion.weights_[:2] > 0).all(), fusion.selection_
    assert list(fusion.used_members_) == [True, True, False]
    best = max(roc_auc_score(y_test, X_test[:, m]) for m in range(3))
    assert roc_auc_score(y_test, fusion.transform(X_test)) > best + 0.02
    # Each step's cross-validated figure rises; the first is the best member alone.
    figures = [step["figure"] for step in fusion.selection_]
    assert figures == sorted(figures) and len(figures) == 2
    alone = fusion.selection_[0]["alone"]
    assert fusion.selection_[0]["member"] == max(alone, key=alone.get)
    # Restricted to the members it weighs, it gives the same scores.
    kept = fusion.restricted(np.flatnonzero(fusion.used_members_))
    np.testing.assert_allclose(kept.transform(X_test[:, :2]), fusion.transform(X_test))
    with pytest.raises(ValueError, match="weight 0"):
        fusion.restricted(np.array([0, 2]))
    # Without a member: the others' weights renormalized; without the only one: None.
    without = fusion.without(1)
    assert without.weights_[1] == 0 and without.weights_[0] == pytest.approx(1.0)
    assert without.without(0) is None and fusion.without(2) is None


def test_forward_selection_never_dilutes_a_dominant_member():
    # A strong member beside a weak one: the rank mean dilutes it, forward keeps it alone or
    # gives the weak one a small weight. (This validation draw favours the weak member: at a
    # fifth of the weight it cross-validates +0.006 there, and loses 0.008 on the test draw.)
    X_val, y_val = strong_and_weak(600, 11)
    X_test, y_test = strong_and_weak(1500, 12)
    fusion = ScoreFusion("forward").fit(X_val, y_val)
    strong = roc_auc_score(y_test, X_test[:, 0])
    rank_mean = roc_auc_score(y_test, ScoreFusion("rank").fit(X_val, y_val).transform(X_test))
    assert rank_mean < strong - 0.01
    assert fusion.weights_[0] >= 0.75, fusion.selection_
    assert roc_auc_score(y_test, fusion.transform(X_test)) >= strong - 0.01
    # Nothing to choose on (one class): every member, rank-mean.
    unlabeled = ScoreFusion("forward").fit(X_val)
    np.testing.assert_allclose(unlabeled.weights_, [0.5, 0.5])
    # Chosen on some rows only (real defects): the injected ones do not decide. Here the
    # "injected" rows say member 1 is perfect; the real rows say member 0.
    X_fake = np.stack([np.zeros(200), np.r_[np.zeros(100), np.ones(100)]], 1)
    y_fake = np.r_[np.zeros(100), np.ones(100)].astype(int)
    X_all, y_all = np.vstack([X_val, X_fake]), np.r_[y_val, y_fake]
    real = np.r_[np.ones(len(y_val), bool), np.zeros(200, bool)]
    fusion = ScoreFusion("forward").fit(X_all, y_all, choose_on=real)
    assert fusion.selection_[0]["member"] == 0


def test_forward_selection_keeps_groups_in_one_fold():
    # Rows of one group (a part's images) never sit on both sides of the selection's folds:
    # with groups that carry their label in a shared offset, a member that learns the group
    # looks perfect only when a group's rows are split.
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 10)
    y = np.repeat(rng.random(40) < 0.5, 10).astype(int)
    fusion = ScoreFusion("forward")
    X = np.stack([y + rng.normal(0, 1.0, len(y)), rng.normal(0, 1, len(y))], 1)
    rows = fusion._choosing_rows(X, y, groups, None, None)
    for train, held in rows[-1]:
        assert not set(groups[train]) & set(groups[held])


def test_sampled_pixel_rows_keep_each_defect_region_apart():
    from fusion.hybrid import sample_pixel_rows

    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 1:3, 1:3] = masks[0, 10:12, 10:14] = True  # two defects; image 1 is normal
    masks[2, 5:9, 5] = True
    maps = [rng.random((2, 16, 16)) for _ in range(3)]
    rows, labels, images, regions = sample_pixel_rows(zip(maps, masks), 1000, rng)
    assert rows.shape == (3 * 256, 2) and labels.sum() == masks.sum()  # every pixel here
    assert (regions[labels == 0] == -1).all()
    assert sorted(np.unique(regions[labels == 1])) == [1, 2, 3]  # one id each, across images
    assert len(np.unique(regions[(labels == 1) & (images == 0)])) == 2
    # A row holds its pixel's member scores.
    defect_rows = rows[(images == 2) & (labels == 1)]
    np.testing.assert_array_equal(np.sort(defect_rows[:, 1]), np.sort(maps[2][1][masks[2]]))


@pytest.mark.parametrize("combiner", ["auto", "rank_or_member"])
def test_choosing_combiners_answer_on_one_scale_whatever_they_chose(combiner):
    # Whether a fusion (a mean of ranks, learned probabilities) or a member alone is chosen,
    # the answer is the fraction of normal reference rows scoring below: folds of a
    # cross-validation that choose differently then pool their answers on one scale.
    X_a, y_a = member_scores(600, 9)
    X_b, y_b = strong_and_weak(600, 11)
    answers = []
    for X, y in ((X_a[:, :2], y_a), (X_b, y_b)):
        fusion = ScoreFusion(combiner).fit(X, y)
        normal = fusion.transform(X[y == 0])
        np.testing.assert_allclose(
            np.quantile(normal, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.02
        )
        answers.append(fusion.chosen_)
    # auto: weighted, then learned; rank_or_member: rank, then member 0.
    assert answers[0] != answers[1], answers


def large_and_small_defect_pixels(seed: int) -> tuple[np.ndarray, ...]:
    """Pixel rows of 30 images (300 normal pixels each): images 0-9 hold a large defect (300
    pixels) that only member 0 sees, images 10-29 a small one (5 pixels) that only member 1
    sees; member 1 also fires on 3 % of normal pixels. Returns scores, labels, images, regions."""
    rng = np.random.default_rng(seed)
    X, y, images, regions = [], [], [], []
    for image in range(30):
        size = 300 if image < 10 else 5
        normal = rng.normal(0, 1, (300, 2))
        normal[rng.random(300) < 0.03, 1] += 6
        defect = rng.normal(0, 1, (size, 2))
        defect[:, 0 if image < 10 else 1] += 2 if image < 10 else 3
        X += [normal, defect]
        y += [np.zeros(300, int), np.ones(size, int)]
        images.append(np.full(300 + size, image))
        regions += [np.full(300, -1), np.full(size, image)]
    return tuple(np.concatenate(part) for part in (X, y, images, regions))


def test_sample_per_group_keeps_small_groups_whole_and_shares_the_rest():
    rng = np.random.default_rng(0)
    groups = np.repeat([7, 1, 2, 3], [5, 40, 1000, 3000])
    taken = sample_per_group(groups, 500, rng)
    assert len(np.unique(taken)) == len(taken) and np.all(np.diff(taken) > 0)
    counts = {g: int((groups[taken] == g).sum()) for g in (7, 1, 2, 3)}
    # 5 and 40 whole; the other two share the 455 left: 227 each.
    assert counts == {7: 5, 1: 40, 2: 227, 3: 227}, counts
    assert np.array_equal(sample_per_group(groups, len(groups), rng), np.arange(len(groups)))
    # More groups than the budget: one row each rather than none.
    assert len(sample_per_group(np.arange(10), 4, rng)) == 10


@pytest.mark.parametrize("max_selection_rows", [200_000, 3000])
def test_auto_combiner_given_regions_weighs_small_defects_as_aupro_does(max_selection_rows):
    # Pixel AUROC counts pixels: the ten large defects outweigh the twenty small ones, and the
    # AUROC choice keeps member 0's view (small defects missed). Given the regions, auto
    # chooses on AUROC and AUPRO together and finds both kinds on unseen pixels.
    X, y, images, regions = large_and_small_defect_pixels(0)
    X_test, y_test, _, regions_test = large_and_small_defect_pixels(1)
    # 3000 of the 12100 rows: thinned at random, the twenty small defects (5 pixels each)
    # would keep about one pixel each; thinned region by region, they keep all of theirs.
    by_auroc = ScoreFusion("auto", max_selection_rows=max_selection_rows).fit(X, y, images)
    by_both = ScoreFusion("auto", max_selection_rows=max_selection_rows).fit(
        X, y, images, regions=regions
    )
    assert by_auroc.candidate_aupro_ == {} and set(by_both.candidate_aupro_) == set(
        by_both.candidate_auroc_
    )
    figures = {}
    for name, fusion in (("auroc", by_auroc), ("both", by_both)):
        fused = fusion.transform(X_test)
        figures[name] = (
            roc_auc_score(y_test, fused),
            aupro_of_pixels(fused, y_test, regions_test),
        )
    (auroc_a, aupro_a), (auroc_b, aupro_b) = figures["auroc"], figures["both"]
    assert auroc_a > auroc_b, figures  # what AUROC alone prefers, it keeps on new pixels
    assert aupro_b > aupro_a + 0.2 and auroc_b + aupro_b > auroc_a + aupro_a + 0.1, figures
    with pytest.raises(ValueError, match="regions has 3 rows"):
        ScoreFusion("auto").fit(X, y, images, regions=np.zeros(3))


@pytest.mark.parametrize("combiner", ["rank", "auto"])
def test_normalizers_fitted_on_shared_rows_make_cross_validation_folds_normalize_alike(combiner):
    # Each fold's fusion sees the shared held-out rows and a different part of a labeled split.
    # Fitted on the shared rows alone, every fold's normalizer is the same map, so a member
    # chosen alone ranks the pooled out-of-fold scores exactly as the member itself does.
    X_held, y_held = member_scores(300, 13)
    X_split, y_split = member_scores(300, 14)
    X_split[:, :2] *= 1.5  # the labeled split scores on another scale than the held-out rows
    folds = [np.arange(300) % 3 != k for k in range(3)]
    fusions, unshared = [], []
    for keep in folds:
        X = np.concatenate([X_held[:, :2], X_split[keep, :2]])
        y = np.concatenate([y_held, y_split[keep]])
        shared = np.arange(len(X)) < len(X_held)
        fusions.append(ScoreFusion(combiner).fit(X, y, normalize_on=shared))
        unshared.append(ScoreFusion(combiner).fit(X, y))
    tables = [f.normalizer_.quantiles_ for f in fusions]
    assert all(np.array_equal(tables[0], t) for t in tables[1:])
    own_tables = [f.normalizer_.quantiles_ for f in unshared]
    assert not np.array_equal(own_tables[0], own_tables[1])
    assert np.array_equal(tables[0], RankNormalizer().fit(X_held[:, :2], y_held).quantiles_)
    with pytest.raises(ValueError, match="normalize_on has 3 rows"):
        ScoreFusion(combiner).fit(X_held, y_held, normalize_on=np.ones(3, bool))


@pytest.mark.parametrize("normalizer", ["rank", "zscore", "minmax"])
def test_each_member_can_be_normalized_against_its_own_reference_rows(normalizer):
    # Member 0 answered rows 100+ with another model, on another scale (a nested head on the
    # other folds' images): it is normalized on its first 100 rows, the others on all of them.
    X, y = member_scores(200, 21)
    X[100:, 0] += 5.0
    own = np.ones(X.shape, bool)
    own[100:, 0] = False
    fusion = ScoreFusion("mean", normalizer).fit(X, y, normalize_on=own)
    for m in range(X.shape[1]):
        rows = own[:, m]
        alone = get_normalizer(normalizer).fit(X[rows][:, [m]], y[rows])
        np.testing.assert_allclose(
            fusion.normalizer_.transform(X)[:, m], alone.transform(X[:, [m]])[:, 0]
        )
    with pytest.raises(ValueError, match=r"normalize_on is \(200, 2\)"):
        ScoreFusion("mean").fit(X, y, normalize_on=own[:, :2])
    own[:, 1] = False
    with pytest.raises(ValueError, match=r"at least 2 normal samples for each member"):
        ScoreFusion("mean").fit(X, y, normalize_on=own)


def test_fusion_errors_name_the_problem():
    X, y = member_scores(50, 8)
    with pytest.raises(ValueError, match="unknown combiner"):
        ScoreFusion("median").fit(X, y)
    with pytest.raises(ValueError, match="labeled normal and defective"):
        ScoreFusion("learned").fit(X)
    fitted = ScoreFusion("mean").fit(X)
    with pytest.raises(ValueError, match=r"expected scores \[n, 3\]"):
        fitted.transform(X[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        ScoreFusion("mean").fit(np.full((5, 3), np.nan))


def test_false_alarm_operating_point_keeps_its_budget():
    from grading.graders import image_threshold

    rng = np.random.default_rng(0)
    normal, defective = rng.normal(0, 1, 400), rng.normal(2, 1, 400)
    scores, labels = np.r_[normal, defective], np.r_[np.zeros(400), np.ones(400)]
    threshold = image_threshold(scores, labels, "false_alarm", 0.01)
    assert (normal >= threshold).sum() == 4  # 1 % of 400
    assert (rng.normal(0, 1, 20000) >= threshold).mean() < 0.02  # new defect-free panels
    # At this defect share, F1 buys recall with false alarms: a lower threshold.
    assert image_threshold(scores, labels, "f1") < threshold
    few = normal[:15]  # a 1 % budget over 15 images allows none of them
    assert (few >= image_threshold(few, np.zeros(15), "false_alarm", 0.01)).sum() == 0


def test_hybrid_rank_fusion_of_members_blind_to_each_others_defects_beats_both():
    """By construction fusion must help: one member sees only dark spots, the other only
    bright ones; the hybrid (rank fusion of scores and maps, fitted on validation panels)
    finds both kinds, on images and pixels, better than either member can."""
    import torch
    import torch.nn.functional as F

    from evaluation import evaluate_hybrid
    from fusion.hybrid import Hybrid
    from members.base import Member

    class OneSignedContrast(Member):
        """The image's deviation from its local mean, of one sign only."""

        def __init__(self, sign: float) -> None:
            super().__init__()
            self.sign = sign
            self.fitted.fill_(True)

        def compute_anomaly_map(self, images, features=None):
            gray = images.mean(1, keepdim=True)
            local = F.avg_pool2d(gray, 9, stride=1, padding=4, count_include_pad=False)
            return (self.sign * (gray - local)).clamp_min(0)

    def panels(seed: int, n: int = 8, size: int = 48) -> list[dict]:
        """``n`` noisy flat panels each: defect-free, with a dark spot, with a bright spot."""
        rng = np.random.default_rng(seed)
        out = []
        for kind in ["normal"] * n + ["dark"] * n + ["bright"] * n:
            image = 0.5 + rng.normal(0, 0.02, (size, size))
            mask = np.zeros((size, size), bool)
            if kind != "normal":
                y, x = rng.integers(4, size - 10, 2)
                mask[y : y + 6, x : x + 6] = True
                image[mask] += 0.1 if kind == "bright" else -0.1
            out.append(
                {
                    "image": torch.from_numpy(image).float()[None],
                    "mask": torch.from_numpy(mask).float()[None],
                    "label": int(kind != "normal"),
                    "path": f"{kind}.png",
                    "defect_type": None if kind == "normal" else kind,
                }
            )
        return out

    members = {"dark": OneSignedContrast(-1.0), "bright": OneSignedContrast(1.0)}
    hybrid = Hybrid(members, image_size=None, combiner="rank", describer_backbone=None)
    validation = [
        {"image": s["image"][0].numpy(), "mask": s["mask"][0].numpy(), "label": s["label"]}
        for s in panels(1)
    ]
    metrics = evaluate_hybrid(hybrid.fit(validation), panels(2))["metrics"]
    # Measured over five seed pairs: members image AUROC 0.76-0.94, pixel AUROC 0.61-0.62,
    # AUPRO 0.47-0.48 (each misses half the defects); the hybrid 0.98-1.0, 0.96-0.97, 0.90-0.91.
    for key, margin in (("image_auroc", 0.05), ("pixel_auroc", 0.25), ("aupro", 0.3)):
        best = max(metrics[name][key] for name in members)
        assert metrics["hybrid"][key] > best + margin, (key, metrics)


def test_a_reconstructing_member_gives_each_test_image_its_reconstruction_figures(
    tmp_path, monkeypatch
):
    """A member that reconstructs (here: the local mean, which smooths a spot away) gives each
    test image PSNR, SSIM and LPIPS against its reconstruction, and the report shows them:
    a defect the reconstruction leaves out lowers PSNR and SSIM."""
    import torch
    import torch.nn.functional as F

    from evaluation import evaluate_hybrid
    from fusion.hybrid import Hybrid
    from members.base import Member
    from metrics.quality import LPIPS_BACKBONE_FILES
    from reporting.hybrid_report import _quality_sections

    class LocalMean(Member):
        reconstructs = True

        def __init__(self) -> None:
            super().__init__()
            self.fitted.fill_(True)

        def reconstruct_images(self, images):
            return F.avg_pool2d(images, 9, stride=1, padding=4, count_include_pad=False)

        def compute_anomaly_map(self, images, features=None):
            return (images - self.reconstruct_images(images)).abs().mean(1, keepdim=True)

    rng = np.random.default_rng(0)
    samples = []
    for k in range(16):
        image = 0.5 + rng.normal(0, 0.01, (48, 48))
        mask = np.zeros((48, 48), bool)
        if k % 2:
            mask[20:28, 20:28] = True
            image[mask] += 0.2
        samples.append(
            {
                "image": torch.from_numpy(image).float()[None],
                "mask": torch.from_numpy(mask).float()[None],
                "label": k % 2,
                "path": f"{k}.png",
                "defect_type": "spot" if k % 2 else None,
            }
        )
    hybrid = Hybrid({"mean": LocalMean()}, image_size=None, describer_backbone=None)
    validation = [
        {"image": s["image"][0].numpy(), "mask": s["mask"][0].numpy(), "label": s["label"]}
        for s in samples
    ]
    monkeypatch.chdir(tmp_path)  # no backbones/ here: LPIPS has no backbone file
    evaluation = evaluate_hybrid(hybrid.fit(validation), samples, intervals=False, quality=True)
    records = evaluation["records"]
    psnr = {label: [r["mean psnr_db"] for r in records if r["label"] == label] for label in (0, 1)}
    ssim = {label: [r["mean ssim"] for r in records if r["label"] == label] for label in (0, 1)}
    assert max(psnr[1]) < min(psnr[0]) and max(ssim[1]) < min(ssim[0])
    # 48 px is too small for MS-SSIM's five scales; LPIPS has no backbone file here.
    assert all(r["mean ms_ssim"] is None and r["mean lpips"] is None for r in records)
    assert all(r["wavelet_uniformity_pct"] > 0 for r in records)
    quality = evaluation["quality"]
    assert quality["reconstructing_members"] == ["mean"]
    assert LPIPS_BACKBONE_FILES["alex"] in quality["lpips_unavailable"]
    page = "".join(_quality_sections({"quality": quality}, records))
    assert "mean PSNR (dB)" in page and "mean SSIM" in page
    assert "LPIPS: left out" in page and LPIPS_BACKBONE_FILES["alex"] in page

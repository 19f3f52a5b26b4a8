"""Detection metrics: agreement with scikit-learn, hand-made AUPRO cases, streaming bounds."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from metrics import aupro_of_pixels, available_classes, binary_auroc, get_metric


@pytest.fixture
def image_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels * 0.8
    return scores, labels


def test_image_auroc_and_ap_equal_sklearn(image_data):
    scores, labels = image_data
    auroc, ap = get_metric("image_auroc"), get_metric("image_ap")
    for chunk in np.array_split(np.arange(200), 7):  # streaming in uneven batches
        auroc.update(scores[chunk], labels[chunk])
        ap.update(scores[chunk], labels[chunk])
    assert auroc.compute() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ap.compute() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_binary_auroc_is_sklearns_to_the_last_bit():
    """Forward selection compares figures exactly: the fast AUROC must round as sklearn does,
    ties within and across the classes included."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(4, 300))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        labels[:2] = [True, False]
        scores = rng.random(n) + labels * rng.uniform(0, 1)
        mixed = scores * rng.random() + rng.random(n) * rng.random()
        for s in (scores, np.round(scores, trial % 3), mixed, mixed.astype(np.float32)):
            assert binary_auroc(labels, s) == roc_auc_score(labels, s)
    many = rng.integers(0, 2, 50_000)
    pixels = np.round(rng.random(50_000) + 0.2 * many, 2)
    assert binary_auroc(many, pixels) == roc_auc_score(many, pixels)
    assert binary_auroc([0, 1, 0, 1], np.zeros(4)) == 0.5
    with pytest.raises(ValueError, match="both normal and defective"):
        binary_auroc(np.ones(5), np.arange(5))


def test_image_f1_max_is_the_best_threshold(image_data):
    scores, labels = image_data
    metric = get_metric("image_f1_max")
    metric.update(scores, labels)
    out = metric.compute()
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert out["f1"] == pytest.approx(brute)
    assert f1_score(labels, scores >= out["threshold"]) == pytest.approx(out["f1"])


def random_maps(seed=0, n=6, size=32):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, 1, size, size)).astype(np.float32)
    masks = np.zeros_like(maps)
    masks[: n // 2, 0, 5:12, 5:15] = 1
    maps += masks * 0.3
    return maps, masks


def test_pixel_auroc_equals_sklearn_and_streams_exactly():
    maps, masks = random_maps()
    metric = get_metric("pixel_auroc")
    for i in range(len(maps)):
        metric.update(maps[i : i + 1], masks[i : i + 1])
    assert metric.compute() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert metric.error_bound == 0.0


def test_binned_streaming_stays_within_its_stated_bound():
    maps, masks = random_maps(seed=1)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    binned = get_metric("pixel_auroc", max_exact=500, bins=5000)
    for i in range(len(maps)):
        binned.update(maps[i : i + 1], masks[i : i + 1])
    assert binned.scores.binned
    assert 0 < binned.error_bound < 1e-3
    assert abs(binned.compute() - exact) <= binned.error_bound


def test_binned_pixels_fall_in_the_bin_their_value_names():
    """Bin k counts edges[k] <= v < edges[k + 1]; values on an edge go to the bin it opens,
    values beyond the first or last edge to the end bins."""
    from metrics.detection import PixelScores

    rng = np.random.default_rng(3)
    scores = PixelScores(max_exact=100, bins=50)
    scores.add(rng.normal(size=200).astype(np.float32), 0)
    assert scores.binned
    edges = scores.edges
    values = np.concatenate(
        [
            rng.normal(scale=3.0, size=5000),  # many beyond the edges on both sides
            edges[rng.integers(0, len(edges), 200)],  # exactly on edges
        ]
    ).astype(np.float32)
    before = scores.counts[1].copy()
    scores.add(values, 1)
    index = [int(np.sum(edges <= v)) - 1 for v in values.astype(np.float64)]
    expected = np.bincount(np.clip(index, 0, len(edges) - 2), minlength=len(edges) - 1)
    np.testing.assert_array_equal(scores.counts[1] - before, expected)


def test_binned_metrics_do_not_depend_on_the_maps_scale():
    """A strictly increasing rescaling (here exp, which stretches the top like a kNN distance's
    outliers) leaves the binned pixel metrics as they are and near the exact ones; bins evenly
    spread over the stretched range would put most normal pixels in a few bins."""
    maps, masks = random_maps(seed=2, size=64)
    maps[:, :, 0, 0] += 40.0  # a few far outliers, as anomaly maps have
    exact = {}
    for name in ("pixel_auroc", "aupro"):
        metric = get_metric(name)
        metric.update(maps, masks)
        exact[name] = metric.compute()
    for rescale in (lambda m: m, np.exp):
        for name in ("pixel_auroc", "aupro"):
            binned = get_metric(name, max_exact=2000, bins=2000)
            for i in range(len(maps)):
                binned.update(rescale(maps[i : i + 1]), masks[i : i + 1])
            assert binned.scores.binned
            assert binned.compute() == pytest.approx(exact[name], abs=2e-3), (name, rescale)


def test_aupro_hand_made_cases():
    masks = np.zeros((1, 1, 10, 10), np.float32)
    masks[0, 0, 1:3, 1:3] = 1  # region A: 4 pixels
    masks[0, 0, 6:9, 6:9] = 1  # region B: 9 pixels
    perfect = masks * 2.0 + 0.1 * np.random.default_rng(0).random(masks.shape)
    metric = get_metric("aupro")
    metric.update(perfect, masks)
    assert metric.compute() == pytest.approx(1.0, abs=1e-3)
    # Region A found, region B missed entirely (scored below every normal pixel): PRO = 1/2.
    half = np.full_like(masks, 0.5)
    half[0, 0, 1:3, 1:3] = 1.0
    half[0, 0, 6:9, 6:9] = 0.0
    metric = get_metric("aupro")
    metric.update(half, masks)
    assert metric.compute() == pytest.approx(0.5, abs=1e-3)
    # A tiny region counts as much as a large one: that is what per-region overlap means.
    assert metric.regions[0].size == 4 and metric.regions[1].size == 9


def test_aupro_of_random_maps_is_low():
    maps, masks = random_maps(seed=2)
    rng = np.random.default_rng(3)
    metric = get_metric("aupro")
    metric.update(rng.random(maps.shape), masks)
    # Random scores: PRO ~ FPR, so the normalized area up to 0.3 is about 0.15.
    assert metric.compute() == pytest.approx(0.15, abs=0.03)


def test_aupro_of_pixel_rows_equals_aupro_of_the_maps_and_of_a_balanced_sample():
    # Maps with regions of 2 to 64 pixels, each raised by its own amount, on noise.
    rng = np.random.default_rng(4)
    maps = rng.normal(0, 1, (6, 48, 48))
    masks = np.zeros(maps.shape, bool)
    for image in range(4):
        for _ in range(3):
            y, x = rng.integers(0, 40, 2)
            h, w = rng.integers(1, 9, 2)
            masks[image, y : y + h, x : x + w] = True
            maps[image, y : y + h, x : x + w] += rng.uniform(0.5, 3)
    metric = get_metric("aupro")
    metric.update(maps, masks)
    regions, offset = [], 0
    for mask in masks:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append(np.where(labels > 0, labels + offset, -1).ravel())
        offset += count
    regions = np.concatenate(regions)
    rows = aupro_of_pixels(maps.ravel(), masks.ravel(), regions)
    assert rows == pytest.approx(metric.compute(), abs=2e-3)
    # Every region weighs the same however many of its pixels were sampled: keeping one pixel
    # in three of each region (at least one) leaves the figure close.
    keep = ~masks.ravel() | (rng.random(masks.size) < 1 / 3)
    for region in np.unique(regions[regions >= 0]):
        keep[np.flatnonzero(regions == region)[0]] = True
    sampled = aupro_of_pixels(maps.ravel()[keep], masks.ravel()[keep], regions[keep])
    assert sampled == pytest.approx(rows, abs=0.05)
    # Unweighted (every pixel one region), the large regions would dominate: not the same.
    pixels = aupro_of_pixels(maps.ravel(), masks.ravel(), np.arange(masks.size))
    assert abs(pixels - rows) > 0.02
    with pytest.raises(ValueError, match="normal and defective"):
        aupro_of_pixels(maps.ravel(), np.ones(maps.size, bool), regions)


def brute_force_f1_max(maps: np.ndarray, masks: np.ndarray) -> float:
    """The best F1 over every distinct score taken as the threshold (score >= it: defective)."""
    labels, scores = masks.ravel() > 0, maps.ravel()
    return max(f1_score(labels, scores >= t) for t in np.unique(scores))


def test_pixel_f1_max_is_the_best_threshold():
    # Small enough to try every threshold; few distinct values, so ties are many.
    rng = np.random.default_rng(4)
    maps = np.round(rng.random((3, 1, 8, 8)), 1).astype(np.float32)
    masks = (rng.random(maps.shape) < 0.3).astype(np.float32)
    maps += masks * 0.2
    metric = get_metric("pixel_f1_max")
    for i in range(len(maps)):  # streamed
        metric.update(maps[i : i + 1], masks[i : i + 1])
    out = metric.compute()
    assert out["f1"] == pytest.approx(brute_force_f1_max(maps, masks), abs=1e-12)
    labels, scores = masks.ravel() > 0, maps.ravel()
    assert f1_score(labels, scores >= out["threshold"]) == pytest.approx(out["f1"], abs=1e-12)
    # The larger random case too.
    maps, masks = random_maps(seed=4)
    metric = get_metric("pixel_f1_max")
    metric.update(maps, masks)
    assert metric.compute()["f1"] == pytest.approx(brute_force_f1_max(maps, masks), abs=1e-12)


def test_pixel_f1_max_hand_made_case():
    # Scores 0.9 .. 0.4 with defects at 0.9 and 0.7: thresholds 0.9, 0.8, 0.7, 0.6 give
    # F1 2/3, 1/2, 4/5 (tp 2, fp 1), 2/3; lower ones only add false positives.
    maps = np.array([[[[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]]]], np.float32)
    masks = np.array([[[[1, 0, 1], [0, 0, 0]]]], np.float32)
    metric = get_metric("pixel_f1_max")
    metric.update(maps, masks)
    out = metric.compute()
    assert out["f1"] == pytest.approx(0.8)
    assert out["threshold"] == pytest.approx(0.7)


def test_factory_and_errors():
    assert {
        "image_auroc",
        "image_ap",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "pixel_f1_max",
    } <= set(available_classes)
    with pytest.raises(KeyError, match="unknown metric"):
        get_metric("accuracy")
    metric = get_metric("image_auroc")
    metric.update([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="normal and defective"):
        metric.compute()
    with pytest.raises(ValueError, match="NaN"):
        get_metric("pixel_auroc").update(np.full((1, 1, 2, 2), np.nan), np.zeros((1, 1, 2, 2)))
    metric.reset()
    with pytest.raises(ValueError, match="no data"):
        metric.compute()


def blob_maps(seed: int, n: int = 60, size: int = 64, gains=(2.0, 1.0), largest: int = 8):
    """Defect-free and defective images (every second one: one to three square defects of 2 to
    ``largest`` pixels a side) and one map per gain: shared texture, the defect raised by the
    gain, and each detector's own noise."""
    rng = np.random.default_rng(seed)
    for index in range(n):
        label = index % 2
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4) if label else 0):
            row, col = rng.integers(0, size - 8, 2).tolist()
            side = int(rng.integers(2, largest + 1))
            mask[row : row + side, col : col + side] = True
        texture = rng.normal(size=(size, size))
        maps = {
            f"gain {gain}": texture + gain * mask + 0.5 * rng.normal(size=(size, size))
            for gain in gains
        }
        yield label, maps, mask


def test_bootstrap_figures_of_the_whole_split_equal_the_exact_metrics():
    from metrics.bootstrap import PairedBootstrap

    bootstrap = PairedBootstrap()
    exact = {name: {m: get_metric(m) for m in ("pixel_auroc", "aupro")} for name in ("a", "b")}
    labels, scores = [], {"a": [], "b": []}
    for label, maps, mask in blob_maps(1):
        maps = dict(zip(("a", "b"), maps.values()))
        image_scores = {name: float(m.max()) for name, m in maps.items()}
        bootstrap.update(label, image_scores, maps, mask)
        labels.append(label)
        for name in maps:
            scores[name].append(image_scores[name])
            for metric in exact[name].values():
                metric.update(maps[name], mask)
    figures = bootstrap.figures()
    for d, name in enumerate(("a", "b")):
        # Image figures: exact, ties and all; pixel figures: from at most 2048 normal and 256
        # region pixels an image, in 1024 bins.
        assert figures["image_auroc"][d, 0] == pytest.approx(roc_auc_score(labels, scores[name]))
        assert figures["image_ap"][d, 0] == pytest.approx(
            average_precision_score(labels, scores[name])
        )
        for metric in ("pixel_auroc", "aupro"):
            assert figures[metric][d, 0] == pytest.approx(exact[name][metric].compute(), abs=0.005)
    tied = PairedBootstrap()
    for index, score in enumerate([0.1, 0.5, 0.5, 0.5, 0.9, 0.2]):
        tied.update(index % 2, {"a": score})
    tied_scores, tied_labels = [0.1, 0.5, 0.5, 0.5, 0.9, 0.2], [0, 1, 0, 1, 0, 1]
    assert tied.figures()["image_auroc"][0, 0] == pytest.approx(
        roc_auc_score(tied_labels, tied_scores)
    )
    assert tied.figures()["image_ap"][0, 0] == pytest.approx(
        average_precision_score(tied_labels, tied_scores)
    )


def test_bootstrap_intervals_cover_the_true_auroc():
    """Splits of 40 + 40 images from two normal distributions a unit apart (true AUROC
    Phi(1 / sqrt 2) = 0.760): the 90 % intervals of 200 splits cover it about 90 % of the time,
    and they narrow as the split grows."""
    from scipy.stats import norm

    from metrics.bootstrap import PairedBootstrap

    truth = norm.cdf(1 / np.sqrt(2))
    rng = np.random.default_rng(0)
    covered, widths = 0, {40: [], 160: []}
    for trial in range(200):
        for n in (40, 160) if trial < 20 else (40,):
            bootstrap = PairedBootstrap(resamples=400, confidence=0.9, seed=trial)
            for label in np.repeat([0, 1], n):
                bootstrap.update(int(label), {"a": float(rng.normal(label))})
            low, high = bootstrap.compute()["intervals"]["a"]["image_auroc"]
            widths[n].append(high - low)
            if n == 40:
                covered += low <= truth <= high
    assert 0.82 <= covered / 200 <= 0.97, covered
    assert np.mean(widths[160]) < 0.6 * np.mean(widths[40])


def test_paired_intervals_tell_a_real_lead_from_noise():
    """A detector that sees defects twice as well leads on every figure; two detectors that
    differ only in their own small noise are within noise of each other. Scored on the same
    images, the pair's difference is surer than either detector's own figure."""
    from metrics.bootstrap import PairedBootstrap

    bootstrap = PairedBootstrap(resamples=500)
    for label, maps, mask in blob_maps(2, gains=(2.0, 1.0, 2.001)):
        bootstrap.update(label, {name: float(m.max()) for name, m in maps.items()}, maps, mask)
    result = bootstrap.compute("gain 2.0")
    assert result["reference"] == "gain 2.0" and "2048 normal pixels" in result["pixels"]
    lead = result["differences"]["gain 1.0"]
    tie = result["differences"]["gain 2.001"]
    for metric in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
        assert lead[metric]["verdict"] == "higher", (metric, lead[metric])
        assert lead[metric]["interval"][0] > 0
        low, high = tie[metric]["interval"]
        assert low <= 0 <= high and tie[metric]["verdict"] == "within noise", (metric, low, high)
    own = result["intervals"]["gain 2.0"]["aupro"]
    paired = lead["aupro"]["interval"]
    assert paired[1] - paired[0] < own[1] - own[0]


def test_bootstrap_refuses_what_it_cannot_pair():
    from metrics.bootstrap import PairedBootstrap

    bootstrap = PairedBootstrap()
    bootstrap.update(0, {"a": 0.1, "b": 0.2})
    with pytest.raises(ValueError, match="differ from the first image's"):
        bootstrap.update(1, {"a": 0.3})
    assert bootstrap.compute() is None  # one label only: no AUROC to resample
    bootstrap.update(1, {"a": 0.3, "b": 0.1})
    with pytest.raises(KeyError, match="'c' is not a detector"):
        bootstrap.compute("c")
    # Images without maps: image intervals only, and the result says why.
    result = bootstrap.compute("a")
    assert set(result["intervals"]["b"]) == {
        "image_auroc",
        "image_ap",
        *(f"miss_rate_at_{b:g}" for b in (0.01, 0.02, 0.05)),
    }
    assert "no pixel intervals" in result["pixels"]
    with pytest.raises(ValueError, match="confidence"):
        PairedBootstrap(confidence=95)
    with pytest.raises(ValueError, match="non-finite image scores"):
        PairedBootstrap().update(0, {"a": float("nan")})
    shaped = PairedBootstrap()
    shaped.update(1, {"a": 1.0}, {"a": np.ones((4, 4))}, np.ones((1, 1, 4, 4)))  # [1, 1, H, W]
    with pytest.raises(ValueError, match="a's map"):
        shaped.update(0, {"a": 0.0}, {"a": np.zeros((4, 5))}, np.zeros((4, 4)))


def large_faint_and_smaller_bright_defects(n: int = 24, size: int = 64):
    """Every second image holds a large faint defect (36 to 44 pixels a side, more than the
    1024 pixels kept of a region) and a smaller bright one (8 to 14): pixel AUROC then depends
    on weighing each region by its size, AUPRO on weighing regions alike."""
    rng = np.random.default_rng(3)
    for index in range(n):
        anomaly = np.zeros((size, size))
        if index % 2:
            side = int(rng.integers(36, 45))
            anomaly[2 : 2 + side, 2 : 2 + side] = 0.7
            small = int(rng.integers(8, 15))
            anomaly[48 : 48 + small, 48 : 48 + small] = 2.0
        anomaly_map = rng.normal(size=(size, size)) + anomaly
        yield index % 2, anomaly_map, anomaly > 0


def test_bootstrap_resamples_score_like_the_exact_metrics_on_the_drawn_images():
    """Figures on a resample (some images twice, some not at all) equal the exact metrics on
    that list of images, with regions larger than the pixels kept of each."""
    from metrics.bootstrap import PairedBootstrap

    images = list(large_faint_and_smaller_bright_defects())
    bootstrap = PairedBootstrap()
    for label, anomaly_map, mask in images:
        bootstrap.update(label, {"a": float(anomaly_map.max())}, {"a": anomaly_map}, mask)
    counts = np.random.default_rng(0).multinomial(24, np.full(24, 1 / 24), size=3).astype(float)
    figures = bootstrap.figures(counts)
    for r, drawn in enumerate(counts):
        exact = {m: get_metric(m) for m in ("image_auroc", "image_ap", "pixel_auroc", "aupro")}
        for index, times in enumerate(drawn.astype(int)):
            label, anomaly_map, mask = images[index]
            for _ in range(times):
                exact["image_auroc"].update([anomaly_map.max()], [label])
                exact["image_ap"].update([anomaly_map.max()], [label])
                exact["pixel_auroc"].update(anomaly_map, mask)
                exact["aupro"].update(anomaly_map, mask)
        for metric, value in exact.items():
            tolerance = 1e-9 if metric.startswith("image") else 0.005
            assert figures[metric][0, r] == pytest.approx(value.compute(), abs=tolerance), metric


def test_bootstrap_with_few_masks_keeps_a_region_in_every_resample():
    """Twenty defective images, one with a mask: every resample still draws it, so pixel
    intervals are finite."""
    from metrics.bootstrap import PairedBootstrap

    bootstrap = PairedBootstrap(resamples=200)
    rng = np.random.default_rng(0)
    for index in range(40):
        label = index % 2
        mask = np.zeros((16, 16), bool)
        mask[4:9, 4:9] = index == 1
        texture = rng.normal(size=(16, 16)) + 2 * mask
        bootstrap.update(label, {"a": float(texture.max())}, {"a": texture}, mask)
    intervals = bootstrap.compute()["intervals"]["a"]
    assert np.isfinite(intervals["pixel_auroc"]).all() and intervals["aupro"][0] > 0.5


def test_miss_rates_at_false_alarm_budgets_read_the_curve():
    from metrics.detection import miss_rate_curve, miss_rates

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(100)].astype(int)
    scores = np.r_[rng.normal(0, 1, 200), rng.normal(2, 1, 100)].round(1)  # with ties
    got = miss_rates(scores, labels)
    false_alarm, missed = miss_rate_curve(scores, labels)
    for budget in (0.01, 0.02, 0.05):
        # The lowest miss rate among the thresholds that flag at most the budget.
        assert got[f"miss_rate_at_{budget:g}"] == pytest.approx(
            missed[false_alarm <= budget + 1e-12].min()
        )
    assert missed[0] == 1 and false_alarm[0] == 0 and missed[-1] == 0 and false_alarm[-1] == 1
    # Perfect scores miss nothing at any budget; a tie across the budget flags none of it.
    assert miss_rates([0, 1], [0, 1])["miss_rate_at_0.01"] == 0
    assert miss_rates([1, 1], [0, 1])["miss_rate_at_0.05"] == 1


def test_bootstrap_miss_rates_equal_the_exact_ones_and_cover_them():
    from metrics.bootstrap import PairedBootstrap
    from metrics.detection import miss_rates

    rng = np.random.default_rng(1)
    bootstrap = PairedBootstrap()
    labels = np.r_[np.zeros(150), np.ones(60)].astype(int)
    a = np.r_[rng.normal(0, 1, 150), rng.normal(3, 1, 60)]
    b = np.r_[rng.normal(0, 1, 150), rng.normal(1, 1, 60)]
    for label, x, y in zip(labels, a, b):
        bootstrap.update(label, {"a": x, "b": y})
    whole = bootstrap.figures()
    summary = bootstrap.compute("a", {"a": miss_rates(a, labels), "b": miss_rates(b, labels)})
    for d, scores in enumerate((a, b)):
        for key, value in miss_rates(scores, labels).items():
            assert whole[key][d, 0] == pytest.approx(value)
            low, high = summary["intervals"]["ab"[d]][key]
            assert low <= value <= high
    # a misses far fewer: the difference a - b is negative, and the verdict says so.
    assert summary["differences"]["b"]["miss_rate_at_0.05"]["verdict"] == "lower"

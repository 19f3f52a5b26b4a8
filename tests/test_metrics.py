"""Detection metrics: agreement with scikit-learn, hand-made AUPRO cases, streaming bounds."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from metrics import aupro_of_pixels, available_classes, get_metric


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

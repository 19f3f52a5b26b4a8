"""Region measurement: the background under a region, and the area and contrast measured."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data.images import LazyImage
from data.maps import MapOnDisk
from grading.regions import (
    _masked_blur,
    find_regions,
    local_background,
    luminance,
    measure_detection,
    measure_region,
)


def smooth_panel(height: int = 600, width: int = 480) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    # A tilted background: a local mean is unbiased under a plane (not under a curved one).
    vignette = 0.5 + 0.1 * rows / height + 0.05 * cols / width
    return vignette + 0.004 * np.random.default_rng(0).standard_normal((height, width))


def exact_masked_blur(values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    numerator = ndimage.gaussian_filter(values * weights, sigma, mode="nearest")
    denominator = ndimage.gaussian_filter(weights, sigma, mode="nearest")
    fallback = ndimage.gaussian_filter(values, sigma, mode="nearest")
    return np.where(denominator > 1e-3, numerator / np.maximum(denominator, 1e-12), fallback)


def test_wide_background_blur_matches_the_full_resolution_one():
    rows, cols = np.mgrid[:600, :480]
    panel = smooth_panel() + 0.05 * np.sin(rows / 90.0) * np.cos(cols / 70.0)  # curved
    for (y0, y1, x0, x1), sigma in [((250, 370, 180, 300), 120.0), ((300, 306, 40, 440), 40.0)]:
        weights = np.ones_like(panel)
        weights[y0:y1, x0:x1] = 0
        inside = weights == 0
        fast = _masked_blur(panel, weights, sigma)
        exact = exact_masked_blur(panel, weights, sigma)
        assert fast.shape == panel.shape
        # Under the region, where contrast is measured against it: within 0.5 %.
        assert np.abs(fast[inside] / exact[inside] - 1).max() < 0.005
        assert np.abs(fast / exact - 1).max() < 0.02  # image corners included


def test_a_large_mura_is_measured_at_its_area_and_contrast():
    panel = smooth_panel()
    rows, cols = np.mgrid[: panel.shape[0], : panel.shape[1]]
    disk = (rows - 300) ** 2 + (cols - 240) ** 2 <= 70**2
    image = panel * np.where(disk, 0.95, 1.0)  # a -5 % mura, 140 px across
    detection = ndimage.binary_erosion(disk, iterations=10)  # a map finds its core
    region = measure_region(image, detection, disk.astype(float), pixel_pitch_mm=0.1)
    assert abs(region.contrast_pct - -5.0) < 0.5, region.contrast_pct
    assert abs(region.area_px / disk.sum() - 1) < 0.15, (region.area_px, int(disk.sum()))


def test_the_background_under_a_mura_on_a_curved_panel_carries_the_curvature():
    rows, cols = np.mgrid[:400, :400]
    # Vignetting: a panel 12 % darker 200 px from its bright point, and a slight tilt.
    panel = 0.4 * (1 - 0.12 * ((rows - 150) ** 2 + (cols - 230) ** 2) / 200.0**2)
    panel = panel + 0.01 * rows / 400.0
    disk = (rows - 200) ** 2 + (cols - 200) ** 2 <= 50**2
    image = panel * np.where(disk, 0.97, 1.0)  # a -3 % mura, 100 px across
    outside = (~ndimage.binary_dilation(disk, iterations=12)).astype(float)
    trend = local_background(image, outside, 100.0)
    mean_only = _masked_blur(image, outside, 100.0)
    # The rim's mean misses the curvature by several percent, more than the mura itself...
    assert np.abs(mean_only[disk] / panel[disk] - 1).max() > 0.03
    # ... the trend through the rim does not.
    assert np.abs(trend[disk] / panel[disk] - 1).max() < 0.002
    detection = ndimage.binary_erosion(disk, iterations=10)
    region = measure_region(image, detection, disk.astype(float), pixel_pitch_mm=0.1)
    assert abs(region.contrast_pct - -3.0) < 0.1, region.contrast_pct


def test_a_dark_pixel_in_a_wide_detection_is_measured_as_one_pixel():
    panel = smooth_panel(200, 200)
    image = panel.copy()
    image[100, 120] *= 0.85  # one pixel 15 % dark
    rows, cols = np.mgrid[:200, :200]
    detection = (rows - 100) ** 2 + (cols - 118) ** 2 <= 14**2  # a coarse map's blob
    region = measure_region(image, detection, detection.astype(float), pixel_pitch_mm=0.1)
    assert region.area_px == 1, region.area_px
    assert abs(region.contrast_pct - -15.0) < 1.5, region.contrast_pct


def test_two_defects_under_one_coarse_detection_are_two_regions():
    """A coarse map's blob over a dark particle and a faint bright mura beside it: one region
    for each, measured as each would be alone (before, the blob was one region, measured on
    the particle, and the mura was lost)."""
    panel = smooth_panel(320, 320)
    rows, cols = np.mgrid[:320, :320]
    particle = (rows - 110) ** 2 + (cols - 100) ** 2 <= 3**2
    mura = (rows - 190) ** 2 + (cols - 210) ** 2 <= 18**2
    image = panel * np.where(particle, 0.8, 1.0) * np.where(mura, 1.04, 1.0)
    blob = ((rows - 150) / 110.0) ** 2 + ((cols - 155) / 120.0) ** 2 <= 1.0
    regions = find_regions(image, blob.astype(float), 0.5, 0.1)
    assert len(regions) == 2, [(r.bbox, r.area_px, r.contrast_pct) for r in regions]
    by_sign = {np.sign(r.contrast_pct): r for r in regions}
    dark, bright = by_sign[-1.0], by_sign[1.0]
    assert abs(dark.area_px / particle.sum() - 1) < 0.35, dark.area_px
    assert abs(dark.contrast_pct - -20.0) < 3.0, dark.contrast_pct
    assert abs(bright.area_px / mura.sum() - 1) < 0.2, bright.area_px
    assert abs(bright.contrast_pct - 4.0) < 0.5, bright.contrast_pct
    x0, y0, x1, y1 = bright.bbox
    assert x0 <= 210 < x1 and y0 <= 190 < y1


def test_a_line_fading_along_its_length_is_one_region():
    """A line whose contrast falls from 12 % to 3 % along it has peaks of its own along it,
    but no gap: one region, measured to its half-maximum (6 %, near column 183)."""
    panel = smooth_panel(300, 300)
    image = panel.copy()
    image[150, 50:250] *= 1 - np.linspace(0.12, 0.03, 200)
    rows, cols = np.mgrid[:300, :300]
    blob = ((rows - 150) / 40.0) ** 2 + ((cols - 150) / 130.0) ** 2 <= 1.0
    regions = find_regions(image, blob.astype(float), 0.5, 0.1)
    assert len(regions) == 1, [(r.bbox, r.area_px) for r in regions]
    x0, _, x1, _ = regions[0].bbox
    assert x0 <= 52 and 175 <= x1 <= 240, regions[0].bbox


def test_a_defect_inside_the_rim_of_another_is_measured_on_its_own_pixels():
    """A small panel (from the suite's synthetic run) whose detection holds a dark particle
    and, 20 px away, a dark pixel that the particle's support, grown as more of it was found,
    came to surround: the pixel's region once had all its pixels left out as the particle's,
    and measuring it failed on an empty array. It is one pixel, dark."""
    saved = np.load(Path(__file__).parent / "data" / "two_defects_overlapping_rims.npz")
    image, detection = saved["luminance"] / 65535.0, saved["detection"]
    regions = measure_detection(image, detection, np.ones(image.shape), 0.1)
    assert all(region.area_px >= 1 for region in regions)
    pixel = [region for region in regions if region.bbox == [20, 67, 21, 68]]
    assert len(pixel) == 1 and pixel[0].area_px == 1 and pixel[0].contrast_pct < -10, regions


def test_a_detection_given_as_a_crop_measures_as_the_full_mask():
    """find_regions hands each detection over as a crop at its origin (a panel's full-size mask
    per region would be 65 MB); the measurement is the same, and the region's mask is its own
    pixels within its bbox."""
    panel = smooth_panel()
    rows, cols = np.mgrid[: panel.shape[0], : panel.shape[1]]
    disk = (rows - 300) ** 2 + (cols - 240) ** 2 <= 40**2
    image = panel * np.where(disk, 0.95, 1.0)
    detection = ndimage.binary_erosion(disk, iterations=5)
    whole = measure_region(image, detection, disk.astype(float), pixel_pitch_mm=0.1)
    (box,) = ndimage.find_objects(detection.astype(int))
    crop = measure_region(
        image,
        detection[box],
        disk.astype(float),
        pixel_pitch_mm=0.1,
        origin=(box[0].start, box[1].start),
    )
    assert crop.to_dict() == whole.to_dict() and crop.features == whole.features
    x0, y0, x1, y1 = whole.bbox
    assert whole.mask.shape == (y1 - y0, x1 - x0) and whole.mask.sum() == whole.area_px
    assert np.array_equal(whole.mask, crop.mask)


def test_a_region_too_large_for_one_window_is_measured_on_a_coarser_grid(monkeypatch):
    """A detection spanning a panel is measured on blocks (its float64 window would be
    gigabytes): area and contrast as measured pixel by pixel, within a few percent."""
    import grading.regions

    panel = smooth_panel(600, 600)
    rows, cols = np.mgrid[:600, :600]
    disk = (rows - 300) ** 2 + (cols - 300) ** 2 <= 120**2
    image = panel * np.where(disk, 0.95, 1.0)
    detection = ndimage.binary_erosion(disk, iterations=10)
    fused = disk.astype(np.float32) + 0.01
    fine = measure_region(image, detection, fused, pixel_pitch_mm=0.1)
    monkeypatch.setattr(grading.regions, "MEASURE_PIXELS", 200 * 200)
    coarse = measure_region(image, detection, fused, pixel_pitch_mm=0.1)
    assert abs(coarse.contrast_pct - fine.contrast_pct) < 0.2, (coarse.contrast_pct, fine)
    assert abs(coarse.area_px / fine.area_px - 1) < 0.05, (coarse.area_px, fine.area_px)
    assert abs(coarse.area_mm2 / fine.area_mm2 - 1) < 0.05
    assert coarse.score == fine.score and abs(coarse.mean_score - fine.mean_score) < 1e-6
    x0, y0, x1, y1 = coarse.bbox
    assert coarse.mask.shape == (y1 - y0, x1 - x0) and coarse.mask.sum() == coarse.area_px
    assert np.allclose(coarse.bbox, fine.bbox, atol=8)


def test_a_small_defect_in_a_panel_wide_detection_is_measured_pixel_by_pixel(monkeypatch):
    """A map above threshold everywhere (a panel unlike the training ones) is one detection the
    panel's size; the blocks find the particle in it, which is then measured at full resolution:
    its area and contrast as if it had been detected alone."""
    import grading.regions

    monkeypatch.setattr(grading.regions, "MEASURE_PIXELS", 150 * 150)
    panel = smooth_panel(600, 600)
    image = panel.copy()
    image[300:306, 200:206] *= 0.6  # a 6 x 6 px particle, 40 % dark
    everything = np.ones(panel.shape, bool)
    region = measure_region(image, everything, np.ones(panel.shape, np.float32), 0.1)
    assert region.area_px == 36 and region.bbox == [200, 300, 206, 306], region
    assert abs(region.contrast_pct - -40.0) < 1.0, region.contrast_pct
    assert region.features["log_detection_area"] == pytest.approx(np.log1p(600 * 600))


def whole_map_regions(image: np.ndarray, fused: np.ndarray, threshold: float) -> list:
    """find_regions as it was before it went band by band: one label image the map's size."""
    labels, count = ndimage.label(fused >= threshold)
    peaks = np.asarray(ndimage.maximum(fused, labels, np.arange(1, count + 1)), dtype=float)
    boxes = ndimage.find_objects(labels)
    lum = luminance(image)
    regions = []
    for i in np.argsort(-peaks)[:50]:
        origin = (boxes[i][0].start, boxes[i][1].start)
        regions += measure_detection(lum, labels[boxes[i]] == i + 1, fused, 0.1, origin=origin)
    return regions[:50]


def assert_same_regions(found: list, expected: list) -> None:
    assert [r.to_dict() for r in found] == [r.to_dict() for r in expected]
    assert [r.features for r in found] == [r.features for r in expected]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(found, expected))


def as_read(image: np.ndarray) -> LazyImage:
    """``image`` as predict holds a 16-bit panel: its file's integers, converted on windows."""
    return LazyImage(np.round(image * 65535).astype(np.uint16))


def test_regions_found_band_by_band_are_those_of_the_whole_map(monkeypatch, tmp_path):
    """Components are found a few rows at a time (here 7: a panel's label image would be 262
    MB) and joined across the bands' edges: the same regions, in the same order, measured the
    same, as with one label image, from a map in memory or on disk and an image as read."""
    import data.maps

    rng = np.random.default_rng(4)
    rows, cols = np.mgrid[:600, :800]
    image = smooth_panel(600, 800)
    # A U and an upside-down U (their arms meet only bands below or above where they start),
    # a disk, and the blobs of a noisy map.
    u = (
        (np.abs(cols - 200) <= 30)
        & (rows >= 100)
        & (rows < 170)
        & ((np.abs(cols - 200) >= 22) | (rows >= 163))
    )
    cap = (
        (np.abs(cols - 500) <= 40)
        & (rows >= 300)
        & (rows < 380)
        & ((np.abs(cols - 500) >= 30) | (rows < 306))
    )
    disk = (rows - 450) ** 2 + (cols - 650) ** 2 <= 25**2
    defects = u | cap | disk
    image = image * np.where(defects, 0.9, 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal((600, 800)), 3)
    fused = 0.2 * noise / noise.std() + np.where(defects, 1.0, 0.0)
    # In steps, as rank fusion's maps are: components tie on their peaks, and ties keep the
    # order ndimage.label numbers them in.
    fused = (np.round(fused * 20) / 20).astype(np.float32)
    expected = whole_map_regions(image, fused, 0.5)
    assert len(expected) == 50  # the defects and the noise's strongest blobs
    assert len({r.score for r in expected}) < 25
    monkeypatch.setattr(data.maps, "BAND_PIXELS", 7 * 800)
    assert_same_regions(find_regions(image, fused, 0.5, 0.1), expected)
    on_disk = MapOnDisk(fused.shape, tmp_path)
    on_disk[:] = fused
    assert_same_regions(
        find_regions(as_read(image), on_disk, 0.5, 0.1),
        whole_map_regions(np.asarray(as_read(image)), fused, 0.5),
    )


def test_a_panel_wide_detection_band_by_band_is_measured_as_from_the_whole_map(
    monkeypatch, tmp_path
):
    """A map above threshold everywhere, read from disk a few rows at a time, on a 16-bit image
    as read: the particle in it found and measured as from the map and image in memory."""
    import data.maps
    import grading.regions

    monkeypatch.setattr(grading.regions, "MEASURE_PIXELS", 150 * 150)
    image = smooth_panel(600, 800)
    image[300:306, 200:206] *= 0.6  # a 6 x 6 px particle, 40 % dark
    fused = (1 + 0.1 * np.random.default_rng(5).random((600, 800))).astype(np.float32)
    expected = whole_map_regions(np.asarray(as_read(image)), fused, 0.5)
    assert len(expected) == 1 and expected[0].area_px == 36
    monkeypatch.setattr(data.maps, "BAND_PIXELS", 7 * 800)
    on_disk = MapOnDisk(fused.shape, tmp_path)
    on_disk[:] = fused
    assert_same_regions(find_regions(as_read(image), on_disk, 0.5, 0.1), expected)

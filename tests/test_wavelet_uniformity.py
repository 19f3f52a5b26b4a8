"""Wavelet-band uniformity (``metrics.quality.wavelet_bands`` / ``wavelet_uniformity``): its
units on known patterns, its rise with the contrast of banding and of the synthetic generator's
mura and line defects, its invariance to a global gain and to the file's integer type, the
reduced path of large panels, bad input, the registered metric, and predict's figures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data.synthetic import PanelGenerator
from metrics import available_classes, get_metric
from metrics.quality import (
    QUALITY_METRICS,
    WAVELET_ORIENTATIONS,
    WaveletUniformityMetric,
    panel_quality,
    wavelet_bands,
    wavelet_uniformity,
)
from prediction.results import IMAGE_COLUMNS, write_reports
from tests.helpers import banding, mura_field

HORIZONTAL = WAVELET_ORIENTATIONS.index("horizontal")
VERTICAL = WAVELET_ORIENTATIONS.index("vertical")
SIZE = 128


def _clean_panel(size: int = SIZE, seed: int = 0) -> tuple[PanelGenerator, np.ndarray]:
    """A defect-free synthetic panel: its smooth non-uniformity, vignetting and pixel noise."""
    generator = PanelGenerator(size=size, seed=seed)
    return generator, generator.generate_normal(0)["image"]


def _own_band(pattern: np.ndarray) -> tuple[int, int]:
    """The (level index, orientation) where a relative change ``pattern`` has the most energy on
    a flat, noiseless panel: the band of its scale."""
    bands = wavelet_bands(0.5 * pattern)
    return tuple(int(i) for i in np.unravel_index(np.nanargmax(bands), bands.shape))


def _strictly_rising(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def _assert_rises_at_its_scale(clean: np.ndarray, patterns: list[np.ndarray]) -> None:
    """``clean`` times each pattern (rising contrasts): the pattern's own band and the figure
    rise strictly, the weakest pattern already lifts the figure above the clean panel's, and
    the strongest is the panel's strongest band."""
    own = _own_band(patterns[-1])
    own_energy, figures = [], []
    for pattern in patterns:
        bands = wavelet_bands(clean * pattern)
        own_energy.append(bands[own])
        figures.append(wavelet_uniformity(clean * pattern))
        assert figures[-1] == pytest.approx(np.nanmax(bands))
    assert _strictly_rising(own_energy), own_energy
    assert _strictly_rising(figures), figures
    assert figures[0] > wavelet_uniformity(clean), figures
    assert figures[-1] == pytest.approx(own_energy[-1])


def test_band_energies_are_contrasts_in_percent_of_the_mean_luminance():
    # A sinusoid of contrast c has an RMS of c / sqrt(2): spread over its bands, their squares
    # add up to it (Parseval, orthonormal Haar); most of it at the level of its period.
    for level, period in enumerate((4, 8, 16), start=2):
        bands = wavelet_bands(0.5 * banding(SIZE, period, 4.0))
        assert np.sqrt(np.sum(bands**2)) == pytest.approx(4.0 / np.sqrt(2), rel=1e-9), period
        assert np.argmax(bands[:, HORIZONTAL]) + 1 == (1 if period == 4 else level)
        assert np.abs(bands[:, 1:]).max() < 1e-9  # row banding is horizontal detail only
    # White pixel noise of relative sigma s: 100 s / 2**j at level j, in each orientation.
    rng = np.random.default_rng(0)
    noisy = 0.4 * (1 + 0.01 * rng.standard_normal((256, 256)))
    expected = 100 * 0.01 / 2 ** np.arange(1, 5)
    assert np.allclose(wavelet_bands(noisy), expected[:, None], rtol=0.15)


@pytest.mark.parametrize("rows", [True, False], ids=["row-banding", "column-banding"])
def test_banding_raises_its_band_and_the_figure_with_contrast(rows):
    _, clean = _clean_panel()
    patterns = [banding(SIZE, 8, contrast, rows) for contrast in (0.5, 1.0, 2.0, 4.0)]
    # Period 8 px: level 3, in the banding's orientation.
    assert _own_band(patterns[-1]) == (2, HORIZONTAL if rows else VERTICAL)
    _assert_rises_at_its_scale(clean, patterns)


def test_blotchy_mura_raises_its_band_and_the_figure_with_contrast():
    _, clean = _clean_panel()
    field = mura_field(SIZE, sigma=4, spacing=16)
    assert _own_band(1 - 0.08 * field)[0] == 3  # blobs of 4 px sigma: level 4
    _assert_rises_at_its_scale(clean, [1 - c / 100 * field for c in (1.0, 2.0, 4.0, 8.0)])


@pytest.mark.parametrize("defect_type", ["spot_mura", "line_mura", "area_mura", "line_defect"])
def test_the_generators_defects_raise_the_figure_with_their_contrast(defect_type):
    generator, clean = _clean_panel()
    # One draw of the generator's defect (its shape and place), at set contrasts (darker). A
    # whole-panel energy dilutes a local defect by its share of the area: a few percent and up.
    defect = generator.make_defect(
        defect_type, np.random.default_rng(4), np.zeros(generator.size, bool), level=5
    )
    assert defect is not None
    mean_profile = float(defect.profile[defect.mask].mean())
    patterns = []
    for contrast in (4.0, 8.0, 16.0, 32.0):
        scaled = dataclasses.replace(defect, amplitude=-contrast / 100 / mean_profile)
        panel, _, _, truth = generator.apply(np.ones(generator.size, np.float32), [scaled])
        assert truth[0]["contrast_pct"] == pytest.approx(-contrast, rel=1e-4)
        patterns.append(panel)
    _assert_rises_at_its_scale(clean, patterns)


def test_the_figure_does_not_change_with_a_global_gain():
    _, clean = _clean_panel()
    banded = clean.astype(np.float64) * banding(128, 16, 2.0)
    for gain in (0.5, 0.8, 2.0):
        assert np.allclose(wavelet_bands(gain * banded), wavelet_bands(banded), rtol=1e-9)
        assert wavelet_uniformity(gain * banded) == pytest.approx(
            wavelet_uniformity(banded), rel=1e-9
        )


def test_float_and_integer_images_of_the_same_panel_agree():
    _, clean = _clean_panel()
    banded = np.clip(clean * banding(128, 16, 2.0), 0, 1)
    as_uint16 = np.round(banded * 65535).astype(np.uint16)
    assert np.allclose(wavelet_bands(as_uint16), wavelet_bands(banded), rtol=1e-3)
    assert wavelet_uniformity(as_uint16) == pytest.approx(wavelet_uniformity(banded), rel=1e-3)
    # The figure is relative: the same 16-bit values read as fractions give the same figure.
    assert wavelet_uniformity(as_uint16 / 65535.0) == pytest.approx(
        wavelet_uniformity(as_uint16), rel=1e-6
    )


def test_a_large_panel_is_measured_on_a_reduced_grid():
    _, clean = _clean_panel(size=256, seed=1)
    reduced_figures = []
    for contrast in (1.0, 2.0, 4.0, 8.0):
        panel = clean * banding(256, 32, contrast)  # period 32 px: level 5
        full = wavelet_bands(panel, levels=5, max_pixels=None)
        # 64 x 64 px at most: reduced 4x, levels 1-2 (periods of 4 px and less) are not
        # measured, and the coarser ones are those of the full resolution (Haar's approximation
        # is the block mean).
        reduced = wavelet_bands(panel, levels=5, max_pixels=64 * 64)
        assert np.isnan(reduced[:2]).all()
        assert np.allclose(reduced[2:], full[2:], rtol=1e-9)
        assert np.nanargmax(reduced) // 3 == 4
        reduced_figures.append(wavelet_uniformity(panel, levels=5, max_pixels=64 * 64))
    assert _strictly_rising(reduced_figures), reduced_figures
    # Reduced 16x, no level of 1-4 is left.
    with pytest.raises(ValueError, match="max_pixels"):
        wavelet_bands(clean, levels=4, max_pixels=16 * 16)


def test_bad_input_is_refused_clearly():
    for shape in [(4, 64, 64), (64, 64, 3), (64,)]:
        with pytest.raises(ValueError, match=r"luminance image \[H, W\]"):
            wavelet_bands(np.full(shape, 0.5))
        with pytest.raises(ValueError, match=r"luminance image \[H, W\]"):
            wavelet_uniformity(np.full(shape, 0.5))
    with pytest.raises(ValueError, match="orthogonal"):
        wavelet_bands(np.full((64, 64), 0.5), wavelet="bior2.2")
    with pytest.raises(ValueError, match="levels"):
        wavelet_bands(np.full((64, 64), 0.5), levels=0)
    with pytest.raises(ValueError, match=r"panel image \[H, W\] or \[H, W, 3\]"):
        panel_quality(np.full((64, 64, 4), 0.5))


def test_images_too_small_or_dark_have_no_figure():
    assert wavelet_uniformity(np.full((1, 1), 0.5)) is None
    assert wavelet_uniformity(np.zeros((64, 64))) is None
    # Two rows: level 1 only.
    thin = wavelet_bands(np.random.default_rng(0).random((2, 300)))
    assert np.isfinite(thin[0]).all() and np.isnan(thin[1:]).all()
    # A panel smaller than 2**levels px keeps the levels it holds.
    small = wavelet_bands(np.random.default_rng(0).random((8, 40)))
    assert np.isfinite(small[:3]).all() and np.isnan(small[3]).all()
    with pytest.raises(ValueError, match="no band"):
        get_metric("wavelet_uniformity").update(torch.zeros(1, 16, 16))


def test_the_registered_metric_gives_the_functions_figure():
    assert QUALITY_METRICS["wavelet_uniformity"] is WaveletUniformityMetric
    assert available_classes["wavelet_uniformity"] is WaveletUniformityMetric
    _, clean = _clean_panel()
    panels = [clean, clean * banding(128, 16, 2.0)]
    metric = get_metric("wavelet_uniformity")
    # [B, C, H, W] images: the channel mean is the luminance.
    metric.update(
        torch.from_numpy(np.stack(panels).astype(np.float32))[:, None].expand(-1, 3, -1, -1)
    )
    expected = np.mean([wavelet_uniformity(p.astype(np.float32)) for p in panels])
    assert metric.compute() == pytest.approx(expected, rel=1e-6)


def test_panel_quality_and_predicts_tables_carry_the_figure(tmp_path):
    _, clean = _clean_panel()
    banded = np.clip(clean * banding(128, 16, 2.0), 0, 1).astype(np.float32)
    figures = panel_quality(banded)
    assert set(figures) == {
        "mura_energy_pct",
        "wavelet_uniformity_pct",
        "delta_e2000_mean",
        "delta_e2000_p99",
    }
    assert figures["wavelet_uniformity_pct"] == pytest.approx(wavelet_uniformity(banded))
    # A grey panel stored as RGB is the same panel; a one-pixel one has no figure.
    as_rgb = panel_quality(np.repeat(banded[..., None], 3, axis=2))
    assert as_rgb["wavelet_uniformity_pct"] == pytest.approx(figures["wavelet_uniformity_pct"])
    assert panel_quality(np.full((1, 1), 120, np.uint8))["wavelet_uniformity_pct"] is None
    assert (
        IMAGE_COLUMNS.index("wavelet_uniformity_pct") == IMAGE_COLUMNS.index("mura_energy_pct") + 1
    )
    entry = {"path": "a.png", "status": "ok", "score": 0.1, "label": 0, "level": 0, **figures}
    write_reports(tmp_path, "hybrid", [entry])
    header, row = (tmp_path / "predictions.csv").read_text().splitlines()
    value = dict(zip(header.split(","), row.split(",")))["wavelet_uniformity_pct"]
    assert float(value) == pytest.approx(figures["wavelet_uniformity_pct"])

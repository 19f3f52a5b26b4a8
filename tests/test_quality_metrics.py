"""Image-quality metrics: CIEDE2000 on the Sharma pairs, PSNR/SSIM/MS-SSIM/LPIPS behaviour,
FFT mura energy and region SEMU against the synthetic generator's truth, a panel's uniformity
figures (``panel_quality``) and a reconstruction's (``reconstruction_quality``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import PanelGenerator
from grading.evaluation import SEMUMetric
from metrics import get_metric
from metrics.quality import (
    LPIPS_BACKBONE_FILES,
    delta_e_2000,
    mura_energy,
    panel_quality,
    psnr,
    reconstruction_figures,
    reconstruction_quality,
    srgb_to_lab,
    ssim_index,
)

SHARMA = Path(__file__).parent / "data" / "ciede2000_sharma.txt"


def test_delta_e_2000_matches_the_34_sharma_pairs():
    rows = np.loadtxt(SHARMA)
    assert rows.shape == (34, 7)
    assert np.abs(delta_e_2000(rows[:, :3], rows[:, 3:6]) - rows[:, 6]).max() < 1e-4
    assert np.abs(delta_e_2000(rows[:, 3:6], rows[:, :3]) - rows[:, 6]).max() < 1e-4


def test_srgb_to_lab_and_the_delta_e_metric():
    assert np.allclose(srgb_to_lab(np.ones(3)), [100, 0, 0], atol=1e-3)
    assert np.allclose(srgb_to_lab(np.zeros(3)), [0, 0, 0], atol=1e-6)
    images = torch.rand(2, 3, 8, 8)
    metric = get_metric("delta_e_2000")
    metric.update(images, images)
    assert metric.compute() == pytest.approx(0.0, abs=1e-9)
    metric.reset()
    metric.update(images, (images + 0.1).clamp(0, 1))
    assert metric.compute() > 1.0


def test_psnr_ssim_and_ms_ssim():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 192, 192, generator=generator) * 0.5 + 0.25
    psnr = get_metric("psnr")
    psnr.update(images + 0.1, images)
    assert psnr.compute() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01
    for name in ("ssim", "ms_ssim"):
        metric = get_metric(name)
        metric.update(images, images)
        assert metric.compute() == pytest.approx(1.0, abs=1e-5)
        metric.reset()
        noisy = (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        metric.update(noisy, images)
        assert metric.compute() < 0.9


def test_lpips_loads_its_backbone_from_the_folder_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match=LPIPS_BACKBONE_FILES["alex"]):
        get_metric("lpips", weights_dir=tmp_path)
    import torchvision

    torch.manual_seed(0)
    torch.save(
        torchvision.models.alexnet(weights=None).state_dict(),
        tmp_path / LPIPS_BACKBONE_FILES["alex"],
    )
    metric = get_metric("lpips", weights_dir=tmp_path)
    images = torch.rand(2, 3, 64, 64)
    metric.update(images, images)
    assert metric.compute() == pytest.approx(0.0, abs=1e-6)
    metric.reset()
    metric.update(images, torch.rand(2, 3, 64, 64))
    assert metric.compute() > 0


def test_mura_energy_rises_with_mura_and_ignores_the_smooth_background():
    generator = PanelGenerator(size=256, seed=1, defect_types=["spot_mura"])
    clean = generator.generate_normal(0)
    defective = generator.generate_defective(0)
    flat, mura = mura_energy(clean["image"]), mura_energy(defective["image"])
    assert mura > 1.5 * flat
    # Background non-uniformity and vignetting are mostly removed.
    assert mura_energy(clean["background"]) < 0.2 * mura
    metric = get_metric("mura_energy")
    metric.update(torch.from_numpy(np.stack([clean["image"], defective["image"]])))
    assert metric.compute() == pytest.approx((flat + mura_energy(defective["image"])) / 2, rel=1e-6)


def test_semu_metric_measures_regions_like_the_generator():
    generator = PanelGenerator(size=256, seed=4, defect_types=["spot_mura"], max_defects=1)
    for index in range(5):
        sample = generator.generate_defective(index)
        truth = sample["defects"][0]
        metric = SEMUMetric(pixel_pitch_mm=generator.pixel_pitch_mm)
        metric.update(
            torch.from_numpy(sample["image"])[None], torch.from_numpy(sample["mask"])[None]
        )
        assert metric.compute() == pytest.approx(truth["semu"], rel=0.25), truth


def _flat_panel(size: int = 128, noise: float = 0.005, seed: int = 0) -> np.ndarray:
    """A uniform grey panel with only pixel noise (``noise``: relative standard deviation)."""
    rng = np.random.default_rng(seed)
    return 0.5 * (1 + noise * rng.standard_normal((size, size)))


def _blotch(size: int, centre: tuple[int, int], sigma: float, amplitude: float) -> np.ndarray:
    """A smooth Gaussian blotch as a relative luminance change ``1 + amplitude * profile``."""
    yy, xx = np.mgrid[:size, :size]
    distance2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    return 1 + amplitude * np.exp(-distance2 / (2 * sigma**2))


def test_panel_quality_gives_a_smooth_blotch_more_mura_energy_than_pixel_noise():
    flat = _flat_panel()
    blotched = flat * _blotch(128, (64, 50), sigma=6, amplitude=0.05)
    flat_energy = panel_quality(flat)["mura_energy_pct"]
    assert panel_quality(blotched)["mura_energy_pct"] > 1.3 * flat_energy
    # A grey panel stored as RGB is the same panel: same figure, and no colour figures.
    as_rgb = panel_quality(np.repeat(flat[..., None], 3, axis=2))
    assert as_rgb["mura_energy_pct"] == pytest.approx(flat_energy, rel=1e-6)
    for figures in (panel_quality(flat), as_rgb):
        assert figures["delta_e2000_mean"] is None and figures["delta_e2000_p99"] is None


def test_panel_quality_colour_uniformity_grows_with_a_colour_blotch(monkeypatch):
    colour = np.array([0.8, 0.5, 0.3])
    uniform = np.broadcast_to(colour, (64, 64, 3)).copy()
    figures = panel_quality(uniform)
    assert figures["delta_e2000_mean"] == pytest.approx(0.0, abs=1e-6)
    assert figures["delta_e2000_p99"] == pytest.approx(0.0, abs=1e-6)
    p99 = []
    for shift in (0.02, 0.05):
        blotched = uniform.copy()
        blotched[16:40, 20:44] += [0.0, shift, -shift]
        figures = panel_quality(blotched)
        assert figures["delta_e2000_p99"] > figures["delta_e2000_mean"] > 0.1
        p99.append(figures["delta_e2000_p99"])
    assert p99[1] > 2 * p99[0] > 1.0, p99
    # Panels over the pixel budget are measured on a random sample of their pixels.
    monkeypatch.setattr("metrics.quality.DELTA_E_MAX_PIXELS", 1024)
    assert panel_quality(blotched)["delta_e2000_mean"] == pytest.approx(
        figures["delta_e2000_mean"], rel=0.15
    )


def test_mura_energy_of_a_large_panel_is_measured_on_a_reduced_grid():
    image = 0.5 * np.ones((512, 512))
    for centre in ((100, 100), (300, 200), (400, 400), (200, 380)):
        image = image * _blotch(512, centre, sigma=8, amplitude=0.05)
    full = mura_energy(image, max_pixels=None)
    # Reduced 4x (8 to 32 px periods left): the smooth blotches keep nearly all their energy.
    assert mura_energy(image, max_pixels=128 * 128) == pytest.approx(full, rel=0.1)
    with pytest.raises(ValueError, match="max_pixels"):
        mura_energy(image, max_pixels=16 * 16)  # reduced 32x: no period of the band is left


def test_reconstruction_quality_reports_lpips_as_unavailable_without_its_backbone(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = 0.4 + 0.2 * torch.rand(2, 1, 64, 64, generator=generator)
    close = (images + 0.01 * torch.randn(images.shape, generator=generator)).expand(-1, 3, -1, -1)
    far = (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    good = reconstruction_quality(
        [(images[:1], close[:1]), (images[1:], close[1:])], weights_dir=tmp_path
    )
    bad = reconstruction_quality([(images, far.expand(-1, 3, -1, -1))], weights_dir=tmp_path)
    assert good["count"] == bad["count"] == 2
    assert good["psnr_db"] > bad["psnr_db"] + 10 and good["ssim"] > bad["ssim"]
    for figures in (good, bad):
        assert figures["lpips"] is None
        assert LPIPS_BACKBONE_FILES["alex"] in figures["lpips_unavailable"]


def test_psnr_ssim_and_ms_ssim_are_named_functions_the_metrics_call():
    generator = torch.Generator().manual_seed(0)
    images = 0.4 + 0.2 * torch.rand(2, 3, 192, 192, generator=generator)
    shifted = images + 0.1  # mean squared error 0.01: 20 dB
    assert psnr(shifted, images).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    noisy = [images + s * torch.randn(images.shape, generator=generator) for s in (0.01, 0.1)]
    for multiscale in (False, True):
        same, close, far = (ssim_index(x, images, multiscale) for x in (images, *noisy))
        assert same.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
        assert (close > far).all() and (far < 0.99).all()
    metric = get_metric("ms_ssim")
    metric.update(noisy[0], images)
    assert metric.compute() == pytest.approx(float(ssim_index(noisy[0], images, True).mean()))
    with pytest.raises(ValueError, match="MS-SSIM needs images of more than 160 px"):
        ssim_index(images[..., :160, :160], images[..., :160, :160], multiscale=True)
    # Per image, MS-SSIM only where the image is large enough for its five scales.
    large = reconstruction_figures(images, noisy[0])
    small = reconstruction_figures(images[..., :64, :64], noisy[0][..., :64, :64])
    assert all(0 < row["ms_ssim"] < 1 and row["lpips"] is None for row in large)
    assert all(row["ms_ssim"] is None and row["psnr_db"] > 30 for row in small)

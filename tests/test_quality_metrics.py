"""Image-quality metrics: CIEDE2000 on the Sharma pairs, PSNR/SSIM/MS-SSIM/LPIPS behaviour,
FFT mura energy and region SEMU against the synthetic generator's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import PanelGenerator
from metrics import get_metric
from metrics.quality import LPIPS_BACKBONE_FILES, delta_e_2000, mura_energy, srgb_to_lab

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
        metric = get_metric("semu", pixel_pitch_mm=generator.pixel_pitch_mm)
        metric.update(
            torch.from_numpy(sample["image"])[None], torch.from_numpy(sample["mask"])[None]
        )
        assert metric.compute() == pytest.approx(truth["semu"], rel=0.25), truth

"""Autoencoder and VAE: training, separation on panels, map standardization, persistence and
mixed precision; and the ``reconstruct_images`` hook they share with DRAEM."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.data import DataLoader

from data.datasets import collate_samples
from data.synthetic import PanelGenerator
from members import FabricTrainer, Member, create_member, load_member
from members.autoencoder import MAP_STD_FLOOR
from members.base import member_class
from metrics.quality import reconstruction_quality
from tests.helpers import fit_member, outputs_equal, panel_loader, separation

# The configs' epochs; about 11 CPU-seconds per member on the 24 training panels at 128 px.
EPOCHS = 12
MEMBERS = ("autoencoder", "vae")


@pytest.fixture(scope="module")
def fitted(panels_dir) -> Callable[[str], tuple[Member, list[dict]]]:
    """``fitted(name)``: the default member fitted once per module, and its history."""
    cache: dict[str, tuple[Member, list[dict]]] = {}

    def get(name: str) -> tuple[Member, list[dict]]:
        if name not in cache:
            member = create_member(name)
            cache[name] = (member, fit_member(member, panels_dir, max_epochs=EPOCHS))
        return cache[name]

    return get


def test_options_are_validated():
    for name, options in (
        ("autoencoder", {"variant": "resnet"}),
        ("autoencoder", {"corruption": "cutpaste"}),
        ("autoencoder", {"map_metric": "l1"}),
        ("vae", {"lr_schedule": "step"}),
        ("vae", {"beta": -1.0}),
    ):
        with pytest.raises(ValueError):
            create_member(name, **options)


@pytest.mark.parametrize("name", MEMBERS)
def test_loss_decreases_under_a_decaying_learning_rate(fitted, name):
    _, history = fitted(name)
    epochs = [row for row in history if row["scope"] == "epoch"]
    assert len(epochs) == EPOCHS
    losses = [row["loss"] for row in epochs]
    assert all(torch.isfinite(torch.tensor(losses)))
    # Measured: about 1.0 (standardized images) down to 0.12-0.15.
    assert losses[-1] < 0.4 * losses[0], losses
    assert epochs[-1]["lr"] < 0.05 * epochs[0]["lr"]


@pytest.mark.parametrize("name", MEMBERS)
def test_member_separates_defective_from_defect_free_panels(fitted, panels_dir, name):
    member, _ = fitted(name)
    image_auroc, pixel_auroc = separation(member, panels_dir)
    # Measured over trainer seeds 0-2: autoencoder 0.92-0.99 / 0.96-0.98, VAE 0.98-1.0 /
    # 0.95-0.98 (before image and map standardization: 0.5-0.7 / 0.3-0.8).
    assert image_auroc >= 0.85, image_auroc
    assert pixel_auroc >= 0.9, pixel_auroc


@pytest.mark.parametrize("name", MEMBERS)
def test_maps_are_z_scores_on_the_images_the_statistics_came_from(fitted, panels_dir, name):
    member, _ = fitted(name)
    loader = panel_loader(panels_dir, "train")
    images = torch.cat([batch["image"] for batch in loader])
    expected = images.mean() if images.shape[1] == 1 else images.mean((0, 2, 3))
    assert torch.allclose(member.image_mean.flatten(), expected.expand(3), atol=1e-5)
    maps = torch.cat([member.predict(batch["image"])["anomaly_map"] for batch in loader])
    assert maps.shape == (len(images), 1, 128, 128)
    assert maps.mean(0).abs().max() < 1e-3
    # Population standard deviation 1 wherever the floor did not raise the denominator.
    unfloored = member.map_std[0] > 1.01 * MAP_STD_FLOOR * member.map_std.mean()
    spread = maps.std(0, correction=0)[unfloored]
    assert torch.allclose(spread, torch.ones_like(spread), atol=1e-3)
    with pytest.raises(ValueError, match="per-pixel map statistics"):
        member.predict(images[:1, :, :96, :96])


@pytest.mark.parametrize("name", MEMBERS)
def test_member_round_trips(fitted, panels_dir, tmp_path, name):
    member, _ = fitted(name)
    loaded = load_member(member.save(tmp_path / name))
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    assert outputs_equal(member, loaded, images)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("autoencoder", {"variant": "unet"}),
        ("autoencoder", {"variant": "unet", "corruption": "perlin"}),
        ("autoencoder", {"variant": "backbone"}),
        ("autoencoder", {"map_metric": "ssim", "ssim_weight": 0.5, "lr_schedule": "constant"}),
        ("autoencoder", {"standardize_map": False}),
        ("vae", {"kl_weight_in_map": 1.0, "map_metric": "ssim"}),
    ],
)
def test_other_options_train_and_give_finite_maps(panels_dir, name, options):
    member = create_member(name, **options)
    history = fit_member(member, panels_dir, max_steps=2)
    steps = [row for row in history if row["scope"] == "step"]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    out = member.predict(images)
    assert out["anomaly_map"].shape == (4, 1, 128, 128)
    assert torch.isfinite(out["anomaly_map"]).all() and torch.isfinite(out["pred_score"]).all()
    assert bool(member.map_mean.numel()) == options.get("standardize_map", True)


@pytest.mark.parametrize("name", MEMBERS)
def test_bf16_mixed_fit_gives_finite_maps(panels_dir, name):
    member = create_member(name)
    fit_member(member, panels_dir, max_steps=2, precision="bf16-mixed")
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    out = member.predict(images)
    assert out["anomaly_map"].dtype == torch.float32
    assert torch.isfinite(out["anomaly_map"]).all() and torch.isfinite(out["pred_score"]).all()


def _panels(first: int, count: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = PanelGenerator(size=size, seed=0)
    images = (generator.generate_normal(i)["image"] for i in range(first, first + count))
    return [{"image": torch.from_numpy(image)[None]} for image in images]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("autoencoder", {"base_width": 4, "depth": 3, "latent_channels": 4}),
        ("vae", {"base_width": 4, "depth": 3, "latent_channels": 4}),
        ("draem", {"base_width": 4, "depth": 3, "disc_width": 4, "disc_depth": 3}),
    ],
)
def test_reconstruct_images_is_closer_for_a_normal_panel_than_for_a_corrupted_one(
    tmp_path, name, options
):
    member = create_member(name, **options)
    loader = DataLoader(_panels(0, 16), batch_size=8, shuffle=True, collate_fn=collate_samples)
    member.fit(loader, None, FabricTrainer(max_epochs=15, progress=False))
    normal = collate_samples(_panels(16, 2))["image"]
    noise = torch.randn(normal.shape, generator=torch.Generator().manual_seed(0))
    corrupted = (normal + 0.3 * noise).clamp(0, 1)
    psnr = {}
    with torch.no_grad():
        for kind, images in (("normal", normal), ("corrupted", corrupted)):
            reconstructions = member.reconstruct_images(images)
            assert reconstructions.shape == (2, 3, 32, 32)
            assert 0 <= float(reconstructions.min()) and float(reconstructions.max()) <= 1
            # No LPIPS backbone in tmp_path: the figure is left out with its reason.
            quality = reconstruction_quality([(images, reconstructions)], weights_dir=tmp_path)
            assert quality["lpips"] is None and "lpips_unavailable" in quality
            psnr[kind] = quality["psnr_db"]
    assert member.reconstructs and psnr["normal"] > psnr["corrupted"] + 10, psnr
    # Members that do not reconstruct their input say so; the benchmark skips them.
    assert not member_class("padim").reconstructs


def test_fit_returns_the_member_with_the_statistics_its_hooks_measured():
    """``fit`` returns the member (its history in ``history_``); ``on_fit_start`` measured the
    image statistics on the training images, ``on_fit_end`` the map statistics on the
    validation images, or on the training images without them."""
    options = {"base_width": 4, "depth": 3, "latent_channels": 4}
    train = DataLoader(_panels(0, 8), batch_size=4, collate_fn=collate_samples)
    val = DataLoader(_panels(8, 4), batch_size=4, collate_fn=collate_samples)
    images = torch.cat([batch["image"] for batch in train])
    for val_loader, measured_on, other in ((None, train, val), (val, val, train)):
        member = create_member("autoencoder", **options)
        assert member.fit(train, val_loader, FabricTrainer(max_steps=2, progress=False)) is member
        assert len([row for row in member.history_ if row["scope"] == "step"]) == 2
        assert not member.training
        assert torch.allclose(member.image_mean.flatten(), images.mean().expand(3), atol=1e-5)
        with torch.no_grad():
            raw = {
                loader: torch.cat([member.raw_map(batch["image"]) for batch in loader])
                for loader in (measured_on, other)
            }
        assert torch.allclose(member.map_mean, raw[measured_on].mean(0, keepdim=True), atol=1e-5)
        assert not torch.allclose(member.map_mean, raw[other].mean(0, keepdim=True), atol=1e-5)

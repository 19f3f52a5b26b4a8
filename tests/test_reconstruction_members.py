"""Autoencoder and VAE (its three architectures): training, separation on panels, map
standardization, persistence and mixed precision; and the ``reconstruct_images`` hook they share
with DRAEM."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
from torch.utils.data import DataLoader

from artifacts.io import write_manifest
from data.datasets import collate_samples
from data.synthetic import PanelGenerator
from members import FabricTrainer, Member, create_member, load_member
from members.autoencoder import MAP_STD_FLOOR
from members.backbones import load_backbone
from members.base import MEMBER_FILE, member_class
from members.member_set import MemberSet
from metrics.quality import reconstruction_quality
from tests.helpers import fit_member, outputs_equal, panel_loader, separation

# The configs' epochs; about 11 CPU-seconds per member on the 24 training panels at 128 px.
EPOCHS = 12
MEMBERS = ("autoencoder", "vae")
# The VAE's other architectures, tiny and trained for fewer epochs (vanilla is "vae").
VAE_ARCHITECTURES = {
    "vae-unet": {"architecture": "unet", "base_width": 4, "latent_channels": 4},
    "vae-backbone": {"architecture": "backbone", "base_width": 4, "latent_channels": 4},
}
SHORT_EPOCHS = 6
CASES = (*MEMBERS, *VAE_ARCHITECTURES)


def create_case(case: str) -> Member:
    """The member of ``case`` (a name of ``CASES``) with its initial weights seeded."""
    torch.manual_seed(0)
    if case in VAE_ARCHITECTURES:
        return create_member("vae", **VAE_ARCHITECTURES[case])
    return create_member(case)


@pytest.fixture(scope="module")
def fitted(panels_dir) -> Callable[[str], tuple[Member, list[dict]]]:
    """``fitted(case)``: the member of ``case`` fitted once per module, and its history. Its
    initial weights are seeded: drawn from whatever state earlier tests in the same process left,
    they gave the autoencoder an image AUROC of 0.82 once."""
    cache: dict[str, tuple[Member, list[dict]]] = {}

    def get(case: str) -> tuple[Member, list[dict]]:
        if case not in cache:
            member = create_case(case)
            epochs = SHORT_EPOCHS if case in VAE_ARCHITECTURES else EPOCHS
            cache[case] = (member, fit_member(member, panels_dir, max_epochs=epochs))
        return cache[case]

    return get


def test_options_are_validated():
    for name, options in (
        ("autoencoder", {"variant": "resnet"}),
        ("autoencoder", {"corruption": "cutpaste"}),
        ("autoencoder", {"map_metric": "l1"}),
        ("vae", {"lr_schedule": "step"}),
        ("vae", {"beta": -1.0}),
        ("vae", {"architecture": "ladder"}),
    ):
        with pytest.raises(ValueError, match=next(iter(options))):
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


@pytest.mark.parametrize("name", CASES)
def test_member_separates_defective_from_defect_free_panels(fitted, panels_dir, name):
    member, _ = fitted(name)
    image_auroc, pixel_auroc = separation(member, panels_dir)
    # Measured with the initial weights seeded 0-2, one thread (2026-12-07): autoencoder
    # 0.93-1.0 / 0.963-0.974, VAE 1.0 / 0.951-0.959 (before image and map standardization:
    # 0.5-0.7 / 0.3-0.8); two threads: the tiny VAEs after 6 epochs, unet 0.92-0.95 /
    # 0.968-0.975, backbone 0.91-0.92 / 0.969-0.971.
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


@pytest.mark.parametrize("name", CASES)
def test_member_round_trips(fitted, panels_dir, tmp_path, name):
    member, _ = fitted(name)
    loaded = load_member(member.save(tmp_path / name))
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    assert outputs_equal(member, loaded, images)
    assert getattr(loaded, "architecture", None) == getattr(member, "architecture", None)


def test_a_vae_saved_before_its_architectures_loads_as_vanilla(fitted, panels_dir, tmp_path):
    member, _ = fitted("vae")
    folder = member.save(tmp_path / "vae")
    meta = json.loads((folder / MEMBER_FILE).read_text())
    for key in ("architecture", "backbone", "layers", "pretrained", "weights_dir"):
        del meta["config"][key]
    (folder / MEMBER_FILE).write_text(json.dumps(meta))
    write_manifest(folder)
    loaded = load_member(folder)
    assert loaded.architecture == "vanilla"
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    assert outputs_equal(member, loaded, images)


def fit_briefly(panels_dir, member: Member, **trainer_options) -> tuple[list[dict], torch.Tensor]:
    """Train ``member`` for a few steps (two unless ``trainer_options`` say otherwise); its
    history and four test images. Checks that losses, maps and scores are finite."""
    trainer_options.setdefault("max_steps", 2)
    history = fit_member(member, panels_dir, **trainer_options)
    steps = [row for row in history if row["scope"] == "step"]
    assert steps and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    out = member.predict(images)
    assert out["anomaly_map"].shape == (4, 1, 128, 128)
    assert torch.isfinite(out["anomaly_map"]).all() and torch.isfinite(out["pred_score"]).all()
    return history, images


def test_unet_skip_connections_carry_the_input_past_the_bottleneck(panels_dir):
    torch.manual_seed(0)
    unet = create_member("autoencoder", variant="unet")
    _, images = fit_briefly(panels_dir, unet)
    vanilla = create_member("autoencoder").eval()
    other = images.flip(-1)  # other content, same statistics
    for member, skips in ((unet, True), (vanilla, False)):
        # Silence the bottleneck: only skip connections can still carry the input through.
        handle = member.bottleneck.register_forward_hook(lambda *args: torch.zeros_like(args[2]))
        try:
            with torch.no_grad():
                difference = (member.reconstruct(images) - member.reconstruct(other)).abs()
        finally:
            handle.remove()
        assert member.decoder.skip_connections is skips
        if skips:
            # Measured 0.006-0.02 (standardized units) after two steps; exactly 0 without skips.
            assert float(difference.mean()) > 1e-4, float(difference.mean())
        else:
            assert float(difference.max()) == 0.0


def test_perlin_corruption_trains_on_corrupted_inputs_against_clean_targets(
    panels_dir, monkeypatch
):
    import members.autoencoder

    member = create_member("autoencoder", variant="unet", corruption="perlin")
    fit_briefly(panels_dir, member)
    clean = next(iter(panel_loader(panels_dir, "train")))["image"].expand(-1, 3, -1, -1)
    synthesized, seen = [], []
    real_synthesize = members.autoencoder.synthesize_anomalies

    def recording_synthesize(*args, **kwargs):
        synthesized.append(real_synthesize(*args, **kwargs))
        return synthesized[-1]

    def recording(member: Member) -> Callable:
        def reconstruct(inputs, features=None):
            seen.append((inputs, type(member).reconstruct(member, inputs, features)))
            return seen[-1][1]

        return reconstruct

    monkeypatch.setattr(members.autoencoder, "synthesize_anomalies", recording_synthesize)
    monkeypatch.setattr(member, "reconstruct", recording(member))
    member.train()
    torch.manual_seed(0)
    out = member.training_step({"image": clean})
    (corrupted, masks), ((inputs, reconstruction),) = synthesized[0], seen
    # The network saw the corrupted batch: changed inside the Perlin masks, nowhere else.
    assert len(synthesized) == 1 and inputs is corrupted
    assert float(masks.sum()) > 0 and not torch.equal(inputs, clean)
    assert torch.equal(inputs * (1 - masks), clean * (1 - masks))
    # ... and was scored against the clean batch: it learns to restore normal appearance.
    expected = torch.nn.functional.mse_loss(reconstruction.detach(), member.standardize(clean))
    assert float(out["mse"]) == pytest.approx(float(expected), rel=1e-6)
    # Without corruption the network reads the clean batch itself.
    plain = create_member("autoencoder", variant="unet").train()
    monkeypatch.setattr(plain, "reconstruct", recording(plain))
    synthesized.clear()
    seen.clear()
    plain.training_step({"image": clean})
    assert synthesized == [] and torch.equal(seen[0][0], clean)


def test_ssim_map_loss_and_constant_learning_rate(panels_dir):
    options = {"map_metric": "ssim", "ssim_weight": 0.5, "lr_schedule": "constant"}
    member = create_member("autoencoder", **options)
    history, _ = fit_briefly(panels_dir, member, max_epochs=1, max_steps=None)
    # Constant: the epoch ends at the starting rate (the cosine schedule ends it near zero).
    (epoch,) = [row for row in history if row["scope"] == "epoch"]
    assert epoch["lr"] == pytest.approx(member.lr)
    # The loss adds the weighted 1 - SSIM term to the MSE.
    for row in (row for row in history if row["scope"] == "step"):
        assert row["loss"] == pytest.approx(row["mse"] + 0.5 * row["ssim_loss"], rel=1e-5)
    # Defect-free test panels: a strong defect fills both maps, and there any two error
    # measures agree; the panel around it is where they differ.
    test = panel_loader(panels_dir, "test").dataset
    images = torch.stack([sample["image"] for sample in test if sample["label"] == 0][:4])
    with torch.no_grad():
        ssim_error = member.raw_map(images)
        member.map_metric = "l2"
        l2_error = member.raw_map(images)
        member.map_metric = "ssim"
    # 1 - SSIM lies in [0, 2]; it is another measure than the squared error, not a rescaling.
    assert 0 <= float(ssim_error.min()) and float(ssim_error.max()) <= 2
    correlation = torch.corrcoef(torch.stack((ssim_error.flatten(), l2_error.flatten())))[0, 1]
    # Measured: correlation 0.59 after one epoch (0.95 on the first four defective panels).
    assert float(correlation) < 0.9, float(correlation)


def test_unstandardized_maps_are_the_raw_reconstruction_error(panels_dir):
    member = create_member("autoencoder", standardize_map=False)
    fit_briefly(panels_dir, member)
    assert member.map_mean.numel() == 0  # nothing measured
    train = torch.cat([batch["image"] for batch in panel_loader(panels_dir, "train")])
    maps = member.predict(train)["anomaly_map"]
    with torch.no_grad():
        assert torch.equal(maps, member.raw_map(train))
    # Smoothed squared errors: never negative, and not z-scores on the training images.
    assert float(maps.min()) >= 0
    # Measured: per-pixel means about 1.0 (two steps: the error is of the images' own spread).
    assert float(maps.mean(0).abs().mean()) > 0.3, float(maps.mean(0).abs().mean())
    # The same model standardized on those images: per-pixel mean 0 there.
    member.standardize_map = True
    member.measure_map_statistics(FabricTrainer(progress=False), panel_loader(panels_dir, "train"))
    standardized = member.predict(train)["anomaly_map"]
    assert float(standardized.mean(0).abs().max()) < 1e-3


def test_vae_kl_map_term_adds_the_latent_divergence(panels_dir):
    member = create_member("vae", kl_weight_in_map=1.0, map_metric="ssim")
    _, images = fit_briefly(panels_dir, member)
    with torch.no_grad():
        with_kl = member.raw_map(images)
        member.kl_weight_in_map = 0.0
        without_kl = member.raw_map(images)
        member.kl_weight_in_map = 1.0
    # KL divergences are non-negative: the term only adds, and adds something.
    added = with_kl - without_kl
    # Measured: 0.034 on average after two steps (the 1 - SSIM map itself: 0.006).
    assert float(added.min()) >= -1e-6 and float(added.mean()) > 1e-3, float(added.mean())
    assert 0 <= float(without_kl.min()) and float(without_kl.max()) <= 2  # 1 - SSIM


def test_backbone_variant_trains_its_decoder_on_a_frozen_encoder(panels_dir):
    member = create_member("autoencoder", variant="backbone")
    before = {key: value.clone() for key, value in member.state_dict().items()}
    fit_briefly(panels_dir, member)
    after = member.state_dict()
    assert member.encoder is None
    frozen = [key for key in before if key.startswith("feature_extractor.")]
    assert frozen and all(torch.equal(after[key], before[key]) for key in frozen)
    trained = [key for key in before if key.startswith(("bottleneck.", "decoder."))]
    assert any(not torch.equal(after[key], before[key]) for key in trained)


def test_unet_vae_passes_every_skip_through_its_own_gaussian_latent(fitted, panels_dir):
    """The unet VAE's skips carry samples of per-level latents, never the encoder's maps: the
    training KL sums every level's, the decoder reads each level's sample in training, and
    inference decodes the posterior means."""
    # Training steps below move batch-norm statistics: a copy keeps the fixture's member intact.
    member = copy.deepcopy(fitted("vae-unet")[0]).train()
    images = next(iter(panel_loader(panels_dir, "train")))["image"]
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        posteriors = member.encode(images)
        # The coarsest latent, then one per skipped level, finest first (depth 4, 128 px).
        assert [tuple(mean.shape[-2:]) for mean, _ in posteriors] == [
            (16, 16),
            (128, 128),
            (64, 64),
            (32, 32),
        ]
        levels = [float(member.kl_map(*posterior).sum()) / len(images) for posterior in posteriors]
        total = float(member.training_step({"image": images})["kl"])
        assert total == pytest.approx(sum(levels), rel=1e-4)
        # A skip level's posterior set to the prior (mean 0, log-variance 0) drops its term.
        for level, head in enumerate(member.skip_posteriors, start=1):
            handle = head.register_forward_hook(lambda *args: torch.zeros_like(args[2]))
            try:
                kl = float(member.training_step({"image": images})["kl"])
            finally:
                handle.remove()
            # Measured after 6 epochs: 210-6600 nats per image (finest level most).
            assert levels[level] > 1.0, levels
            assert kl == pytest.approx(total - levels[level], rel=1e-4)
        # The reconstruction changes with each skip level's sample alone.
        means = [mean for mean, _ in posteriors]
        decoded = member.decode(means, size)
        for level in range(1, len(posteriors)):
            mean, log_var = posteriors[level]
            sample = mean + torch.randn(mean.shape) * (0.5 * log_var).exp()
            change = member.decode([*means[:level], sample, *means[level + 1 :]], size) - decoded
            # Measured: 0.03-0.07 standardized units.
            assert float(change.abs().mean()) > 1e-3, (level, float(change.abs().mean()))
    # Inference decodes the means: the same answer whatever the random state.
    member.eval()
    answers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        answers.append(member.predict(images[:4])["anomaly_map"])
    assert torch.equal(*answers)


def test_backbone_vae_trains_on_a_frozen_encoder_and_reads_shared_features(fitted, panels_dir):
    member, _ = fitted("vae-backbone")
    initial = create_case("vae-backbone").state_dict()  # the fitted member's seeded start
    after = member.state_dict()
    assert member.encoder is None
    assert not any(p.requires_grad for p in member.feature_extractor.parameters())
    frozen = [key for key in initial if key.startswith("feature_extractor.")]
    assert frozen and all(torch.equal(after[key], initial[key]) for key in frozen)
    trained = [key for key in initial if key.endswith("weight") and key not in frozen]
    assert trained and all(not torch.equal(after[key], initial[key]) for key in trained)
    # A hybrid's shared backbone pass gives the member's own answer, and is what it reads.
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    extractor = member.feature_extractor
    with torch.no_grad():
        shared = dict(zip(extractor.layers, extractor(images)))
        other = dict(zip(extractor.layers, extractor(images.flip(-1))))
    own = member.predict(images)
    assert torch.equal(member.predict(images, shared)["anomaly_map"], own["anomaly_map"])
    assert not torch.allclose(member.predict(images, other)["anomaly_map"], own["anomaly_map"])
    hybrid = MemberSet({"vae": member, "twin": copy.deepcopy(member)})
    assert len(hybrid.group_keys) == 1  # one backbone pass for both
    scores = hybrid.predict(images)["pred_score"]
    assert torch.allclose(scores, own["pred_score"][:, None].expand(-1, 2), atol=1e-5)
    # Loaded with pretrained weights, as the member's frozen encoder was.
    reference = load_backbone(extractor.name, extractor.layers, pretrained=True)
    assert extractor.weights_key() == reference.weights_key()


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

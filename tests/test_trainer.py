"""The shared Fabric loop: exact resume, accumulation, precision, history; the member protocol."""

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from artifacts.io import ArtifactError
from members.base import (
    SCORE_AGGREGATIONS,
    Member,
    ScoreAggregator,
    aggregate_scores,
    load_member,
)
from members.trainer import FabricTrainer, ShardedEpochSampler


class Noisy(Dataset):
    def __init__(self, n: int = 20, size: int = 8) -> None:
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0, "path": f"img{i}"}


class TinyDenoiser(Member):
    """Uses dropout and input noise, so exact resume needs the random states restored."""

    trainable = True

    def __init__(self, width: int = 4, lr: float = 1e-2, **common) -> None:
        super().__init__(**common)
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.Dropout(0.2), nn.Conv2d(width, 3, 3, padding=1)
        )

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "scheduler": scheduler, "interval": "epoch"}

    def training_step(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return ((self.net(x + 0.1 * torch.randn_like(x)) - x) ** 2).mean()

    def compute_anomaly_map(self, images, features=None):
        return ((self.net(images) - images) ** 2).mean(1, keepdim=True)


def train(out_dir, epochs, resume=False, **kwargs):
    torch.manual_seed(123)
    member = TinyDenoiser()
    trainer = FabricTrainer(
        max_epochs=epochs, out_dir=out_dir, resume=resume, progress=False, **kwargs
    )
    loader = DataLoader(Noisy(), batch_size=3, shuffle=True)
    member.fit(loader, DataLoader(Noisy(6), batch_size=3), trainer=trainer)
    return member, trainer


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_two_epochs_equal_one_epoch_then_resume(tmp_path):
    straight, _ = train(tmp_path / "a", 2, accumulate_grad_batches=2)
    train(tmp_path / "b", 1, accumulate_grad_batches=2)
    resumed, trainer = train(tmp_path / "b", 2, resume=True, accumulate_grad_batches=2)
    assert same_weights(straight, resumed)
    assert [r["scope"] for r in trainer.history].count("epoch") == 2


def test_resume_inside_an_epoch_is_exact(tmp_path):
    straight, _ = train(tmp_path / "a", 2, accumulate_grad_batches=2)
    # Stop after 3 optimizer steps (mid-epoch), with a checkpoint every step.
    train(tmp_path / "b", 2, max_steps=3, checkpoint_every_n_steps=1, accumulate_grad_batches=2)
    resumed, _ = train(tmp_path / "b", 2, resume=True, accumulate_grad_batches=2)
    assert same_weights(straight, resumed)


def test_resume_from_a_missing_explicit_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(None, 1, resume=tmp_path / "nope.ckpt")


def test_accumulation_steps_the_optimizer_once_per_group(tmp_path):
    _, trainer = train(tmp_path, 1, accumulate_grad_batches=3)
    steps = [r for r in trainer.history if r["scope"] == "step"]
    assert len(steps) == 3  # 7 batches -> groups of 3, 3, 1
    _, trainer = train(tmp_path / "x", 1, accumulate_grad_batches=1)
    assert len([r for r in trainer.history if r["scope"] == "step"]) == 7


def test_training_lowers_the_loss_and_writes_history(tmp_path):
    _, trainer = train(tmp_path, 3)
    epochs = [r for r in trainer.history if r["scope"] == "epoch"]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert "val_loss" in epochs[0]
    assert [r["lr"] for r in epochs] == pytest.approx([0.005, 0.0025, 0.00125])
    with open(tmp_path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(trainer.history)
    assert {"scope", "epoch", "step", "loss", "lr", "val_loss"} <= set(rows[0])


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_precision_runs_on_cpu(tmp_path, precision):
    member, trainer = train(tmp_path, 1, precision=precision)
    assert all(torch.isfinite(p).all() for p in member.parameters())


def test_max_steps_stops_early(tmp_path):
    _, trainer = train(tmp_path, 5, max_steps=4)
    assert max(r["step"] for r in trainer.history) == 4


def test_bad_trainer_settings_are_errors():
    with pytest.raises(ValueError, match="precision"):
        FabricTrainer(precision="8-bit")
    with pytest.raises(ValueError, match="max_epochs"):
        FabricTrainer(max_epochs=0)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        FabricTrainer(accumulate_grad_batches=0)


def test_sharded_sampler_covers_every_sample_once_without_padding():
    shards = [list(ShardedEpochSampler(11, True, 0, rank, 3, pad=False)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    padded = [list(ShardedEpochSampler(11, True, 0, rank, 3, pad=True)) for rank in range(3)]
    assert {len(s) for s in padded} == {4}
    first, second = ShardedEpochSampler(11, True, 0), ShardedEpochSampler(11, True, 0)
    second.set_epoch(1)
    assert list(first) != list(second) and sorted(first) == sorted(second)


def test_gather_returns_dataset_order():
    trainer = FabricTrainer(progress=False)
    loader = DataLoader(Noisy(7), batch_size=2)
    out = trainer.gather(lambda batch: batch["image"].mean((1, 2, 3)), loader)
    assert torch.allclose(out, Noisy(7).images.mean((1, 2, 3)))


@pytest.fixture
def registered_toy():
    """Register the toy member for the factory, and only for this test."""
    from members import base

    base.register("_tiny_denoiser")(TinyDenoiser)
    yield
    base._REGISTRY.pop("_tiny_denoiser")
    TinyDenoiser.member_name = "member"


def test_fitted_member_round_trips_through_a_folder(tmp_path, registered_toy):
    member, _ = train(None, 1)
    images = torch.rand(2, 3, 8, 8)
    before = member.predict(images)
    folder = member.save(tmp_path / "member")
    loaded = load_member(folder)
    after = loaded.predict(images)
    # A tampered weights file is refused.
    (folder / "weights.pt").write_bytes((folder / "weights.pt").read_bytes() + b"x")
    with pytest.raises(ArtifactError, match="weights.pt"):
        load_member(folder)
    assert loaded.hparams == {
        "width": 4,
        "lr": 1e-2,
        "score_aggregation": "max",
        "topk_percent": 1.0,
        "center_sigma": 0.25,
    }
    assert torch.equal(before["pred_score"], after["pred_score"])
    assert torch.equal(before["anomaly_map"], after["anomaly_map"])


def test_unfitted_member_refuses_to_predict_or_save(tmp_path):
    member = TinyDenoiser()
    with pytest.raises(RuntimeError, match="not fitted"):
        member.predict(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        member.save(tmp_path / "m")


def test_score_aggregations():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0, 0] = 10.0  # a hot corner pixel
    maps[1, 0, 4:6, 4:6] = 1.0  # a small central defect
    assert aggregate_scores(maps, "max").tolist() == [10.0, 1.0]
    assert aggregate_scores(maps, "mean").tolist() == pytest.approx([0.1, 0.04])
    assert aggregate_scores(maps, "topk", topk_percent=4).tolist() == pytest.approx([2.5, 1.0])
    center = aggregate_scores(maps, "center", center_sigma=0.2)
    assert center[1] > center[0]  # the central defect outweighs the corner pixel
    with pytest.raises(ValueError, match="unknown score aggregation"):
        aggregate_scores(maps, "median")
    with pytest.raises(ValueError, match="score_aggregation"):
        TinyDenoiser(score_aggregation="median")


@pytest.mark.parametrize("method", SCORE_AGGREGATIONS)
def test_a_map_scored_band_by_band_scores_as_the_whole_map(method):
    """A panel's map on disk is scored a band of rows at a time: the same score as the whole
    map's (exactly for max and topk, to float32 rounding for the sums), however it is cut."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 1, 97, 61, generator=generator) ** 4  # a few bright pixels
    maps[1, 0, 40:44, 20:50] += 3.0  # a line, across a band's edge
    options = {"topk_percent": 0.5, "center_sigma": 0.2}
    whole = aggregate_scores(maps, method, **options)
    for cuts in ([97], [10, 30, 57], [1] * 97):
        aggregator = ScoreAggregator(97, 61, method, **options)
        top = 0
        for rows in cuts:
            aggregator.update(maps[..., top : top + rows, :])
            top += rows
        torch.testing.assert_close(aggregator.result(), whole, rtol=1e-6, atol=0)
        if method in ("max", "topk"):
            assert torch.equal(aggregator.result(), whole)
    with pytest.raises(ValueError, match="of the map's 97 rows"):
        ScoreAggregator(97, 61, method).update(maps[..., :50, :]).result()
    assert TinyDenoiser(score_aggregation=method).score_aggregator(97, 61).method == method

    class OwnScore(TinyDenoiser):  # a score of its own, not the shared aggregation
        def compute_anomaly_score(self, anomaly_map):
            return anomaly_map.flatten(1).median(dim=1).values

    assert OwnScore().score_aggregator(97, 61) is None  # scored on the whole map

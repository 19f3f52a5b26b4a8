"""A supervised member: a segmentation and decision head on the frozen backbone's features,
trained on labeled defects with mixed supervision (Božič, Tabernik and Skočaj, "Mixed
supervision for surface-defect detection: from weakly to fully supervised learning",
Computers in Industry 2021).

The unsupervised members learn what normal looks like; this one learns what a defect looks
like, from the defects a plant has labeled (masks where it has them, image labels where it
has not), defect-free images and injected synthetic defects. It reads the same frozen
backbone features as PatchCore and PaDiM (``shared_backbone_key``), so in a hybrid the
backbone still runs once per batch; only the head is trained.

- Segmentation sub-network: each chosen layer, standardized with the training features'
  per-channel statistics, goes through a 1x1 convolution to ``hidden`` channels at its own
  resolution; these are upsampled to the first layer's resolution and summed (the same as one
  1x1 convolution of the upsampled, concatenated layers, at a fraction of the cost), then two
  3x3 convolutions (the second dilated) and a 1x1 convolution to one logit per position. The
  anomaly map is that logit, upsampled to the input.
- Decision sub-network: a 3x3 convolution on the segmentation features and logit at half
  their resolution, then global average and max pooling of it and of the logit, and a linear
  layer: the image score is its logit.
- Losses, as the paper: a segmentation loss (binary cross-entropy over positions, defective
  and normal positions weighing half each) on images whose mask is known (every defect-free
  and injected image, labeled defects with a mask), and a decision loss (binary
  cross-entropy, the two classes weighing half each) on every image. Dynamic balancing: the
  segmentation loss weighs ``1 - t`` and the decision loss ``t``, ``t`` rising from 0 to 1
  over training. Gradient-flow adjustment: the decision loss does not reach the
  segmentation sub-network, so images with image labels only train the decision head.

Training normally runs on cached features (``FeatureSamples``, one backbone pass per image),
through the shared Fabric loop like any trainable member: ``train_head`` builds the member,
its loader and its trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from members.base import BackboneMember, register, upsample_map

log = logging.getLogger(__name__)


@register("supervised")
class SupervisedHead(BackboneMember):
    trainable = True
    default_layers = (2, 3)
    # The image score is the decision head's, not an aggregation of the map: under tiling,
    # the largest tile score.
    score_from_tiles = "max"

    def __init__(
        self,
        hidden: int = 16,
        decision_channels: int = 16,
        lr: float = 0.002,
        weight_decay: float = 0.0001,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if hidden < 1 or decision_channels < 1:
            raise ValueError(
                f"hidden and decision_channels must be >= 1, got {hidden}, {decision_channels}"
            )
        channels = self.feature_extractor.channels
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("feature_mean", torch.zeros(sum(channels)))
        self.register_buffer("feature_std", torch.ones(sum(channels)))
        # Training progress (batches done, of the planned total) for the dynamic balancing of
        # the two losses; buffers, so a resumed run continues the schedule.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_planned", torch.ones((), dtype=torch.long))
        self.register_buffer("class_weights", torch.full((2,), 0.5))
        self.projections = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in channels)
        self.segmentation = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
        )
        self.segmentation_logit = nn.Conv2d(hidden, 1, 1)
        self.decision = nn.Sequential(
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(hidden + 1, decision_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.decision_logit = nn.Linear(2 * decision_channels + 2, 1)

    # --- the head ---------------------------------------------------------------------------

    def layer_features(
        self, images: torch.Tensor | None, features: Mapping[int, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The chosen layers' feature maps, each at its own resolution (float32)."""
        return [m.float() for m in self.backbone_features(images, features)]

    def head(self, layers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits ``[B, 1, h, w]`` (at the first layer's resolution) and decision
        logits ``[B]`` of the layers' feature maps."""
        size = layers[0].shape[-2:]
        projected = None
        start = 0
        for layer, projection in zip(layers, self.projections):
            stop = start + layer.shape[1]
            mean = self.feature_mean[start:stop, None, None]
            std = self.feature_std[start:stop, None, None]
            part = projection((layer - mean) / std)
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="bilinear")
            projected = part if projected is None else projected + part
            start = stop
        hidden = self.segmentation(projected)
        segmentation = self.segmentation_logit(hidden)
        # Gradient-flow adjustment: the decision loss trains the decision head alone.
        decision_input = torch.cat([hidden.detach(), segmentation.detach()], dim=1)
        decided = self.decision(decision_input)
        pooled = torch.cat(
            [
                decided.mean(dim=(2, 3)),
                decided.amax(dim=(2, 3)),
                segmentation.detach().mean(dim=(2, 3)),
                segmentation.detach().amax(dim=(2, 3)),
            ],
            dim=1,
        )
        return segmentation, self.decision_logit(pooled)[:, 0]

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        segmentation, _ = self.head(self.layer_features(images, features))
        return upsample_map(segmentation, tuple(images.shape[-2:]))

    def forward(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        segmentation, decision = self.head(self.layer_features(images, features))
        return {
            "pred_score": decision,
            "anomaly_map": upsample_map(segmentation, tuple(images.shape[-2:])),
        }

    # --- training ---------------------------------------------------------------------------

    def on_fit_start(self, trainer, train_loader: Iterable) -> None:
        """Per-channel feature statistics and class weights from the training samples, and the
        planned number of optimizer steps (for the losses' balancing)."""
        dataset = getattr(train_loader, "dataset", None)
        if not isinstance(dataset, FeatureSamples):
            raise TypeError(
                "the supervised member trains on FeatureSamples (cached backbone features with "
                "masks and labels); build them with cache_features and train with train_head"
            )
        labels = np.array([s["label"] for s in dataset.samples])
        if len(set(labels.tolist())) < 2:
            raise ValueError(
                "the supervised member needs defective and defect-free training images, got "
                f"{int(labels.sum())} defective of {len(labels)}"
            )
        means, stds = [], []
        for k in range(len(self.projections)):
            values = torch.cat([s["features"][k].flatten(1) for s in dataset.samples], dim=1)
            means.append(values.mean(1))
            stds.append(values.std(1).clamp_min(1e-6))
        self.feature_mean = torch.cat(means).float().to(self.feature_mean.device)
        self.feature_std = torch.cat(stds).float().to(self.feature_std.device)
        counts = np.bincount(labels, minlength=2)
        self.class_weights = torch.tensor(
            len(labels) / (2.0 * counts), dtype=torch.float32, device=self.class_weights.device
        )
        # In this rank's batches, as training_step counts them (an optimizer step may take
        # several; under DDP each rank sees its share of the samples).
        per_rank = -(-len(dataset) // trainer.fabric.world_size)
        batches = trainer.max_epochs * -(-per_rank // (train_loader.batch_size or 1))
        if trainer.max_steps is not None:
            batches = min(batches, trainer.max_steps * trainer.accumulate_grad_batches)
        self.steps_planned.fill_(max(batches, 1))
        self.steps_done.zero_()

    def configure_optimizers(self) -> dict[str, Any]:
        trained = [p for name, p in self.named_parameters() if "feature_extractor" not in name]
        optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None}

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        segmentation, decision = self.head(batch["features"])
        labels = batch["label"].float()
        target = batch["mask"].float()
        if target.shape[-2:] != segmentation.shape[-2:]:
            target = F.adaptive_max_pool2d(target, segmentation.shape[-2:])
        known = batch["has_mask"].bool()
        per_position = F.binary_cross_entropy_with_logits(segmentation, target, reduction="none")
        segmentation_loss = segmentation.sum() * 0.0
        if known.any():
            losses, truth = per_position[known], target[known] > 0.5
            parts = [losses[truth].mean()] if truth.any() else []
            parts += [losses[~truth].mean()] if (~truth).any() else []
            segmentation_loss = torch.stack(parts).mean()
        weights = self.class_weights[batch["label"].long()]
        decision_loss = (
            F.binary_cross_entropy_with_logits(decision, labels, reduction="none") * weights
        ).sum() / weights.sum()
        # Dynamic balancing: segmentation first, the decision once the features are learned.
        progress = (self.steps_done.float() / self.steps_planned.float()).clamp(0, 1)
        self.steps_done += 1
        loss = (1 - progress) * segmentation_loss + progress * decision_loss
        return {
            "loss": loss,
            "segmentation_loss": segmentation_loss.detach(),
            "decision_loss": decision_loss.detach(),
        }


class FeatureSamples(Dataset):
    """Training samples of the supervised member with their backbone features cached:
    ``features`` (each layer's ``[C, h, w]``, ``SupervisedHead.layer_features``), ``mask``
    ``[1, h, w]`` (at the first layer's resolution: the defect mask max-pooled to it; zeros
    where unknown),
    ``has_mask``, ``label`` and ``input_size`` (the image's size as the member took it)."""

    def __init__(self, samples: Sequence[dict[str, Any]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


@torch.no_grad()
def cache_features(
    member: SupervisedHead,
    inputs: Iterable[tuple[torch.Tensor, np.ndarray | torch.Tensor | None, int]],
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """``FeatureSamples`` entries of ``(image [1, 3, H, W] at the member's input size, mask
    [H', W'] at any size or None (unknown), label)`` triples; one backbone pass per image,
    ``batch_size`` images of one size at a time."""
    device = next(member.parameters()).device
    member.eval()
    out: list[dict[str, Any]] = []
    pending: list[tuple[torch.Tensor, Any, int]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.cat([p[0] for p in pending]).to(device)
        image_size = tuple(batch.shape[-2:])
        layers = [layer.cpu() for layer in member.layer_features(batch)]
        for row, (_, mask, label) in enumerate(pending):
            features = [layer[row].contiguous() for layer in layers]
            size = features[0].shape[-2:]
            known = mask is not None
            target = torch.zeros((1, *size))
            if known:
                full = torch.as_tensor(np.asarray(mask, dtype=np.float32)).reshape(
                    1, 1, *np.asarray(mask).shape[-2:]
                )
                target = F.adaptive_max_pool2d(full, size)[0]
            out.append(
                {
                    "features": features,
                    "mask": target,
                    "has_mask": known,
                    "label": int(label),
                    "input_size": image_size,
                }
            )
        pending.clear()

    for image, mask, label in inputs:
        if pending and tuple(pending[0][0].shape) != tuple(image.shape):
            flush()
        pending.append((image, mask, label))
        if len(pending) >= batch_size:
            flush()
    flush()
    return out


def head_like(template: SupervisedHead) -> SupervisedHead:
    """An untrained head with ``template``'s options that reads ``template``'s frozen backbone
    (the same module: one copy of its weights, however many heads)."""
    head = SupervisedHead(**{**template.hparams, "pretrained": False})
    head.hparams["pretrained"] = template.hparams.get("pretrained", True)
    head.feature_extractor = template.feature_extractor
    return head.to(next(template.parameters()).device)


def train_head(
    template: SupervisedHead,
    samples: Sequence[dict[str, Any]],
    trainer: Any,
    batch_size: int = 16,
    seed: int = 0,
) -> SupervisedHead:
    """A head like ``template`` (``head_like``), its initial weights drawn from ``seed``,
    trained on ``samples`` (``cache_features``' entries) through ``trainer`` (a
    ``FabricTrainer``). Returns the fitted member."""
    torch.manual_seed(seed)
    member = head_like(template)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        FeatureSamples(samples), batch_size=batch_size, shuffle=True, generator=generator
    )
    return member.fit(loader, None, trainer)

"""STFPM (Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection", 2021).

A frozen pretrained teacher and a student of the same architecture, randomly initialised, see
the same defect-free images; the student learns to reproduce the teacher's feature pyramid
(``layers``, timm feature indices; the paper's ResNet-18 conv2_x..conv4_x are ``(1, 2, 3)``).
On anomalies, which it never saw, the student's features drift from the teacher's.

Features are L2-normalized over channels at every position. The loss is, as in the paper, the
sum over layers of ``1 / (2 h w) * sum over positions of ||t - s||^2`` (averaged over the
batch). The anomaly map of a layer is ``0.5 * ||t - s||^2`` per position, bilinearly upsampled
to the input; layers are combined by their product (the paper) or their sum
(``map_combination``). Optimizer: SGD with the paper's lr 0.4, momentum 0.9, weight decay 1e-4.

After training, the student's batch-norm running statistics are re-estimated with its final
weights over one pass of the training images ("precise BN"). The paper trains for 100 epochs,
long enough for the running averages (momentum 0.1) to settle; a short CPU budget of a few dozen
steps leaves them carrying the initialisation and early weights, and the student then mismatches
the teacher everywhere at inference (pixel AUROC 0.2 instead of 0.96 after 12 steps on the
synthetic panels). The pass goes through ``FabricTrainer.accumulate``, so under DDP the
statistics are those of the whole training set on every rank.

The teacher is the member's ``feature_extractor``, so a hybrid can share its feature maps
(``shared_backbone_key``); the student always runs on the images. Both take images in [0, 1]
and normalize them with the ImageNet statistics inside (``members.backbones``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from members.backbones import FeatureExtractor, load_backbone
from members.base import BackboneMember, gaussian_blur, register, upsample_map
from members.trainer import FabricTrainer

MAP_COMBINATIONS = ("product", "sum")


def freeze_past_last_layer(extractor: FeatureExtractor) -> None:
    """Turn off gradients of the parameters registered after the extractor's last returned
    layer. timm's EfficientNet feature bodies run every stage, also those past the last
    requested layer (ResNet bodies end there); their parameters never get a gradient, and DDP
    fails on parameters that require one but get none."""
    last = extractor.body.feature_info.module_name()[-1] + "."
    seen_last = False
    for name, param in extractor.body.named_parameters():
        inside = name.startswith(last)
        if seen_last and not inside:
            param.requires_grad_(False)
        seen_last = seen_last or inside


def layer_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer ``0.5 * ||t - s||^2`` ``[B, 1, h, w]`` of the channel-normalized features,
    in float32 (so mixed precision only touches the networks)."""
    return [
        0.5
        * (F.normalize(t.float(), dim=1) - F.normalize(s.float(), dim=1))
        .pow(2)
        .sum(1, keepdim=True)
        for t, s in zip(teacher, student)
    ]


@register("stfpm")
class STFPM(BackboneMember):
    """Student-teacher feature pyramid matching; the map is the teacher-student discrepancy.

    Args:
        backbone, layers, pretrained, weights_dir: the teacher (``BackboneMember``); the
            student is the same architecture with the same ``layers``, randomly initialised.
        map_combination: ``"product"`` (the paper) or ``"sum"`` of the per-layer maps.
        map_sigma: Gaussian smoothing of the map in pixels (0: none, the paper).
        lr, momentum, weight_decay: SGD on the student.
        seed: the student's random initialisation.
    """

    trainable = True
    default_layers = (1, 2, 3)
    option_choices = {"map_combination": MAP_COMBINATIONS}

    def __init__(
        self,
        map_combination: str = "product",
        map_sigma: float = 0.0,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if map_combination not in MAP_COMBINATIONS:
            raise ValueError(
                f"map_combination must be one of {MAP_COMBINATIONS}, got {map_combination!r}"
            )
        self.map_combination = map_combination
        self.map_sigma = map_sigma
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.student = load_backbone(
                self.backbone,
                self.layers,
                pretrained=False,
                weights_dir=self.weights_dir,
                frozen=False,
            )
        freeze_past_last_layer(self.student)

    def distances(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Per-layer discrepancy maps ``[B, 1, h, w]`` at each layer's resolution."""
        return layer_distances(self.backbone_features(images, features), self.student(images))

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        maps = [upsample_map(d, size) for d in self.distances(images, features)]
        combined = torch.stack(maps)
        combined = combined.prod(0) if self.map_combination == "product" else combined.sum(0)
        return gaussian_blur(combined, self.map_sigma)

    def on_fit_end(
        self, trainer: FabricTrainer, train_loader: Iterable, val_loader: Iterable | None
    ) -> None:
        """After training, re-estimate the student's batch-norm statistics."""
        self.recalibrate_batch_norm(trainer, train_loader)

    def recalibrate_batch_norm(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Set the student's batch-norm running mean and variance to the sample-weighted average
        of their per-batch values over ``train_loader``, computed in training mode."""
        norms = [
            m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        momenta = [norm.momentum for norm in norms]
        was_training = self.student.training

        def batch_statistics(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            # Momentum 1: after the forward pass the running buffers hold this batch's values.
            self.student(batch["image"])
            count = batch["image"].shape[0]
            out = {"count": torch.tensor(float(count), device=batch["image"].device)}
            for i, norm in enumerate(norms):
                out[f"mean{i}"] = norm.running_mean * count
                out[f"var{i}"] = norm.running_var * count
            return out

        try:
            for norm in norms:
                norm.momentum = 1.0
            self.student.train()
            totals = trainer.accumulate(batch_statistics, train_loader)
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
            self.student.train(was_training)
        for i, norm in enumerate(norms):
            norm.running_mean.copy_(totals[f"mean{i}"] / totals["count"])
            norm.running_var.copy_(totals[f"var{i}"] / totals["count"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        return {"optimizer": optimizer, "scheduler": None, "interval": "epoch"}

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        distances = self.distances(batch["image"])
        per_layer = [d.mean() for d in distances]
        out = {f"loss_layer{i}": v.detach() for i, v in zip(self.student.layers, per_layer)}
        out["loss"] = torch.stack(per_layer).sum()
        return out

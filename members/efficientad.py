"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024).

Three networks look at the image resized to ``input_size`` (ImageNet-normalized, as the
paper's):

- a teacher, a patch description network (PDN: four or six unpadded convolutions and two
  average poolings, receptive field 33 px, output stride 4, 384 channels; ``model_size`` small
  or medium as in the paper's tables), frozen while the others train. Its outputs are
  standardized with channel means and standard deviations over the training images;
- a student PDN with 2 x 384 output channels: the first half regresses the teacher on the
  image with the hard-feature loss (the mean of the squared differences at or above their
  ``p_hard`` quantile), plus, when ``penalty_dir`` is set, the penalty ``mean(S(P)**2)`` on a
  random image ``P`` of that folder (the paper's ImageNet penalty; 30 % of them grayscale);
- an autoencoder (strided-convolution encoder down to 1 x 1, bilinear-upsampling decoder with
  dropout) that regresses the teacher on a brightness-, contrast- or saturation-augmented copy,
  while the student's second half regresses the autoencoder on it (logical anomalies).

The anomaly map is the mean of the student-teacher map (squared differences averaged over
channels) and the autoencoder-student map, each normalized with its ``q_a = 0.9`` and
``q_b = 0.995`` quantiles on validation images (``map = 0.1 * (m - q_a) / (q_b - q_a)``), then
padded by 4 cells (the half receptive field over the stride), replicated rather than the
paper's zeros so image borders keep the nearest computed value, and resized to the input.
The quantiles are measured in ``on_fit_end`` on ``val_loader``, or on the training images when
there is none, and kept as buffers so a saved member restores them.

Teacher weights: ``weights_dir/teacher_<model_size>.pth`` (a ``state_dict``, e.g.
``teacher_small.pth``) or anomalib's ``pretrained_teacher_<model_size>.pth``, loaded with
``weights_only=True``; parameter names may differ from ours as long as the tensors match in
order and shape. Without such a file the teacher is distilled (``on_fit_start``) before the
student trains: ``distill_steps`` Adam steps on the training images regressing a fixed target
made from the frozen ``backbone``'s ``layers`` (each 3 x 3 average-pooled, resized to the PDN's
output, concatenated, standardized per channel over the training images and mapped to 384
channels by a seeded random orthogonal projection). The paper distills on ImageNet from a
WideResNet-101 for 60 000 steps; this in-domain distillation is a stand-in,
``fit_stats["distill_seconds"]`` records its cost, and a distilled teacher saved as
``teacher_<model_size>.pth`` is reused by later fits. ``distill_steps = 0`` keeps a random
teacher.

What short CPU trainings give (2 cores, batch 8, synthetic panels): a distillation step takes
about 1 s at ``input_size`` 128 and 4 s at 256 (twice that on shared cores), and 40 steps lower
the distillation loss by only about 12 %. Such a barely distilled teacher separated the panels
worse than a random one (image AUROC 0.63-0.68 after 20 steps against 0.78-0.86), whose local,
intensity-like features suit uniform panels; so the CPU configuration keeps a random teacher.
In a few dozen student steps the autoencoder branch stays far from converged (its targets move
by many standard deviations under the brightness augmentation, the panels varying so little):
expect image AUROCs of 0.67-0.78 and pixel AUROCs of 0.80-0.90 from such trainings.

Deviations from the paper: it trains 70 000 steps of batch 1 with a learning-rate drop at 95 %;
here the trainer's epochs and batches apply and there is no scheduler. The autoencoder's sizes
scale with ``input_size``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from artifacts.io import ArtifactError, torch_load
from data.images import folder_images, random_folder_images
from members.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone
from members.base import Member, check_choice, register, upsample_map
from members.layers import as_three_channels

if TYPE_CHECKING:
    from members.trainer import FabricTrainer

MODEL_SIZES = ("small", "medium")
TEACHER_CHANNELS = 384
MAP_PADDING = 4  # PDN cells: (receptive field 33 - 1) / 2 / stride 4
PENALTY_GRAYSCALE = 0.3


def teacher_file_names(model_size: str) -> tuple[str, ...]:
    """Accepted teacher weight files in ``weights_dir``, in order of preference."""
    return (f"teacher_{model_size}.pth", f"pretrained_teacher_{model_size}.pth")


def pdn(model_size: str, out_channels: int) -> nn.Sequential:
    """The patch description network of the paper (no padding: 256 px in, 56 x 56 out)."""
    check_choice("model_size", model_size, MODEL_SIZES)
    if model_size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
            nn.Conv2d(128, 256, 4),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
            nn.Conv2d(256, 256, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        )
    return nn.Sequential(
        nn.Conv2d(3, 256, 4),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 512, 4),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(512, 512, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


def pdn_output_size(input_size: int) -> int:
    """Side of the PDN output for a square input of side ``input_size`` (both sizes)."""
    return ((input_size - 3) // 2 - 3) // 2 - 2 - 3


def efficientad_autoencoder(input_size: int, output_size: int, out_channels: int) -> nn.Sequential:
    """The paper's autoencoder for ``input_size`` (a multiple of 32, the paper's 256 or other):
    five stride-2 convolutions and one to a 1 x 1 code, then six bilinear upsamplings (the
    paper's sizes 3, 8, 15, 32, 63, 127, scaled to ``input_size``) each with a 4 x 4 convolution
    and dropout, and a last resize to the PDN's ``output_size``."""
    if input_size % 32 or input_size < 64:
        raise ValueError(f"input_size must be a multiple of 32 and >= 64, got {input_size}")
    layers: list[nn.Module] = []
    for in_ch, out_ch in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
        layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(64, 64, input_size // 32))
    for size in (3, 8, 15, 32, 63, 127):
        layers += [
            nn.Upsample(size=math.ceil(size * input_size / 256), mode="bilinear"),
            nn.Conv2d(64, 64, 4, padding=2),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        ]
    layers += [
        nn.Upsample(size=output_size, mode="bilinear"),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, out_channels, 3, padding=1),
    ]
    return nn.Sequential(*layers)


def hard_feature_loss(distances: torch.Tensor, p_hard: float) -> torch.Tensor:
    """Mean of the largest ``1 - p_hard`` share of ``distances`` (those at or above their
    ``p_hard`` quantile); ``topk`` has no size limit, unlike ``torch.quantile``."""
    flat = distances.flatten().float()
    count = max(1, math.ceil((1 - p_hard) * flat.numel()))
    return flat.topk(count).values.mean()


def augment_for_autoencoder(images: torch.Tensor) -> torch.Tensor:
    """Per image, one of brightness, contrast or saturation scaled by a factor in [0.8, 1.2]
    (the paper's augmentation), from the global torch generator."""
    count = images.shape[0]
    choice = torch.randint(3, (count,)).to(images.device).view(-1, 1, 1, 1)
    factor = (0.8 + 0.4 * torch.rand(count)).to(images).view(-1, 1, 1, 1)
    weights = torch.tensor((0.299, 0.587, 0.114), device=images.device, dtype=images.dtype)
    gray = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    brightness = images * factor
    contrast = (images - gray.mean((2, 3), keepdim=True)) * factor + gray.mean((2, 3), keepdim=True)
    saturation = (images - gray) * factor + gray
    out = torch.where(choice == 0, brightness, torch.where(choice == 1, contrast, saturation))
    return out.clamp(0, 1)


def orthogonal_projection(in_channels: int, out_channels: int, seed: int) -> torch.Tensor:
    """A seeded random ``[out_channels, in_channels]`` matrix with orthonormal rows or columns."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(
        max(in_channels, out_channels), min(in_channels, out_channels), generator=generator
    )
    q, _ = torch.linalg.qr(matrix)
    return q if out_channels >= in_channels else q.T


@register("efficientad")
class EfficientAD(Member):
    """EfficientAD: PDN teacher, student and autoencoder; see the module docstring.

    Args:
        model_size: ``"small"`` or ``"medium"`` PDN.
        input_size: square side the images are resized to for the networks (a multiple of 32,
            at least 64; paper: 256); maps come back at the input's resolution.
        weights_dir: where the teacher weights file is looked for (and the backbone's).
        backbone, layers, pretrained: the frozen feature extractor the teacher is distilled
            from when no weights file exists; ``layers`` are timm feature indices.
        distill_steps, distill_lr: Adam steps and learning rate of that distillation.
        penalty_dir: folder of images for the student's penalty (ImageNet in the paper); None
            switches the penalty off, with a warning.
        p_hard: quantile above which student-teacher differences enter the hard-feature loss.
        quantile_a, quantile_b: map-normalization quantiles (paper: 0.9, 0.995).
        lr, weight_decay: Adam for student and autoencoder (paper: 1e-4, 1e-5).
        seed: the distillation target's random projection.
    """

    trainable = True
    option_choices = {"model_size": MODEL_SIZES}
    text_options = ("penalty_dir",)

    def __init__(
        self,
        model_size: str = "small",
        input_size: int = 256,
        weights_dir: str = "backbones",
        backbone: str = "efficientnet_lite0",
        layers: tuple[int, ...] = (2, 3),
        pretrained: bool = True,
        distill_steps: int = 1000,
        distill_lr: float = 1e-3,
        penalty_dir: str | None = None,
        p_hard: float = 0.999,
        quantile_a: float = 0.9,
        quantile_b: float = 0.995,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not 0 <= p_hard < 1:
            raise ValueError(f"p_hard must be in [0, 1), got {p_hard}")
        if not 0 < quantile_a < quantile_b < 1:
            raise ValueError(
                f"need 0 < quantile_a < quantile_b < 1, got {quantile_a}, {quantile_b}"
            )
        if distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {distill_steps}")
        self.model_size = model_size
        self.input_size = input_size
        self.weights_dir = weights_dir
        self.backbone = backbone
        self.layers = tuple(layers)
        self.pretrained = pretrained
        self.distill_steps = distill_steps
        self.distill_lr = distill_lr
        self.penalty_dir = penalty_dir
        self.p_hard = p_hard
        self.quantile_a = quantile_a
        self.quantile_b = quantile_b
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        output_size = pdn_output_size(input_size)
        self.teacher = pdn(model_size, TEACHER_CHANNELS)
        self.teacher.requires_grad_(False)
        self.student = pdn(model_size, 2 * TEACHER_CHANNELS)
        self.autoencoder = efficientad_autoencoder(input_size, output_size, TEACHER_CHANNELS)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, TEACHER_CHANNELS, 1, 1))
        # Rows: student-teacher, autoencoder-student; columns: q_a, q_b.
        self.register_buffer("map_quantiles", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        self.fit_stats: dict[str, Any] = {}
        self._penalty_paths: list[Path] = []
        self._train_started = 0.0  # set by on_fit_start: fit_stats["train_seconds"] from it

    # --- the networks ----------------------------------------------------------------------

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 1 or 3, H, W]`` as 3 channels at ``input_size``."""
        images = as_three_channels(images)
        if tuple(images.shape[-2:]) == (self.input_size, self.input_size):
            return images
        return F.interpolate(
            images,
            size=(self.input_size, self.input_size),
            mode="bilinear",
            antialias=min(images.shape[-2:]) > self.input_size,
            align_corners=False,
        )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] resized to ``input_size`` and ImageNet-normalized."""
        return (self.resize(images) - self.mean) / self.std

    def teacher_features(self, prepared: torch.Tensor) -> torch.Tensor:
        """Standardized teacher output of prepared images, without gradients."""
        with torch.no_grad():
            return (self.teacher(prepared) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalized student-teacher and autoencoder-student maps ``[B, 2, h, w]`` at the
        PDN's output resolution."""
        prepared = self.prepare(images)
        teacher = self.teacher_features(prepared)
        student = self.student(prepared)
        reconstruction = self.autoencoder(prepared)
        map_st = ((teacher - student[:, :TEACHER_CHANNELS]) ** 2).mean(1, keepdim=True)
        map_ae = ((reconstruction - student[:, TEACHER_CHANNELS:]) ** 2).mean(1, keepdim=True)
        return torch.cat((map_st, map_ae), dim=1).float()

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        maps = self.raw_maps(images)
        low = self.map_quantiles[:, 0].view(1, 2, 1, 1)
        high = self.map_quantiles[:, 1].view(1, 2, 1, 1)
        spread = (high - low).clamp_min(torch.finfo(maps.dtype).eps)  # a constant map: no zero
        combined = (0.1 * (maps - low) / spread).mean(1, keepdim=True)
        padded = F.pad(combined, (MAP_PADDING,) * 4, mode="replicate")
        return upsample_map(padded, tuple(images.shape[-2:]))

    # --- fitting ---------------------------------------------------------------------------

    def teacher_file(self) -> Path | None:
        """The teacher weights file in ``weights_dir``, or None if there is none."""
        for name in teacher_file_names(self.model_size):
            path = Path(self.weights_dir) / name
            if path.is_file():
                return path
        return None

    def load_teacher(self, path: str | Path) -> None:
        """Load a teacher ``state_dict`` from ``path``; names may differ if the tensors match
        ours in order and shape (anomalib's ``conv1...`` or ``nn.Sequential`` indices)."""
        state = torch_load(path)
        if not isinstance(state, dict):
            raise ArtifactError(
                f"{path}: expected a state_dict; a pickled module (the original repository's "
                f"teacher_{self.model_size}.pth) must be converted with "
                "torch.save(torch.load(f, weights_only=False).state_dict(), f)"
            )
        own = self.teacher.state_dict()
        shapes = [tuple(v.shape) for v in state.values()]
        if shapes != [tuple(v.shape) for v in own.values()]:
            raise ArtifactError(
                f"{path}: tensor shapes {shapes} do not fit the {self.model_size} PDN teacher"
            )
        self.teacher.load_state_dict(dict(zip(own, state.values())), strict=True)

    def on_fit_start(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Before student and autoencoder train: the teacher (resumed, loaded or distilled)
        and its channel statistics, and the penalty images."""
        trainer.launch()
        self.to(trainer.fabric.device)
        self.fit_stats = {}
        path = self.teacher_file()
        if trainer.resume_checkpoint() is not None:
            # The checkpoint holds the teacher and its statistics: distilling again would only
            # be overwritten (and cost minutes on a CPU).
            self.fit_stats["teacher"] = f"from {trainer.resume_checkpoint()}"
        elif path is not None:
            self.load_teacher(path)
            self.fit_stats["teacher"] = str(path)
        elif self.distill_steps == 0:
            self.fit_stats["teacher"] = "random"
        else:
            started = time.perf_counter()
            self.distill_teacher(trainer, train_loader)
            self.fit_stats["teacher"] = "distilled"
            self.fit_stats["distill_seconds"] = time.perf_counter() - started
        if trainer.resume_checkpoint() is None:
            self.teacher_statistics(trainer, train_loader)
        if self.penalty_dir is None:
            warnings.warn(
                "efficientad: penalty_dir is None, so the student's penalty on out-of-domain "
                "images (ImageNet in the paper) is off",
                stacklevel=3,  # the caller of Member.fit
            )
            self._penalty_paths = []
        else:
            self._penalty_paths = folder_images(self.penalty_dir)
        self._train_started = time.perf_counter()

    def _backbone_target(
        self, backbone: nn.Module, images: torch.Tensor, size: int
    ) -> torch.Tensor:
        maps = [F.avg_pool2d(m.float(), 3, stride=1, padding=1) for m in backbone(images)]
        maps = [
            F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in maps
        ]
        return torch.cat(maps, dim=1)

    def distill_teacher(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Regress the teacher on the frozen backbone's projected features of the training
        images for ``distill_steps`` steps (see the module docstring)."""
        fabric = trainer.fabric
        backbone = fabric.to_device(
            load_backbone(self.backbone, self.layers, self.pretrained, self.weights_dir)
        )
        size = pdn_output_size(self.input_size)

        def moments(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            target = self._backbone_target(backbone, self.resize(batch["image"]), size).double()
            return {
                "sum": target.sum((0, 2, 3)),
                "squares": (target**2).sum((0, 2, 3)),
                "count": torch.tensor(target.numel() / target.shape[1], dtype=torch.float64),
            }

        totals = trainer.accumulate(moments, train_loader)
        mean = totals["sum"] / totals["count"]
        std = (totals["squares"] / totals["count"] - mean**2).clamp_min(1e-12).sqrt()
        projection = orthogonal_projection(len(mean), TEACHER_CHANNELS, self.seed)
        projection = (projection / std.cpu()[None, :]).float().to(fabric.device)
        offset = (projection @ mean.float().to(fabric.device)).view(1, -1, 1, 1)

        self.teacher.requires_grad_(True)
        optimizer = torch.optim.Adam(
            self.teacher.parameters(), lr=self.distill_lr, weight_decay=self.weight_decay
        )
        teacher, optimizer = fabric.setup(self.teacher, optimizer)
        # Every rank runs the whole loader; gradients are averaged over ranks, which stay equal.
        step = 0
        while step < self.distill_steps:
            for batch in train_loader:
                images = self.resize(fabric.to_device(batch)["image"])
                with torch.no_grad(), fabric.autocast():
                    features = self._backbone_target(backbone, images, size)
                target = torch.einsum("oc,bchw->bohw", projection, features.float()) - offset
                loss = F.mse_loss(teacher((images - self.mean) / self.std).float(), target)
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == self.distill_steps:
                    break
        self.fit_stats["distill_loss"] = loss.item()
        self.teacher.requires_grad_(False)

    def teacher_statistics(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Channel mean and standard deviation of the teacher over the training images."""

        def moments(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            out = self.teacher(self.prepare(batch["image"])).double()
            return {
                "sum": out.sum((0, 2, 3)),
                "squares": (out**2).sum((0, 2, 3)),
                "count": torch.tensor(out.numel() / out.shape[1], dtype=torch.float64),
            }

        totals = trainer.accumulate(moments, train_loader)
        mean = totals["sum"] / totals["count"]
        std = (totals["squares"] / totals["count"] - mean**2).clamp_min(1e-12).sqrt()
        self.teacher_mean.copy_(mean.view_as(self.teacher_mean))
        self.teacher_std.copy_(std.view_as(self.teacher_std))

    def on_fit_end(
        self, trainer: FabricTrainer, train_loader: Iterable, val_loader: Iterable | None
    ) -> None:
        """The map quantiles on ``val_loader``, or on ``train_loader`` without one."""
        self.normalize_maps(trainer, val_loader if val_loader is not None else train_loader)
        self.fit_stats["train_seconds"] = time.perf_counter() - self._train_started

    def normalize_maps(self, trainer: FabricTrainer, loader: Iterable) -> None:
        """Store the ``quantile_a`` and ``quantile_b`` quantiles of both raw maps on ``loader``."""
        was_training = self.training
        self.eval()
        maps = trainer.gather(lambda batch: self.raw_maps(batch["image"]), loader)
        self.train(was_training)
        values = maps.transpose(0, 1).flatten(1).cpu().numpy()
        quantiles = np.quantile(values, (self.quantile_a, self.quantile_b), axis=1).T
        self.map_quantiles.copy_(torch.from_numpy(quantiles))

    def configure_optimizers(self) -> dict[str, Any]:
        params = [*self.student.parameters(), *self.autoencoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None, "interval": "epoch"}

    def penalty_images(self, count: int, device: torch.device) -> torch.Tensor:
        """``count`` random images of ``penalty_dir`` at ``input_size``, 30 % grayscale."""
        images = random_folder_images(
            self._penalty_paths, count, (self.input_size, self.input_size), device
        )
        gray = (torch.rand(count) < PENALTY_GRAYSCALE).to(device).view(-1, 1, 1, 1)
        return torch.where(gray, images.mean(1, keepdim=True).expand_as(images), images)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = as_three_channels(batch["image"])
        prepared = self.prepare(images)
        teacher = self.teacher_features(prepared)
        student = self.student(prepared)[:, :TEACHER_CHANNELS]
        loss_hard = hard_feature_loss((teacher - student) ** 2, self.p_hard)
        out = {"loss_hard": loss_hard.detach()}
        loss_st = loss_hard
        if self._penalty_paths:
            penalty = self.prepare(self.penalty_images(1, images.device))
            loss_penalty = (self.student(penalty)[:, :TEACHER_CHANNELS].float() ** 2).mean()
            loss_st = loss_st + loss_penalty
            out["loss_penalty"] = loss_penalty.detach()
        augmented = self.prepare(augment_for_autoencoder(images))
        teacher_aug = self.teacher_features(augmented)
        reconstruction = self.autoencoder(augmented)
        student_ae = self.student(augmented)[:, TEACHER_CHANNELS:]
        loss_ae = F.mse_loss(reconstruction.float(), teacher_aug.float())
        loss_stae = F.mse_loss(student_ae.float(), reconstruction.float())
        out.update(loss_ae=loss_ae.detach(), loss_stae=loss_stae.detach())
        out["loss"] = loss_st + loss_ae + loss_stae
        return out

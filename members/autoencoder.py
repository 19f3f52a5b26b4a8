"""Reconstruction autoencoders, and the base of the members that reconstruct images.

A member that reconstructs normal images flags what it cannot reconstruct: the anomaly map is
the per-pixel reconstruction error, squared error averaged over channels (``"l2"``) or one minus
the local SSIM (``"ssim"``), Gaussian-smoothed (``map_sigma``) and standardized per pixel.

Variants (``variant``):

- ``vanilla``: a convolutional encoder (blocks of two 3x3 conv-BN-ReLU, max-pool between) down
  to ``1 / 2**(depth - 1)`` of the input, a narrow linear bottleneck of ``latent_channels``
  per position, and a mirrored decoder (bilinear upsampling). The bottleneck is what keeps the
  network from reproducing anomalies: keep it narrow.
- ``unet``: the same with skip connections at every level. Skips let a long-trained network
  copy its input, anomalies included; ``corruption="perlin"`` counters that by training it as a
  denoiser: the input gets Perlin-masked texture (``members.perlin``, as DRAEM's reconstructive
  network) and the target is the clean image, so it learns to restore normal appearance.
- ``backbone``: a frozen pretrained encoder (``load_backbone``; shared with the hybrid) whose
  ``layers`` are resized to the finest one and concatenated, the bottleneck, and a trained
  decoder back to the image.

Images are reconstructed with 3 channels; 1-channel input is repeated, like the backbones do.

Two standardizations, both measured in ``fit`` and kept as buffers (``ReconstructionMember``,
shared with ``members.vae``):

- Images. Before training, the per-channel mean and standard deviation of the training images;
  the networks read and write standardized images and the L2 error is in those units. A lit
  panel varies by a few percent around its gray level (the synthetic panels: standard deviation
  about 0.006 of full scale), and defects are changes of that size: on the [0, 1] scale they
  drown in the optimizer's step noise and in half-precision rounding, standardized they are of
  order one. For natural images it is a mild rescaling, like ImageNet normalization.
- Maps (``standardize_map``). Even on defect-free images the reconstruction error is not
  uniform: image borders (padding), vignetted corners and the parts of a smooth background
  non-uniformity the bottleneck cannot reproduce err more than the middle. After training, the
  per-pixel mean and standard deviation of the smoothed error map over the validation images
  (the training images when there is no ``val_loader``) are measured, and the anomaly map is
  the error's z-score at its position, ``(error - mean) / std``, so that one threshold means
  the same everywhere (as PaDiM's per-position Gaussians). Deviations are floored at
  ``MAP_STD_FLOOR`` of their mean: a pixel that happened to vary little over a few images is not
  amplified. The statistics fix the map size: other input sizes are refused (resize or tile to
  the fitted size, or set ``standardize_map=False``). On the synthetic panels this raises the
  image AUROC of equally trained models from 0.85-0.9 to 0.92-1.0.

Training: AdamW on the mean squared error of the standardized image (plus, optionally, a
``1 - SSIM`` term), its rate decayed per epoch by a cosine to near zero at the trainer's last
epoch (``lr_schedule``), so short CPU trainings end on a settled model. Defaults are sized for
CPUs (``base_width=8``); wider networks fit on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from members.backbones import load_backbone
from members.base import Member, check_choice, gaussian_blur, register
from members.layers import (
    Bottleneck,
    Decoder,
    Encoder,
    as_three_channels,
    level_widths,
    pad_to_multiple,
    ssim_map,
)
from members.perlin import augment_textures, synthesize_anomalies
from members.trainer import FabricTrainer

AUTOENCODER_VARIANTS = ("vanilla", "unet", "backbone")
CORRUPTIONS = ("none", "perlin")
MAP_METRICS = ("l2", "ssim")
LR_SCHEDULES = ("cosine", "constant")
MIN_IMAGE_STD = 1e-3  # a quarter of an 8-bit level: flatter channels are not amplified further
MAP_STD_FLOOR = 0.1  # per-pixel map deviations are floored at this share of their mean
MIN_MAP_STD = 1e-12


# --- shared building blocks ---------------------------------------------------------------


class ReconstructionMember(Member):
    """Base of the members that reconstruct images (``Autoencoder``, ``VAE``).

    It owns the two statistics passes of the module docstring: the image standardization
    (``image_mean`` / ``image_std``, measured before training) and the per-pixel map
    standardization (``map_mean`` / ``map_std``, measured after it). Subclasses call
    ``init_reconstruction`` in their constructor, implement ``reconstruct`` (standardized images
    in, standardized reconstruction out) and may extend ``raw_map``. ``init_encoder`` makes their
    encoder: a trained one, or a frozen pretrained backbone read through ``backbone_code``.
    """

    trainable = True
    reconstructs = True
    option_choices = {"map_metric": MAP_METRICS, "lr_schedule": LR_SCHEDULES}
    map_metric: str
    map_sigma: float

    def init_reconstruction(
        self, standardize_map: bool, lr: float, weight_decay: float, lr_schedule: str
    ) -> None:
        """The shared options (see ``Autoencoder``) and the statistics buffers."""
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        self.standardize_map = standardize_map
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        # The trainer's epochs, set by ``on_fit_start``: the horizon of the cosine schedule.
        self.planned_epochs: int | None = None
        self.register_buffer("image_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("image_std", torch.ones(1, 3, 1, 1))
        # [1, 1, H, W] once fitted; empty means "not measured": raw maps.
        self.register_buffer("map_mean", torch.zeros(0))
        self.register_buffer("map_std", torch.zeros(0))

    def full_precision(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype of the member's buffers (float32 also under mixed precision: the
        signal of low-contrast images sits in the last bits of a half-precision value)."""
        return x.to(self.image_mean.dtype)

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1 or 3, H, W]`` images in [0, 1] to standardized ``[B, 3, H, W]``."""
        return (self.full_precision(as_three_channels(images)) - self.image_mean) / self.image_std

    def destandardize(self, standardized: torch.Tensor) -> torch.Tensor:
        return self.full_precision(standardized) * self.image_std + self.image_mean

    def reconstruct(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The standardized reconstruction ``[B, 3, H, W]`` of ``images`` (in [0, 1])."""
        raise NotImplementedError

    def reconstruct_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.destandardize(self.reconstruct(images)).clamp(0, 1)

    def error_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-pixel error ``[B, 1, H, W]`` of a standardized ``reconstruction`` of ``images``
        (in [0, 1]): squared error in standardized units averaged over channels (``"l2"``) or
        ``1 - SSIM`` on the [0, 1] scale (``"ssim"``)."""
        if self.map_metric == "l2":
            error = self.standardize(images) - self.full_precision(reconstruction)
            return (error**2).mean(1, keepdim=True)
        clean = self.full_precision(as_three_channels(images))
        return 1 - ssim_map(clean, self.destandardize(reconstruction).clamp(0, 1))

    def raw_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The smoothed error map before the per-pixel standardization."""
        error = self.error_map(images, self.reconstruct(images, features))
        return gaussian_blur(error, self.map_sigma)

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        anomaly_map = self.raw_map(images, features)
        if not (self.standardize_map and self.map_mean.numel()):
            return anomaly_map
        if self.map_mean.shape[-2:] != anomaly_map.shape[-2:]:
            raise ValueError(
                f"{self.member_name} measured its per-pixel map statistics on "
                f"{tuple(self.map_mean.shape[-2:])} images; got {tuple(anomaly_map.shape[-2:])} "
                "(resize or tile to that size, or set standardize_map=False)"
            )
        return (anomaly_map - self.map_mean) / self.map_std

    def init_encoder(
        self,
        frozen_backbone: bool,
        base_width: int,
        depth: int,
        backbone: str,
        layers: Sequence[int],
        pretrained: bool,
        weights_dir: str,
    ) -> tuple[list[int], int]:
        """Make the encoder and pad inputs to its stride; returns the decoder's level widths and
        the channels of the code the encoder gives.

        ``frozen_backbone``: a frozen pretrained backbone (``feature_extractor``, so that a
        hybrid shares its pass, ``shared_backbone_key``; ``encoder`` is None), with as many
        decoder levels as its finest reduction needs and ``backbone_code`` as the code. Else a
        trained ``Encoder`` of ``depth`` levels, its coarsest level the code."""
        if not frozen_backbone:
            widths = level_widths(base_width, depth)
            self.input_multiple = 2 ** (depth - 1)
            self.encoder = Encoder(3, widths)
            return widths, widths[-1]
        self.feature_extractor = load_backbone(
            backbone, tuple(layers), pretrained, weights_dir, frozen=True
        )
        self.encoder = None
        reductions = self.feature_extractor.reductions
        self.input_multiple = max(reductions)
        widths = level_widths(base_width, int(math.log2(min(reductions))) + 1)
        return widths, sum(self.feature_extractor.channels)

    def backbone_code(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The backbone's ``layers`` of ``images`` (in [0, 1], padded to its stride) resized to
        the finest one and concatenated: ``[B, channels, h, w]``. ``features``, a hybrid's shared
        pass over the unpadded images, are used where no padding was needed."""
        # The backbone normalizes its [0, 1] input itself (its published mean and std).
        padded = pad_to_multiple(as_three_channels(images), self.input_multiple)
        maps = self.backbone_features(
            padded, None if padded.shape[-2:] != images.shape[-2:] else features
        )
        size = maps[0].shape[-2:]
        return torch.cat([F.interpolate(m, size=size, mode="bilinear") for m in maps], 1)

    def on_fit_start(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """The image statistics of ``train_loader``, and the trainer's epochs for the schedule."""
        self.planned_epochs = trainer.max_epochs
        self.measure_image_statistics(trainer, train_loader)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW; with ``lr_schedule="cosine"`` the rate decays per epoch to near zero at the
        trainer's last epoch, so training ends on a settled model instead of a noisy step."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = None
        if self.lr_schedule == "cosine" and self.planned_epochs:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.planned_epochs)
        return {"optimizer": optimizer, "scheduler": scheduler, "interval": "epoch"}

    def on_fit_end(
        self, trainer: FabricTrainer, train_loader: Iterable, val_loader: Iterable | None
    ) -> None:
        """The map statistics on ``val_loader``, or on ``train_loader`` without one."""
        if self.standardize_map:
            loader = val_loader if val_loader is not None else train_loader
            self.measure_map_statistics(trainer, loader)

    def measure_image_statistics(self, trainer: FabricTrainer, loader: Iterable) -> None:
        """Per-channel mean and standard deviation of the images of ``loader``."""

        def moments(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            images = as_three_channels(batch["image"]).double()
            return {
                "sum": images.sum((0, 2, 3)),
                "squares": (images**2).sum((0, 2, 3)),
                "count": images.new_tensor(images.numel() / images.shape[1]),
            }

        totals = trainer.accumulate(moments, loader)
        mean = totals["sum"] / totals["count"]
        std = (totals["squares"] / totals["count"] - mean**2).clamp_min(0).sqrt()
        # A flat channel (a blank image) would divide by zero.
        std = std.clamp_min(MIN_IMAGE_STD)
        self.image_mean.copy_(mean.view_as(self.image_mean))
        self.image_std.copy_(std.view_as(self.image_std))

    def measure_map_statistics(self, trainer: FabricTrainer, loader: Iterable) -> None:
        """Per-pixel mean and standard deviation of the raw maps of ``loader`` (eval mode)."""
        shapes: set[tuple[int, ...]] = set()

        def moments(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            maps = self.raw_map(batch["image"]).double()
            shapes.add(tuple(maps.shape[-2:]))
            if len(shapes) > 1:
                raise ValueError(
                    f"per-pixel map statistics need images of one size, got {sorted(shapes)} "
                    "(resize them, or set standardize_map=False)"
                )
            return {
                "sum": maps.sum(0, keepdim=True),
                "squares": (maps**2).sum(0, keepdim=True),
                "count": maps.new_tensor(len(maps)),
            }

        was_training = self.training
        self.eval()
        try:
            totals = trainer.accumulate(moments, loader)
        finally:
            self.train(was_training)
        count = totals["count"]
        if count < 2:
            raise ValueError(
                f"per-pixel map statistics need at least 2 images, got {int(count)} "
                "(or set standardize_map=False)"
            )
        mean = totals["sum"] / count
        std = (totals["squares"] / count - mean**2).clamp_min(0).sqrt()
        # Few images give noisy per-pixel deviations: none may fall far below the typical one.
        std = std.clamp_min(MAP_STD_FLOOR * float(std.mean())).clamp_min(MIN_MAP_STD)
        self.map_mean = self.full_precision(mean)
        self.map_std = self.full_precision(std)


# --- the member ---------------------------------------------------------------------------


@register("autoencoder")
class Autoencoder(ReconstructionMember):
    """Convolutional autoencoder; the anomaly map is its (standardized) reconstruction error.

    Args:
        variant: ``"vanilla"``, ``"unet"`` or ``"backbone"`` (see the module docstring).
        base_width: channels of the finest level (doubling per level, at most 8x).
        depth: resolution levels of the trained encoder (``depth - 1`` halvings); the backbone
            variant's decoder has as many levels as the backbone's stride needs.
        latent_channels: channels of the bottleneck per position; small is what prevents
            reproducing anomalies.
        map_metric: ``"l2"`` or ``"ssim"`` reconstruction error for the anomaly map.
        map_sigma: Gaussian smoothing of the map in pixels (0: none).
        standardize_map: divide the map per pixel by its spread on defect-free images (after
            subtracting its mean there); see the module docstring.
        ssim_weight: weight of the ``1 - SSIM`` term added to the MSE training loss.
        corruption: ``"none"`` or ``"perlin"``: train as a denoiser of synthetic anomalies
            (texture from another image of the batch); any variant, meant for ``unet``.
        lr, weight_decay: AdamW.
        lr_schedule: ``"cosine"`` (per epoch over the trainer's ``max_epochs``) or
            ``"constant"``.
        backbone, layers, pretrained, weights_dir: the frozen encoder of the backbone variant
            (ignored by the others); ``layers`` are timm feature indices.
    """

    option_choices = {"variant": AUTOENCODER_VARIANTS, "corruption": CORRUPTIONS}

    def __init__(
        self,
        variant: str = "vanilla",
        base_width: int = 8,
        depth: int = 4,
        latent_channels: int = 8,
        map_metric: str = "l2",
        map_sigma: float = 4.0,
        standardize_map: bool = True,
        ssim_weight: float = 0.0,
        corruption: str = "none",
        lr: float = 3e-3,
        weight_decay: float = 1e-5,
        lr_schedule: str = "cosine",
        backbone: str = "efficientnet_lite0",
        layers: tuple[int, ...] = (2,),
        pretrained: bool = True,
        weights_dir: str = "backbones",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_choice("variant", variant, AUTOENCODER_VARIANTS)
        check_choice("map_metric", map_metric, MAP_METRICS)
        check_choice("corruption", corruption, CORRUPTIONS)
        self.variant = variant
        self.corruption = corruption
        self.map_metric = map_metric
        self.map_sigma = map_sigma
        self.ssim_weight = ssim_weight
        self.init_reconstruction(standardize_map, lr, weight_decay, lr_schedule)
        widths, code_channels = self.init_encoder(
            variant == "backbone", base_width, depth, backbone, layers, pretrained, weights_dir
        )
        self.bottleneck = Bottleneck(code_channels, latent_channels, widths[-1])
        self.decoder = Decoder(widths, 3, skip_connections=variant == "unet")
        # Standardized targets have mean 0 (Decoder's default bias is mid-gray for [0, 1]).
        nn.init.zeros_(self.decoder.head.bias)

    def reconstruct(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        height, width = images.shape[-2:]
        if self.encoder is None:
            code = self.backbone_code(images, features)
            skips = None
        else:
            skips = self.encoder(pad_to_multiple(self.standardize(images), self.input_multiple))
            code = skips[-1]
        reconstruction = self.decoder(self.bottleneck(code), skips)
        return reconstruction[..., :height, :width]

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = as_three_channels(batch["image"])
        inputs = images
        if self.corruption == "perlin":
            textures = augment_textures(images.roll(1, dims=0))
            inputs, _ = synthesize_anomalies(images, textures)
        reconstruction = self.full_precision(self.reconstruct(inputs))
        mse = F.mse_loss(reconstruction, self.standardize(images))
        out = {"mse": mse.detach()}
        loss = mse
        if self.ssim_weight:
            restored = self.destandardize(reconstruction)
            ssim_loss = 1 - ssim_map(restored, self.full_precision(images)).mean()
            loss = loss + self.ssim_weight * ssim_loss
            out["ssim_loss"] = ssim_loss.detach()
        out["loss"] = loss
        return out

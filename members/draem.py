"""DRAEM (Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021).

Two networks are trained together on normal images that get synthetic anomalies:

- the reconstructive subnetwork, an encoder-decoder without skip connections (``depth``
  levels of two 3x3 conv-BN-ReLU, max-pooled between; widths doubling from ``base_width`` up to
  8x, as ``members.autoencoder``), learns to turn an image with a synthetic anomaly back into
  the clean image: loss ``L2 + (1 - SSIM)`` against the clean image (the paper's ``lambda = 1``);
- the discriminative subnetwork, a U-Net (``disc_depth`` levels from ``disc_width``, skip
  connections) on the channel concatenation of the input and its reconstruction, segments the
  anomaly into two classes: focal loss (``gamma = 2``) against the synthetic mask.

Synthetic anomalies come from ``members.perlin``: a thresholded, rotated Perlin-noise mask
through which an augmented texture is blended with opacity ``beta`` (equation (1) of the paper).
The texture is an image of ``texture_dir`` (a local folder; the paper used DTD) or, when
``texture_dir`` is None, another training image of the batch: nothing is downloaded. Each image
gets an anomaly with probability ``anomaly_probability``.

The anomaly map is the softmax probability of the anomaly class (optionally Gaussian-smoothed,
``map_sigma``). The image score is the paper's: the maximum of the map mean-filtered with a
``score_window`` square window, which ignores isolated hot pixels; ``score_window = 0`` uses the
shared aggregation (``score_aggregation``) instead. On the synthetic test panels both scored
alike (image AUROC 0.82 with the window of 21, 0.85 with the plain maximum), so the default
stays the paper's.

Deviations from the paper, for short CPU trainings on uniform panels:

- widths default to 16 and 16 (paper: 128 and 64; it trains 700 epochs, configs set ours);
- convolutions pad by replication, not zeros: with zero padding the image border looks like an
  edge, and after a few dozen steps the discriminator still flagged it, so the border, not the
  defect, set the image score;
- the discriminator's last bias starts at the focal-loss prior ``P(anomaly) = 0.01`` (Lin et
  al., 2017) instead of 0.5; on the test panels this made short trainings converge reliably
  (with 0.5 some seeds segmented nothing or flagged the background after 30 steps).

Inputs of any size are replicate-padded to a multiple of ``2**(max(depth, disc_depth) - 1)``
and the outputs cropped back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.images import folder_images, random_folder_images
from members.base import Member, gaussian_blur, register
from members.layers import (
    Decoder,
    Encoder,
    as_three_channels,
    level_widths,
    pad_to_multiple,
    ssim_map,
)
from members.perlin import augment_textures, synthesize_anomalies

ANOMALY_PRIOR = 0.01


def focal_loss(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)**gamma * log(p_t)`` of 2-class ``logits`` ``[B, 2, H, W]``
    against binary ``masks`` ``[B, 1, H, W]`` (Lin et al., 2017)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, masks.long())
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


@register("draem")
class Draem(Member):
    """DRAEM: reconstruction of synthetic anomalies and their segmentation.

    Args:
        base_width: channels of the reconstructive subnetwork's finest level (paper: 128).
        depth: its resolution levels (``depth - 1`` halvings; paper: 5).
        disc_width: channels of the discriminative U-Net's finest level (paper: 64).
        disc_depth: its resolution levels (paper: 6).
        texture_dir: folder of texture images for the synthetic anomalies; None uses the
            training images themselves.
        anomaly_probability: share of training images that get a synthetic anomaly.
        beta_range: range of the opacity of the original image inside the anomaly.
        focal_gamma: focusing parameter of the focal loss.
        map_sigma: Gaussian smoothing of the map in pixels (0: none).
        score_window: side of the mean filter before the maximum for the image score (paper:
            21 at 256 px); 0 uses the shared ``score_aggregation``.
        lr, weight_decay: Adam.
    """

    trainable = True
    reconstructs = True
    text_options = ("texture_dir",)

    def __init__(
        self,
        base_width: int = 16,
        depth: int = 5,
        disc_width: int = 16,
        disc_depth: int = 6,
        texture_dir: str | None = None,
        anomaly_probability: float = 0.5,
        beta_range: tuple[float, float] = (0.1, 1.0),
        focal_gamma: float = 2.0,
        map_sigma: float = 0.0,
        score_window: int = 21,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if score_window < 0:
            raise ValueError(f"score_window must be >= 0, got {score_window}")
        self.texture_dir = texture_dir
        self.anomaly_probability = anomaly_probability
        self.beta_range = tuple(beta_range)
        self.focal_gamma = focal_gamma
        self.map_sigma = map_sigma
        self.score_window = score_window
        self.lr = lr
        self.weight_decay = weight_decay
        self.input_multiple = 2 ** (max(depth, disc_depth) - 1)
        widths = level_widths(base_width, depth)
        self.reconstructive = nn.ModuleDict(
            {"encoder": Encoder(3, widths), "decoder": Decoder(widths, 3, skip_connections=False)}
        )
        disc_widths = level_widths(disc_width, disc_depth)
        self.discriminative = nn.ModuleDict(
            {
                "encoder": Encoder(6, disc_widths),
                "decoder": Decoder(disc_widths, 2, skip_connections=True),
            }
        )
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d) and layer.padding != (0, 0):
                layer.padding_mode = "replicate"
        # Focal-loss prior (Lin et al., 2017): start at P(anomaly) = ANOMALY_PRIOR everywhere.
        head = self.discriminative["decoder"].head
        nn.init.zeros_(head.bias)
        nn.init.constant_(head.bias[1:], math.log(ANOMALY_PRIOR / (1 - ANOMALY_PRIOR)))
        self._texture_paths: list[Path] = []

    def reconstruct_and_segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction [B, 3, H, W], logits [B, 2, H, W])`` of images in [0, 1]."""
        images = as_three_channels(images)
        height, width = images.shape[-2:]
        padded = pad_to_multiple(images, self.input_multiple)
        levels = self.reconstructive["encoder"](padded)
        reconstruction = self.reconstructive["decoder"](levels[-1])
        skips = self.discriminative["encoder"](torch.cat((padded, reconstruction), dim=1))
        logits = self.discriminative["decoder"](skips[-1], skips)
        return reconstruction[..., :height, :width], logits[..., :height, :width]

    def reconstruct_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.reconstruct_and_segment(images)[0].float().clamp(0, 1)

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        _, logits = self.reconstruct_and_segment(images)
        anomaly_map = torch.softmax(logits.float(), dim=1)[:, 1:]
        return gaussian_blur(anomaly_map, self.map_sigma)

    def compute_anomaly_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        if self.score_window == 0:
            return super().compute_anomaly_score(anomaly_map)
        window = min(self.score_window, *anomaly_map.shape[-2:])
        smoothed = F.avg_pool2d(
            anomaly_map.float(), window, stride=1, padding=window // 2, count_include_pad=False
        )
        return smoothed.flatten(1).amax(dim=1)

    # --- training --------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None, "interval": "epoch"}

    def textures(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented anomaly textures for ``images``: random images of ``texture_dir`` when it
        is set, else the batch's other images."""
        if self.texture_dir and not self._texture_paths:
            self._texture_paths = folder_images(self.texture_dir)
        if self._texture_paths:
            source = random_folder_images(
                self._texture_paths, images.shape[0], tuple(images.shape[-2:]), images.device
            ).to(images.dtype)
        else:
            source = images.roll(1, dims=0)
        return augment_textures(source)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = as_three_channels(batch["image"])
        augmented, masks = synthesize_anomalies(
            images, self.textures(images), self.anomaly_probability, self.beta_range
        )
        reconstruction, logits = self.reconstruct_and_segment(augmented)
        reconstruction = reconstruction.float()
        l2 = F.mse_loss(reconstruction, images.float())
        ssim_loss = 1 - ssim_map(reconstruction, images.float()).mean()
        focal = focal_loss(logits, masks, self.focal_gamma)
        return {
            "loss": l2 + ssim_loss + focal,
            "l2": l2.detach(),
            "ssim_loss": ssim_loss.detach(),
            "focal": focal.detach(),
        }

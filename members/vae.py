"""Convolutional variational autoencoder (Kingma & Welling 2014) for anomaly maps.

The latent is spatial: ``latent_channels`` Gaussian variables per position of the encoder's
coarsest level (``1 / 2**(depth - 1)`` of the input), so the VAE works at any image size and
its KL divergence is itself a map. Encoder and decoder are the blocks of
``members.autoencoder`` (no skip connections: everything passes through the latent).

As the autoencoder (``members.autoencoder.ReconstructionMember``), the VAE models standardized
images ``x = (image - mean) / std`` (per-channel statistics of the training images, measured
before training) and standardizes its maps per pixel with their mean and spread on defect-free
images after training (``standardize_map``); see that module's docstring for why.

Training minimizes the negative ELBO per image, normalized by its number of values ``C*H*W``::

    loss = (sum of squared errors + beta * sum of KL(q(z|x) || N(0, I))) / (C * H * W)

Divided by ``beta``, the squared error (in standardized units) is the negative log-likelihood
of a Gaussian decoder with variance ``sigma**2 = beta / 2`` (up to a constant), so ``beta``
trades reconstruction detail against latent regularity. The default ``beta = 1`` is the plain
ELBO of a decoder with ``sigma`` = 0.7 standard deviations of the image; smaller values expect
a closer reconstruction and regularize the latent less.

Anomaly map (deterministic: the decoder gets the posterior mean): the reconstruction error
(``"l2"`` or ``"ssim"``) plus ``kl_weight_in_map`` times the spatial KL map (KL summed over the
latent channels at each latent position, in nats, bilinearly upsampled), smoothed, then
standardized per pixel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from members.autoencoder import MAP_METRICS, ReconstructionMember
from members.base import check_choice, gaussian_blur, register, upsample_map
from members.layers import Decoder, Encoder, level_widths, pad_to_multiple


@register("vae")
class VAE(ReconstructionMember):
    """Convolutional VAE with a spatial Gaussian latent; the map is reconstruction error.

    Args:
        base_width, depth: encoder/decoder channels of the finest level (doubling per level, at
            most 8x) and number of resolution levels.
        latent_channels: Gaussian latent variables per latent position.
        beta: weight of the KL term against the summed squared error (see the module docstring).
        kl_weight_in_map: weight of the spatial KL map added to the error map (0: off).
        map_metric: ``"l2"`` or ``"ssim"`` reconstruction error.
        map_sigma: Gaussian smoothing of the map in pixels (0: none).
        standardize_map: divide the map per pixel by its spread on defect-free images (after
            subtracting its mean there).
        lr, weight_decay: AdamW.
        lr_schedule: ``"cosine"`` (per epoch over the trainer's ``max_epochs``) or
            ``"constant"``.
    """

    def __init__(
        self,
        base_width: int = 8,
        depth: int = 4,
        latent_channels: int = 8,
        beta: float = 1.0,
        kl_weight_in_map: float = 0.0,
        map_metric: str = "l2",
        map_sigma: float = 4.0,
        standardize_map: bool = True,
        lr: float = 3e-3,
        weight_decay: float = 1e-5,
        lr_schedule: str = "cosine",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_choice("map_metric", map_metric, MAP_METRICS)
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if beta < 0 or kl_weight_in_map < 0:
            raise ValueError(
                f"beta and kl_weight_in_map must be >= 0, got {beta}, {kl_weight_in_map}"
            )
        self.beta = beta
        self.kl_weight_in_map = kl_weight_in_map
        self.map_metric = map_metric
        self.map_sigma = map_sigma
        self.init_reconstruction(standardize_map, lr, weight_decay, lr_schedule)
        widths = level_widths(base_width, depth)
        self.input_multiple = 2 ** (depth - 1)
        self.encoder = Encoder(3, widths)
        self.posterior = nn.Conv2d(widths[-1], 2 * latent_channels, 1)  # mean and log-variance
        self.latent_decoder = nn.Sequential(
            nn.Conv2d(latent_channels, widths[-1], 1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
        )
        self.decoder = Decoder(widths, 3, skip_connections=False)
        # Standardized targets have mean 0 (Decoder's default bias is mid-gray for [0, 1]).
        nn.init.zeros_(self.decoder.head.bias)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance ``[B, latent_channels, h, w]`` of ``images`` in
        [0, 1] (any size: padded to a multiple of ``2**(depth - 1)``)."""
        padded = pad_to_multiple(self.standardize(images), self.input_multiple)
        posterior = self.full_precision(self.posterior(self.encoder(padded)[-1]))
        mean, log_var = posterior.chunk(2, dim=1)
        # Bounded log-variance keeps exp() finite in half precision and early training.
        return mean, log_var.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The standardized reconstruction ``[B, 3, *size]`` of a latent."""
        reconstruction = self.decoder(self.latent_decoder(latent))
        return reconstruction[..., : size[0], : size[1]]

    @staticmethod
    def kl_map(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(log_var)) || N(0, 1)) summed over latent channels: ``[B, 1, h, w]``."""
        return 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(dim=1, keepdim=True)

    def reconstruct(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        mean, _ = self.encode(images)
        return self.decode(mean, tuple(images.shape[-2:]))

    def raw_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if not self.kl_weight_in_map:
            return super().raw_map(images, features)
        size = tuple(images.shape[-2:])
        mean, log_var = self.encode(images)
        error = self.error_map(images, self.decode(mean, size))
        kl = upsample_map(self.kl_map(mean, log_var), self.padded_size(size))
        error = error + self.kl_weight_in_map * kl[..., : size[0], : size[1]]
        return gaussian_blur(error, self.map_sigma)

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(-(-side // self.input_multiple) * self.input_multiple for side in size)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        mean, log_var = self.encode(images)
        # Reparameterization keeps the sample differentiable; the noise is drawn on the CPU so
        # the trainer's saved random state reproduces it on any device.
        noise = torch.randn(mean.shape).to(mean)
        latent = mean + noise * (0.5 * log_var).exp()
        reconstruction = self.full_precision(self.decode(latent, tuple(images.shape[-2:])))
        target = self.standardize(images)
        values = target[0].numel()
        squared_error = F.mse_loss(reconstruction, target, reduction="sum") / len(target)
        kl = self.kl_map(mean, log_var).sum() / len(target)
        loss = (squared_error + self.beta * kl) / values
        return {"loss": loss, "mse": squared_error.detach() / values, "kl": kl.detach()}

"""Convolutional variational autoencoder (Kingma & Welling 2014) for anomaly maps.

The latents are spatial: ``latent_channels`` Gaussian variables per position of a feature map,
so the VAE works at any image size and its KL divergence is itself a map. Encoder and decoder
are the blocks of ``members.layers``, as the autoencoder's (``members.autoencoder``).

Architectures (``architecture``):

- ``vanilla``: the trained encoder down to ``1 / 2**(depth - 1)`` of the input, a 1x1 conv
  giving the posterior mean and log-variance of the latent there, a 1x1 conv-BN-ReLU back to
  the coarsest level's width, and the decoder without skip connections: everything passes
  through the latent.
- ``unet``: the decoder with skip connections at every level, for detail the coarse latent
  cannot hold. A plain skip would carry the input around the KL-regularized latent, and a
  network trained long enough copies its input through it, defects included (the autoencoder's
  ``unet`` variant counters that with denoising training). Here every skip is a Gaussian latent
  of its own: at each level finer than the coarsest, a 1x1 conv gives the mean and
  log-variance of ``latent_channels`` variables per position, sampled by reparameterization in
  training (the posterior mean at inference), and a 1x1 conv-BN-ReLU brings the sample back to
  the level's width before the decoder concatenates it. Each latent has a standard normal
  prior and the ELBO's KL sums over all of them, so what passes a skip costs nats like what
  passes the coarse latent: the network keeps there what the normal images need at that
  scale, not a free copy of the input. This is the multi-scale latent hierarchy of ladder and
  hierarchical VAEs (Sønderby et al. 2016, "Ladder Variational Autoencoders"; Vahdat & Kautz
  2020, NVAE), simplified: each level's posterior reads the encoder's level only (bottom-up)
  and its prior is fixed, where those models also infer top-down and learn each level's prior
  conditioned on the coarser latents. The simplification keeps every KL term closed-form and
  the KL map a sum of per-level maps, and the decoder is the autoencoder's U-Net decoder.
- ``backbone``: the encoder is a frozen pretrained backbone (``load_backbone``) whose
  ``layers`` are resized to the finest one and concatenated, as in the autoencoder's
  ``backbone`` variant (``ReconstructionMember.backbone_code``; a hybrid's shared backbone pass
  is used when given), then the posterior 1x1 conv, the latent, and a trained decoder without
  skips with as many levels as the backbone's stride needs (``depth`` is not read). Only the
  posterior, the latent projection and the decoder train.

As the autoencoder (``members.autoencoder.ReconstructionMember``), the VAE models standardized
images ``x = (image - mean) / std`` (per-channel statistics of the training images, measured
before training) and standardizes its maps per pixel with their mean and spread on defect-free
images after training (``standardize_map``); see that module's docstring for why.

Training minimizes the negative ELBO per image, normalized by its number of values ``C*H*W``::

    loss = (sum of squared errors + beta * sum of KL(q(z|x) || N(0, I))) / (C * H * W)

(the KL summed over every latent variable, of every level for ``unet``). Divided by ``beta``,
the squared error (in standardized units) is the negative log-likelihood of a Gaussian decoder
with variance ``sigma**2 = beta / 2`` (up to a constant), so ``beta`` trades reconstruction
detail against latent regularity. The default ``beta = 1`` is the plain ELBO of a decoder with
``sigma`` = 0.7 standard deviations of the image; smaller values expect a closer
reconstruction and regularize the latent less.

Anomaly map (deterministic: the decoder gets the posterior means): the reconstruction error
(``"l2"`` or ``"ssim"``) plus ``kl_weight_in_map`` times the spatial KL map (KL summed over the
latent channels at each latent position, in nats, bilinearly upsampled, summed over the
latents), smoothed, then standardized per pixel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from members.autoencoder import MAP_METRICS, ReconstructionMember
from members.base import check_choice, gaussian_blur, register, upsample_map
from members.layers import Decoder, expand_latent, pad_to_multiple

VAE_ARCHITECTURES = ("vanilla", "unet", "backbone")

Posterior = tuple[torch.Tensor, torch.Tensor]  # mean and log-variance, [B, latent_channels, h, w]


@register("vae")
class VAE(ReconstructionMember):
    """Convolutional VAE with spatial Gaussian latents; the map is reconstruction error.

    Args:
        architecture: ``"vanilla"``, ``"unet"`` or ``"backbone"`` (see the module docstring).
        base_width, depth: encoder/decoder channels of the finest level (doubling per level, at
            most 8x) and number of resolution levels (the backbone architecture's decoder has as
            many as the backbone's stride needs).
        latent_channels: Gaussian latent variables per latent position (of every level's latent
            for ``unet``).
        beta: weight of the KL term against the summed squared error (see the module docstring).
        kl_weight_in_map: weight of the spatial KL map added to the error map (0: off).
        map_metric: ``"l2"`` or ``"ssim"`` reconstruction error.
        map_sigma: Gaussian smoothing of the map in pixels (0: none).
        standardize_map: divide the map per pixel by its spread on defect-free images (after
            subtracting its mean there).
        lr, weight_decay: AdamW.
        lr_schedule: ``"cosine"`` (per epoch over the trainer's ``max_epochs``) or
            ``"constant"``.
        backbone, layers, pretrained, weights_dir: the frozen encoder of the backbone
            architecture (ignored by the others); ``layers`` are timm feature indices.
    """

    option_choices = {"architecture": VAE_ARCHITECTURES}

    def __init__(
        self,
        architecture: str = "vanilla",
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
        backbone: str = "efficientnet_lite0",
        layers: tuple[int, ...] = (2,),
        pretrained: bool = True,
        weights_dir: str = "backbones",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_choice("architecture", architecture, VAE_ARCHITECTURES)
        check_choice("map_metric", map_metric, MAP_METRICS)
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if beta < 0 or kl_weight_in_map < 0:
            raise ValueError(
                f"beta and kl_weight_in_map must be >= 0, got {beta}, {kl_weight_in_map}"
            )
        self.architecture = architecture
        self.beta = beta
        self.kl_weight_in_map = kl_weight_in_map
        self.map_metric = map_metric
        self.map_sigma = map_sigma
        self.init_reconstruction(standardize_map, lr, weight_decay, lr_schedule)
        widths, code_channels = self.init_encoder(
            architecture == "backbone", base_width, depth, backbone, layers, pretrained, weights_dir
        )
        self.posterior = nn.Conv2d(code_channels, 2 * latent_channels, 1)  # mean and log-variance
        self.latent_decoder = expand_latent(latent_channels, widths[-1])
        self.decoder = Decoder(widths, 3, skip_connections=architecture == "unet")
        # Standardized targets have mean 0 (Decoder's default bias is mid-gray for [0, 1]).
        nn.init.zeros_(self.decoder.head.bias)
        # unet: the Gaussian latent of each skipped level, finest first (none otherwise).
        skipped = widths[:-1] if architecture == "unet" else []
        self.skip_posteriors = nn.ModuleList(nn.Conv2d(w, 2 * latent_channels, 1) for w in skipped)
        self.skip_decoders = nn.ModuleList(expand_latent(latent_channels, w) for w in skipped)

    def encode(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> list[Posterior]:
        """The posterior of every latent of ``images`` in [0, 1] (any size: padded to a multiple
        of ``input_multiple``): the coarsest latent's first, then (``unet``) the skipped levels',
        finest first. ``features``: a hybrid's shared backbone pass (``backbone``)."""
        if self.encoder is None:
            levels = [self.backbone_code(images, features)]
        else:
            levels = self.encoder(pad_to_multiple(self.standardize(images), self.input_multiple))
        codes = [levels[-1], *levels[: len(self.skip_posteriors)]]
        posteriors = []
        for head, code in zip([self.posterior, *self.skip_posteriors], codes, strict=True):
            mean, log_var = self.full_precision(head(code)).chunk(2, dim=1)
            # Bounded log-variance keeps exp() finite in half precision and early training.
            posteriors.append((mean, log_var.clamp(-30.0, 20.0)))
        return posteriors

    def decode(self, latents: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The standardized reconstruction ``[B, 3, *size]`` of latents in ``encode``'s order."""
        x = self.latent_decoder(latents[0])
        skips = [expand(z) for expand, z in zip(self.skip_decoders, latents[1:], strict=True)]
        reconstruction = self.decoder(x, [*skips, x] if skips else None)
        return reconstruction[..., : size[0], : size[1]]

    @staticmethod
    def kl_map(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(log_var)) || N(0, 1)) summed over latent channels: ``[B, 1, h, w]``."""
        return 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(dim=1, keepdim=True)

    def reconstruct(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        means = [mean for mean, _ in self.encode(images, features)]
        return self.decode(means, tuple(images.shape[-2:]))

    def raw_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if not self.kl_weight_in_map:
            return super().raw_map(images, features)
        size = tuple(images.shape[-2:])
        posteriors = self.encode(images, features)
        error = self.error_map(images, self.decode([mean for mean, _ in posteriors], size))
        padded = self.padded_size(size)
        kl = sum(upsample_map(self.kl_map(mean, log_var), padded) for mean, log_var in posteriors)
        error = error + self.kl_weight_in_map * kl[..., : size[0], : size[1]]
        return gaussian_blur(error, self.map_sigma)

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(-(-side // self.input_multiple) * self.input_multiple for side in size)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        posteriors = self.encode(images)
        # Reparameterization keeps the samples differentiable; the noise is drawn on the CPU so
        # the trainer's saved random state reproduces it on any device.
        latents = [
            mean + torch.randn(mean.shape).to(mean) * (0.5 * log_var).exp()
            for mean, log_var in posteriors
        ]
        reconstruction = self.full_precision(self.decode(latents, tuple(images.shape[-2:])))
        target = self.standardize(images)
        values = target[0].numel()
        squared_error = F.mse_loss(reconstruction, target, reduction="sum") / len(target)
        kl = sum(self.kl_map(mean, log_var).sum() for mean, log_var in posteriors) / len(target)
        loss = (squared_error + self.beta * kl) / values
        return {"loss": loss, "mse": squared_error.detach() / values, "kl": kl.detach()}

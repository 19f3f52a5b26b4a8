"""Network blocks and image helpers the reconstruction members share (``members.autoencoder``,
``members.vae``, ``members.draem``, ``members.efficientad``): conv blocks, a U-Net style encoder
and decoder, a 1x1 bottleneck and latent expansion, padding to a multiple of the network's
stride, and local SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from members.base import gaussian_blur

SSIM_SIGMA = 1.5  # Gaussian window of Wang et al. (2004)


def as_three_channels(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1 or 3, H, W]`` to ``[B, 3, H, W]``; other channel counts are an error."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad bottom and right so height and width are multiples of ``multiple``
    (encoders that halve the resolution ``k`` times need ``2**k``); crop results back."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


def level_widths(base_width: int, depth: int) -> list[int]:
    """Channels per resolution level: doubling from ``base_width``, capped at 8x (DRAEM)."""
    if base_width < 1 or depth < 1:
        raise ValueError(f"base_width and depth must be >= 1, got {base_width}, {depth}")
    return [base_width * min(2**level, 8) for level in range(depth)]


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """``len(widths)`` levels of ``conv_block``, max-pooled between levels; returns every
    level's output, finest first (the last is at ``1 / 2**(len(widths) - 1)``)."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.blocks = nn.ModuleList(conv_block(a, b) for a, b in zip(channels, channels[1:]))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        x = images
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            levels.append(x)
        return levels


class Decoder(nn.Module):
    """From the coarsest level back to full resolution: per level, bilinear x2 upsampling and a
    3x3 conv-BN-ReLU, then a ``conv_block`` (on the concatenation with the encoder's level when
    ``skip_connections``); a final 3x3 conv gives ``out_channels``."""

    def __init__(self, widths: list[int], out_channels: int, skip_connections: bool) -> None:
        super().__init__()
        self.skip_connections = skip_connections
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            width = widths[level]
            self.ups.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(widths[level + 1], width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            self.blocks.append(conv_block(2 * width if skip_connections else width, width))
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        # Start from mid-gray instead of black: the first steps then learn structure, not offset.
        nn.init.constant_(self.head.bias, 0.5)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        for i, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = up(x)
            if self.skip_connections:
                x = torch.cat((x, skips[-2 - i]), dim=1)
            x = block(x)
        return self.head(x)


def expand_latent(latent_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 conv-BN-ReLU from a latent code to a decoder level's ``out_channels``."""
    return nn.Sequential(
        nn.Conv2d(latent_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """A linear 1x1 projection to ``latent_channels`` per position and back."""

    def __init__(self, channels: int, latent_channels: int, out_channels: int) -> None:
        super().__init__()
        self.encode = nn.Conv2d(channels, latent_channels, 1)
        self.decode = expand_latent(latent_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _gaussian_filter_channels(x: torch.Tensor, sigma: float) -> torch.Tensor:
    batch, channels = x.shape[:2]
    return gaussian_blur(x.reshape(batch * channels, 1, *x.shape[-2:]), sigma).view_as(x)


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Local SSIM ``[B, 1, H, W]`` of images in [0, 1] (Gaussian window ``sigma``, data range 1),
    averaged over channels."""
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _gaussian_filter_channels(x, sigma), _gaussian_filter_channels(y, sigma)
    var_x = _gaussian_filter_channels(x * x, sigma) - mu_x**2
    var_y = _gaussian_filter_channels(y * y, sigma) - mu_y**2
    cov = _gaussian_filter_channels(x * y, sigma) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim.mean(dim=1, keepdim=True)

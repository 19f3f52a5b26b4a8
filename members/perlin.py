"""Perlin noise and DRAEM-style anomaly synthesis (Zavrtanik et al., ICCV 2021).

A synthetic anomaly is a thresholded Perlin-noise mask ``M`` (random scale, random rotation)
through which a texture ``A`` is blended into the normal image ``I``::

    I_a = (1 - M) * I + M * ((1 - beta) * A + beta * I),    beta ~ U[beta_range)

as in equation (1) of the paper (``beta`` is the opacity of the original image inside the mask).
The texture is an augmented image: from a texture folder, or another training image.

Every random number is drawn on the CPU from ``generator`` (the global torch generator when
None) and only then moved to the images' device, so the trainer's saved random states make a
resumed training draw exactly the same anomalies, on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at 0, 1.
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    size: tuple[int, int],
    res: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """2-D gradient (Perlin) noise ``[H, W]`` in about [-1, 1] with ``res`` = (rows, columns)
    lattice cells over the image; any image size works (cells need not divide it)."""
    height, width = size
    res_y, res_x = res
    if height < 1 or width < 1 or res_y < 1 or res_x < 1:
        raise ValueError(f"size and res must be positive, got size={size}, res={res}")
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).to(device)
    y = torch.arange(height, device=device, dtype=torch.float32) * (res_y / height)
    x = torch.arange(width, device=device, dtype=torch.float32) * (res_x / width)
    iy, ix = y.long(), x.long()
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[(iy + dy)[:, None], (ix + dx)[None, :]]  # [H, W, 2]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return math.sqrt(2) * torch.lerp(top, bottom, wy)


def perlin_masks(
    count: int,
    size: tuple[int, int],
    threshold: float = 0.5,
    scale_exponents: tuple[int, int] = (0, 6),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``count`` binary masks ``[count, 1, H, W]``: Perlin noise with ``2**k`` cells per axis
    (``k`` uniform in ``scale_exponents``, drawn per axis), rotated by a random angle in
    [-90, 90) degrees, thresholded at ``threshold``. A mask may come out empty."""
    low, high = scale_exponents
    if not 0 <= low <= high:
        raise ValueError(f"scale_exponents must be 0 <= low <= high, got {scale_exponents}")
    exponents = torch.randint(low, high + 1, (count, 2), generator=generator)
    angles = (torch.rand(count, generator=generator) - 0.5) * math.pi
    noise = torch.stack(
        [
            perlin_noise(size, (2 ** int(ky), 2 ** int(kx)), generator, device)
            for ky, kx in exponents
        ]
    ).unsqueeze(1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack((cos, -sin, zero, sin, cos, zero), dim=1).view(count, 2, 3).to(device)
    grid = F.affine_grid(theta, list(noise.shape), align_corners=False)
    # Outside the rotated field the noise is 0, below any positive threshold: no anomaly there.
    rotated = F.grid_sample(noise, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (rotated > threshold).float()


def _gamma(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0) ** (0.5 + 1.5 * u)


def _multiply_add(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x * (0.8 + 0.4 * u) + (u - 0.5) * 0.24


def _solarize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0.125 + 0.375 * u, 1 - x, x)


def _posterize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    levels = 2 ** (1 + torch.floor(4 * u))
    return torch.floor(x * levels) / levels


def _invert(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return 1 - x


def _autocontrast(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    low, high = x.amin(dim=(-3, -2, -1), keepdim=True), x.amax(dim=(-3, -2, -1), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-6)


# A torch counterpart of the paper's imgaug list (gamma, brightness, solarize, posterize,
# invert, autocontrast; colour and sharpness changes are left out: panels are mostly gray).
TEXTURE_AUGMENTATIONS = (_gamma, _multiply_add, _solarize, _posterize, _invert, _autocontrast)


def augment_textures(
    textures: torch.Tensor, n_ops: int = 3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image of ``[B, C, H, W]``: ``n_ops`` distinct intensity augmentations in random order
    with random strength, then a random flip and (square images) a random quarter turn."""
    out = []
    for texture in textures:
        ops = torch.randperm(len(TEXTURE_AUGMENTATIONS), generator=generator)[:n_ops]
        strengths = torch.rand(n_ops, generator=generator)
        flips = torch.rand(3, generator=generator) < 0.5
        for op, strength in zip(ops.tolist(), strengths):
            texture = TEXTURE_AUGMENTATIONS[op](texture, strength.to(texture.device)).clamp(0, 1)
        if flips[0]:
            texture = texture.flip(-1)
        if flips[1]:
            texture = texture.flip(-2)
        if flips[2] and texture.shape[-1] == texture.shape[-2]:
            texture = texture.transpose(-1, -2)
        out.append(texture)
    return torch.stack(out)


def synthesize_anomalies(
    images: torch.Tensor,
    textures: torch.Tensor,
    anomaly_probability: float = 0.5,
    beta_range: tuple[float, float] = (0.1, 1.0),
    threshold: float = 0.5,
    scale_exponents: tuple[int, int] = (0, 6),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend ``textures`` ``[B, C, H, W]`` into ``images`` through Perlin masks.

    Each image gets an anomaly with probability ``anomaly_probability`` (else it stays as is,
    with an empty mask). Returns ``(augmented images, masks [B, 1, H, W])``.
    """
    if textures.shape != images.shape:
        raise ValueError(
            f"textures {tuple(textures.shape)} must have the images' shape {tuple(images.shape)}"
        )
    low, high = beta_range
    if not 0 <= low <= high <= 1:
        raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}")
    count = images.shape[0]
    masks = perlin_masks(
        count, tuple(images.shape[-2:]), threshold, scale_exponents, generator, images.device
    )
    keep = torch.rand(count, generator=generator) < anomaly_probability
    beta = low + (high - low) * torch.rand(count, generator=generator)
    masks = masks * keep.to(masks).view(-1, 1, 1, 1)
    beta = beta.to(images).view(-1, 1, 1, 1)
    augmented = (1 - masks) * images + masks * ((1 - beta) * textures + beta * images)
    return augmented, masks

"""Tile grids and exact merging.

A grid covers an ``H x W`` image with ``tile_size`` tiles every ``stride`` pixels; the last row
and column are moved back to end exactly at the image edge, so there are no partial tiles and no
padding inside the image. An image smaller than a tile is an error unless a ``pad_mode`` is
given explicitly.

Merging divides a weighted sum by the accumulated weights, so merging the tiles of any map
gives that map back to float32 precision, borders and corners included. The ``hann`` and
``gaussian`` windows are floored at ``WINDOW_FLOOR`` (a Hann window is zero at its edges: pixels
covered only by tile edges, such as image corners, would otherwise get no weight at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "max", "hann", "gaussian")
PAD_MODES = ("reflect", "constant", "replicate")
WINDOW_FLOOR = 1e-3


def _positions(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)  # align the last tile with the edge
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Tile positions for an image of ``height x width``; ``coords`` rows are
    ``(y0, x0, y1, x1)`` in the (padded, if ``pad_mode``) image."""

    height: int
    width: int
    tile_size: int
    stride: int
    pad_mode: str | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width", "tile_size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.stride > self.tile_size:
            raise ValueError(
                f"stride ({self.stride}) is larger than tile_size ({self.tile_size}): "
                "pixels between tiles would never be inspected"
            )
        if self.pad_mode is not None and self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES} or None, got {self.pad_mode!r}")
        if min(self.height, self.width) < self.tile_size and self.pad_mode is None:
            raise ValueError(
                f"image of {self.width}x{self.height} px is smaller than one {self.tile_size} px "
                "tile; use a smaller tile_size or set pad_mode (reflect, constant, replicate)"
            )

    @property
    def padded_size(self) -> tuple[int, int]:
        return max(self.height, self.tile_size), max(self.width, self.tile_size)

    @property
    def coords(self) -> np.ndarray:
        ph, pw = self.padded_size
        ys = _positions(ph, self.tile_size, self.stride)
        xs = _positions(pw, self.tile_size, self.stride)
        t = self.tile_size
        return np.array([(y, x, y + t, x + t) for y in ys for x in xs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.coords)


def pad_image(image: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Pad ``[..., H, W]`` at the bottom and right up to one tile (only with a pad mode)."""
    ph, pw = grid.padded_size
    if (ph, pw) == tuple(image.shape[-2:]):
        return image
    pad = (0, pw - image.shape[-1], 0, ph - image.shape[-2])
    squeeze = image.ndim == 3
    batch = image[None] if squeeze else image
    out = F.pad(batch, pad, mode=grid.pad_mode if grid.pad_mode != "constant" else "constant")
    return out[0] if squeeze else out


def tile(
    image: torch.Tensor, tile_size: int, stride: int, pad_mode: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``[C, H, W]`` (or ``[1, C, H, W]``) into ``tiles [N, C, t, t]`` and ``coords [N, 4]``."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"tile() takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
    grid = TileGrid(int(image.shape[-2]), int(image.shape[-1]), tile_size, stride, pad_mode)
    padded = pad_image(image, grid)
    coords = torch.from_numpy(grid.coords)
    tiles = torch.stack([padded[:, y0:y1, x0:x1] for y0, x0, y1, x1 in coords.tolist()])
    return tiles, coords


@lru_cache(maxsize=16)
def _window(tile_size: int, reduction: str) -> np.ndarray:
    if reduction in ("mean", "max"):
        return np.ones((tile_size, tile_size), np.float64)
    if reduction == "hann":
        line = np.hanning(tile_size + 2)[1:-1]  # strictly positive inside
    elif reduction == "gaussian":
        sigma = tile_size / 4
        centre = (tile_size - 1) / 2
        line = np.exp(-((np.arange(tile_size) - centre) ** 2) / (2 * sigma**2))
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    window = np.outer(line, line)
    return np.maximum(window / window.max(), WINDOW_FLOOR)


def window(tile_size: int, reduction: str) -> np.ndarray:
    """The blending weights of one tile (a copy)."""
    return _window(tile_size, reduction).copy()


class MapAccumulator:
    """Accumulates tile maps into full-resolution float maps; ``result()`` divides by the
    weights (or takes the maximum). Memory: two ``[C, H, W]`` arrays, whatever the tile count."""

    def __init__(
        self, height: int, width: int, tile_size: int, reduction: str = "mean", channels: int = 1
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.tile_size = tile_size
        if reduction == "max":
            self.values = np.full((channels, height, width), -np.inf, np.float32)
            self.weights = None
        else:
            self.values = np.zeros((channels, height, width), np.float64)
            self.weights = np.zeros((height, width), np.float64)
        self.window = _window(tile_size, reduction)

    def add(self, maps: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor) -> None:
        """``maps [N, C, t, t]`` at ``coords [N, 4]`` (tiles may reach into the padding)."""
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().float().cpu().numpy()
        coords = np.asarray(coords)
        height, width = self.values.shape[-2:]
        for tile_map, (y0, x0, y1, x1) in zip(maps, coords):
            h, w = min(y1, height) - y0, min(x1, width) - x0
            if h <= 0 or w <= 0:
                continue
            region = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
            piece = tile_map[:, :h, :w]
            if self.weights is None:
                np.maximum(self.values[region], piece, out=self.values[region])
            else:
                weight = self.window[:h, :w]
                self.values[region] += piece * weight
                self.weights[region[1:]] += weight

    def result(self) -> np.ndarray:
        if self.weights is None:
            return self.values
        if (self.weights <= 0).any():
            raise ValueError("some pixels are covered by no tile")
        # Divide in row blocks: no full-size float64 temporary next to the two accumulators.
        merged = np.empty(self.values.shape, np.float32)
        for top in range(0, merged.shape[1], 512):
            rows = slice(top, top + 512)
            quotient = merged[:, rows]
            np.divide(self.values[:, rows], self.weights[rows], out=quotient, casting="unsafe")
        return merged


def untile(
    maps: torch.Tensor | np.ndarray,
    coords: torch.Tensor | np.ndarray,
    out_size: tuple[int, int],
    reduction: str = "mean",
) -> torch.Tensor:
    """Merge tile maps ``[N, C, t, t]`` at ``coords`` into ``[C, H, W]`` (``out_size = (H, W)``).
    Depends only on its arguments."""
    maps = torch.as_tensor(maps)
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"expected tile maps [N, C, t, t], got shape {tuple(maps.shape)}")
    accumulator = MapAccumulator(
        *out_size, tile_size=int(maps.shape[-1]), reduction=reduction, channels=int(maps.shape[1])
    )
    accumulator.add(maps, coords)
    return torch.from_numpy(accumulator.result())

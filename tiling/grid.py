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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
    """Merges tile maps into full-resolution float32 maps, a band of rows at a time.

    Tiles come in raster order (non-decreasing top row; ``TileGrid.coords`` order). Once a tile
    starts lower than the rows still open, those rows can get no more tiles: they are divided
    by their weights (or, for ``max``, taken as they are) and written to ``out``, and the band
    moves down. Memory: a band ``tile_size`` rows high (float64 sums and weights) besides
    ``out``, whatever the image's size or tile count. ``out``: one ``[H, W]`` target per channel
    that takes whole rows (``out[c][rows] = values``: the rows of an array, a
    ``tiling.visualize.MapOnDisk``); a new float32 ``[C, H, W]`` array by default."""

    def __init__(
        self,
        height: int,
        width: int,
        tile_size: int,
        reduction: str = "mean",
        channels: int = 1,
        out: Sequence[Any] | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.tile_size = tile_size
        self.height, self.width = height, width
        if out is None:
            out = np.empty((channels, height, width), np.float32)
        if len(out) != channels or any(tuple(o.shape) != (height, width) for o in out):
            raise ValueError(f"out must hold {channels} maps of {height} x {width}")
        self.out = out
        self.top = 0  # the first row not yet written to ``out``
        band = min(tile_size, height)
        if reduction == "max":
            self.values = np.full((channels, band, width), -np.inf, np.float32)
            self.weights = None
        else:
            self.values = np.zeros((channels, band, width), np.float64)
            self.weights = np.zeros((band, width), np.float64)
        self.window = _window(tile_size, reduction)

    def add(self, maps: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor) -> None:
        """``maps [N, C, t, t]`` at ``coords [N, 4]`` (tiles may reach past the image's edge,
        into padding). A tile above rows already written is an error."""
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().float().cpu().numpy()
        coords = np.asarray(coords)
        for k in np.argsort(coords[:, 0], kind="stable"):
            y0, x0, y1, x1 = (int(v) for v in coords[k])
            if y0 < self.top:
                raise ValueError(
                    f"a tile at row {y0} came after rows up to {self.top} were merged: "
                    "tiles must come in raster order"
                )
            self._write_rows_above(min(y0, self.height))
            h, w = min(y1, self.height) - y0, min(x1, self.width) - x0
            if h <= 0 or w <= 0:
                continue
            band = (slice(None), slice(y0 - self.top, y0 - self.top + h), slice(x0, x0 + w))
            piece = maps[k][:, :h, :w]
            if self.weights is None:
                np.maximum(self.values[band], piece, out=self.values[band])
            else:
                weight = self.window[:h, :w]
                self.values[band] += piece * weight
                self.weights[band[1:]] += weight

    def _write_rows_above(self, row: int) -> None:
        """Write the merged rows from ``top`` down to ``row`` (exclusive) and move the band."""
        count = row - self.top
        if count <= 0:
            return
        band = self.values.shape[1]
        for start in range(0, count, band):  # a jump of more than a band: rows no tile covers
            rows = min(band, count - start)
            self._write(rows)
            self.values[:, : band - rows] = self.values[:, rows:].copy()
            self.values[:, band - rows :] = -np.inf if self.weights is None else 0.0
            if self.weights is not None:
                self.weights[: band - rows] = self.weights[rows:].copy()
                self.weights[band - rows :] = 0.0
            self.top += rows

    def _write(self, rows: int) -> None:
        """Write the band's first ``rows`` rows to ``out`` at ``top``."""
        target = slice(self.top, self.top + rows)
        if self.weights is None:
            for channel, values in zip(self.out, self.values[:, :rows]):
                channel[target] = values
            return
        weights = self.weights[:rows]
        if (weights <= 0).any():
            raise ValueError("some pixels are covered by no tile")
        for channel, values in zip(self.out, self.values[:, :rows]):
            channel[target] = (values / weights).astype(np.float32)

    def result(self) -> Sequence[Any]:
        """``out``, with every row written (call once all tiles are added)."""
        self._write_rows_above(self.height)
        return self.out


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

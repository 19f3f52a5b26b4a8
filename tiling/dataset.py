"""Training and evaluating members on tiles of high-resolution images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tiling.grid import TileGrid, pad_image


class TiledDataset(Dataset):
    """Tiles of a dataset's samples, as samples themselves (with ``tile_coords`` and the
    source ``path``).

    ``mode="all"``: every tile of every image (the grid of ``tile_size``/``stride``).
    ``mode="random"``: ``crops_per_image`` random crops per image, drawn anew each epoch from
    ``(seed, epoch)`` (call ``set_epoch``), so every member can train on tiles of any size.
    Images are read once per access: nothing holds all of them in memory.
    """

    def __init__(
        self,
        base: Dataset,
        tile_size: int,
        stride: int | None = None,
        mode: str = "all",
        crops_per_image: int = 4,
        seed: int = 0,
        pad_mode: str | None = None,
    ) -> None:
        if mode not in ("all", "random"):
            raise ValueError(f"mode must be 'all' or 'random', got {mode!r}")
        self.base = base
        self.tile_size = tile_size
        self.stride = stride or tile_size
        self.mode = mode
        self.crops_per_image = crops_per_image
        self.seed = seed
        self.pad_mode = pad_mode
        self.epoch = 0
        self.index: list[tuple[int, tuple[int, int, int, int] | None]] = []
        for i in range(len(base)):
            if mode == "random":
                self.index.extend((i, None) for _ in range(crops_per_image))
            else:
                height, width = self._shape(i)
                grid = TileGrid(height, width, tile_size, self.stride, pad_mode)
                self.index.extend((i, tuple(int(v) for v in c)) for c in grid.coords)

    @property
    def has_masks(self) -> bool:
        return getattr(self.base, "has_masks", True)

    def _shape(self, i: int) -> tuple[int, int]:
        entry = getattr(self.base, "entries", None)
        if entry is not None:
            from PIL import Image

            path = entry[i].path
            if path.suffix.lower() != ".npy":
                with Image.open(path) as image:
                    return image.height, image.width
        image = self.base[i]["image"]
        return int(image.shape[-2]), int(image.shape[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, coords = self.index[k]
        sample = self.base[i]
        image, mask = sample["image"], sample["mask"]
        height, width = image.shape[-2:]
        grid = TileGrid(int(height), int(width), self.tile_size, self.stride, self.pad_mode)
        image, mask = pad_image(image, grid), pad_image(mask, grid)
        if coords is None:
            rng = np.random.default_rng([self.seed, self.epoch, k])
            ph, pw = grid.padded_size
            y0 = int(rng.integers(0, ph - self.tile_size + 1))
            x0 = int(rng.integers(0, pw - self.tile_size + 1))
            coords = (y0, x0, y0 + self.tile_size, x0 + self.tile_size)
        y0, x0, y1, x1 = coords
        tile_mask = mask[:, y0:y1, x0:x1]
        return {
            **{k: v for k, v in sample.items() if k not in ("image", "mask", "instances")},
            "image": image[:, y0:y1, x0:x1].contiguous(),
            "mask": tile_mask.contiguous(),
            "label": int(tile_mask.any()) if sample["label"] else 0,
            "tile_coords": torch.tensor(coords),
        }


def evaluate_tiled(
    member: torch.nn.Module,
    dataset: Dataset,
    tile_size: int,
    stride: int,
    batch_size: int = 8,
    reduction: str = "hann",
    resize_to: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Full-resolution maps of every image of ``dataset`` with their original masks:
    yields ``{"anomaly_map" [1,H,W], "mask" [1,H,W], "label", "score", "path"}``."""
    from tiling.inference import infer_tiled

    for i in range(len(dataset)):
        sample = dataset[i]
        out = infer_tiled(
            member, sample["image"], tile_size, stride, batch_size, reduction, resize_to
        )
        yield {
            "anomaly_map": out["anomaly_map"],
            "mask": sample["mask"].numpy(),
            "label": sample["label"],
            "score": out["pred_score"],
            "path": sample["path"],
        }

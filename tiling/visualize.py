"""Heatmap overlays at original resolution (with a downsampled preview for huge images) and
full-resolution maps saved losslessly."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from artifacts.io import atomic_write_bytes
from data.images import to_array

# A perceptually ordered blue-to-red colormap (anchor colours of "turbo"), interpolated.
_ANCHORS = np.array(
    [
        [0.19, 0.07, 0.23],
        [0.27, 0.51, 0.96],
        [0.10, 0.84, 0.75],
        [0.64, 0.99, 0.24],
        [0.98, 0.73, 0.22],
        [0.89, 0.27, 0.05],
        [0.48, 0.02, 0.01],
    ]
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB floats ``[..., 3]``."""
    positions = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(positions).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (positions - low)[..., None]
    return _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaging resize of ``[H, W]`` or ``[H, W, 3]`` floats to ``size = (H, W)``."""
    if array.shape[:2] == size:
        return array
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[-1])]
    out = [np.asarray(Image.fromarray(c).resize(size[::-1], Image.BOX)) for c in channels]
    return out[0] if array.ndim == 2 else np.stack(out, axis=-1)


def save_heatmap_overlay(
    image: Any,
    anomaly_map: Any,
    path: str | os.PathLike,
    max_preview_side: int = 2048,
    alpha: float = 0.45,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write a PNG of ``image`` with ``anomaly_map`` blended over it in colour.

    Images larger than ``max_preview_side`` are written as a downsampled preview (save the map
    itself with ``save_anomaly_map``). The colour scale runs from ``vmin`` to ``vmax`` (the
    map's own range by default)."""
    picture, heat = to_array(image), to_array(anomaly_map)
    if heat.ndim != 2:
        raise ValueError(f"anomaly_map must be one channel, got shape {heat.shape}")
    if picture.shape[:2] != heat.shape:
        raise ValueError(f"image {picture.shape[:2]} and anomaly map {heat.shape} differ in size")
    height, width = heat.shape
    scale = min(1.0, max_preview_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    picture, heat = _resize(picture, size), _resize(heat, size)
    if picture.ndim == 2:
        picture = picture[..., None]  # grey: the same value in each colour channel
    low = float(np.min(heat)) if vmin is None else vmin
    high = float(np.max(heat)) if vmax is None else vmax
    rgb = np.empty((*size, 3), np.uint8)
    # Blended in bands of rows: a full panel's float RGB would be gigabytes.
    for start in range(0, size[0], 256):
        rows = slice(start, start + 256)
        normalized = (heat[rows] - low) / max(high - low, 1e-12)
        blended = (1 - alpha) * np.clip(picture[rows], 0, 1) + alpha * colormap(normalized)
        rgb[rows] = np.round(blended * 255).astype(np.uint8)
    buffer = io.BytesIO()
    # Fast compression: a full panel's overlay at the default level takes tens of seconds.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return atomic_write_bytes(path, buffer.getvalue())


def save_anomaly_map(anomaly_map: Any, path: str | os.PathLike) -> Path:
    """Write the full-resolution map: ``.npy`` keeps float32 exactly; ``.png`` writes 16 bits
    scaled to the map's range (the range goes into the PNG's text chunk ``range``)."""
    path = Path(path)
    heat = to_array(anomaly_map)
    buffer = io.BytesIO()
    if path.suffix == ".npy":
        np.save(buffer, heat.astype(np.float32))
    elif path.suffix == ".png":
        from PIL import PngImagePlugin

        low, high = float(heat.min()), float(heat.max())
        scaled = np.round((heat - low) / max(high - low, 1e-12) * 65535).astype(np.uint16)
        info = PngImagePlugin.PngInfo()
        info.add_text("range", f"{low!r} {high!r}")
        Image.fromarray(scaled).save(buffer, format="PNG", pnginfo=info)
    else:
        raise ValueError(f"save_anomaly_map writes .npy or .png, not {path.suffix!r}")
    return atomic_write_bytes(path, buffer.getvalue())

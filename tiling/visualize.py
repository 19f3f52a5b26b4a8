"""Heatmap overlays at original resolution (with a downsampled preview for huge images),
full-resolution maps saved losslessly. A panel's overlay and map are written a band of rows at a
time (``data.maps.band_rows``), never whole in memory.

An overlay can show the decision drawn over the heatmap (``Decision``), in colours the heatmap
does not use, each drawn opaque over the blend and around what it marks, never over it (a
defect of a few pixels stays in view):

- the pixel threshold's contour, white: a line just outside the pixels at or above it (those
  region finding starts from);
- the true mask's outline, green (evaluation, where a mask is known), drawn the same way;
- each region's box, magenta, just outside the region's bounding box, with its label (type and
  level) on a magenta tag above the box (below it, or over its top, where there is no room).

Lines are ``line_width(size)`` pixels wide, so they stay visible on a full panel viewed whole.
In a downsampled preview, a preview pixel is at or above the threshold, or in the mask, where
any of its pixels is.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from artifacts.io import atomic_write_bytes, atomic_write_chunks
from data.images import integer_scale, to_array
from data.maps import MapOnDisk, band_rows

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


CONTOUR_RGB = (255, 255, 255)
TRUTH_RGB = (0, 255, 0)
BOX_RGB = (255, 0, 255)
LABEL_TEXT_RGB = (0, 0, 0)


@dataclass(frozen=True)
class Decision:
    """What an overlay draws over its heatmap (see the module docstring).

    Attributes:
        threshold: the pixel threshold on the map's values; its contour is drawn (None: none).
        boxes: ``(bbox, label)`` per region, ``bbox = [x0, y0, x1, y1]`` in the map's pixels
            with exclusive ends (``grading.regions.Region.bbox``).
        truth: the true defect mask ``[H, W]`` (nonzero: defect) at the map's size, or None.
    """

    threshold: float | None = None
    boxes: Sequence[tuple[Sequence[int], str]] = ()
    truth: Any = None


def line_width(size: tuple[int, int]) -> int:
    """Pixels per drawn line on an overlay of ``size``: ``max(size) / 1024`` rounded (1 up to
    1535 px a side), so a line keeps about the same width on screen when a panel is fitted to
    it."""
    return max(1, round(max(size) / 1024))


@lru_cache(maxsize=256)
def _label_tag(text: str, height: int) -> np.ndarray:
    """A region's label: ``text`` in black on a magenta tag ``height`` pixels high, RGB uint8."""
    try:
        font = ImageFont.load_default(size=height - 4)
    except (TypeError, ImportError):  # Pillow before 10.1, or built without FreeType
        font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    tag = Image.new("RGB", (right - left + 4, height), BOX_RGB)
    ImageDraw.Draw(tag).text(
        (2 - left, (height - (bottom - top)) // 2 - top), text, LABEL_TEXT_RGB, font
    )
    return np.asarray(tag)


def _ring(inside: np.ndarray, width: int) -> np.ndarray:
    """The pixels outside ``inside`` (bool) within ``width`` steps (up, down, left, right) of it:
    a line drawn around a region leaves the region's own pixels, however small, in view."""
    cross = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(inside, cross, iterations=width) & ~inside


def _shrink(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size``: a pixel of the smaller mask is set where any pixel under it is, so
    a defect smaller than a preview pixel still shows."""
    return mask if mask.shape == size else _resize(mask.astype(np.float32), size) > 0


class _DecisionPainter:
    """Draws a ``Decision`` onto bands of an overlay of ``size`` made from ``anomaly_map``. In a
    preview, the pixels at or above the threshold and the true mask are shrunk as ``_shrink``
    does (a small region keeps its contour), and box coordinates scale."""

    def __init__(self, decision: Decision, anomaly_map: Any, size: tuple[int, int]) -> None:
        self.threshold = decision.threshold
        self.size = size
        self.width = width = line_width(size)
        map_shape = tuple(anomaly_map.shape)
        preview = size != map_shape
        # Layers as bool arrays at the overlay's size; at full size the threshold's is made from
        # each band's rows as they are read (``paint``).
        self.above = None
        if preview and self.threshold is not None:
            self.above = _shrink(np.asarray(anomaly_map) >= self.threshold, size)
        self.truth = None
        if decision.truth is not None:
            truth = np.asarray(decision.truth)
            if truth.shape != map_shape:
                raise ValueError(f"true mask {truth.shape} and anomaly map {map_shape} differ")
            self.truth = _shrink(truth.astype(bool), size)
        scale_y, scale_x = size[0] / map_shape[0], size[1] / map_shape[1]
        tag_height = 11 + 3 * width
        self.boxes = []
        for (x0, y0, x1, y1), label in decision.boxes:
            x0, y0 = int(np.floor(x0 * scale_x)), int(np.floor(y0 * scale_y))
            x1, y1 = (
                max(int(np.ceil(x1 * scale_x)), x0 + 1),
                max(int(np.ceil(y1 * scale_y)), y0 + 1),
            )
            tag = _label_tag(label, tag_height)
            # Above the box's line where there is room, else below it, else over the box's top.
            if y0 - width >= len(tag):
                tag_y = y0 - width - len(tag)
            elif y1 + width + len(tag) <= size[0]:
                tag_y = y1 + width
            else:
                tag_y = max(0, y0)
            tag_x = max(0, min(x0 - width, size[1] - tag.shape[1]))
            self.boxes.append(((x0, y0, x1, y1), tag, tag_y, tag_x))

    def paint(self, band: np.ndarray, start: int, context: slice, block: np.ndarray) -> None:
        """Draw onto ``band`` (rows ``start`` on of the overlay, ``[n, W, 3]`` uint8).
        ``block``: the map's rows ``context`` at the overlay's size, the band's and ``width``
        more on each side where there are (a line reaches that far)."""
        width, stop = self.width, start + len(band)
        rows = slice(start - context.start, stop - context.start)
        layers = []
        if self.threshold is not None:
            above = block >= self.threshold if self.above is None else self.above[context]
            layers.append((above, CONTOUR_RGB))
        if self.truth is not None:
            layers.append((self.truth[context], TRUTH_RGB))
        for inside, colour in layers:
            if inside.any():
                band[_ring(inside, width)[rows]] = colour
        for (x0, y0, x1, y1), _, _, _ in self.boxes:
            outer_x0, outer_x1 = x0 - width, x1 + width
            strips = (
                (y0 - width, y0, outer_x0, outer_x1),  # top
                (y1, y1 + width, outer_x0, outer_x1),  # bottom
                (y0, y1, outer_x0, x0),  # left
                (y0, y1, x1, outer_x1),  # right
            )
            for top, bottom, left, right in strips:
                top, bottom = max(top, start), min(bottom, stop)
                left, right = max(left, 0), min(right, self.size[1])
                if top < bottom and left < right:
                    band[top - start : bottom - start, left:right] = BOX_RGB
        for _, tag, tag_y, tag_x in self.boxes:
            top, bottom = max(tag_y, start), min(tag_y + len(tag), stop)
            if top < bottom:
                part = tag[top - tag_y : bottom - tag_y, : self.size[1] - tag_x]
                band[top - start : bottom - start, tag_x : tag_x + part.shape[1]] = part


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
    decision: Decision | None = None,
) -> Path:
    """Write a PNG of ``image`` with ``anomaly_map`` (an array or a ``MapOnDisk``) blended over
    it in colour, and ``decision`` drawn over both (see the module docstring).

    Images larger than ``max_preview_side`` are written as a downsampled preview (save the map
    itself with ``save_anomaly_map``). The colour scale runs from ``vmin`` to ``vmax`` (the
    map's own range by default). At full size the overlay is blended and written a band of rows
    at a time: a panel's RGB image would be hundreds of megabytes; an integer image ``[H, W]``
    or ``[H, W, 3]`` (a panel as its file holds it) is converted a band at a time too."""
    rows_of_integers = (
        isinstance(image, np.ndarray)
        and np.issubdtype(image.dtype, np.integer)
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3))
    )
    picture = image if rows_of_integers else to_array(image)
    heat = anomaly_map if isinstance(anomaly_map, MapOnDisk) else to_array(anomaly_map)
    if heat.ndim != 2:
        raise ValueError(f"anomaly_map must be one channel, got shape {heat.shape}")
    if picture.shape[:2] != heat.shape:
        raise ValueError(f"image {picture.shape[:2]} and anomaly map {heat.shape} differ in size")
    height, width = heat.shape
    scale = min(1.0, max_preview_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    full = heat
    if size != heat.shape:
        full = np.asarray(heat)
        picture, heat = _resize(to_array(picture), size), _resize(full, size)
    if picture.ndim == 2:
        picture = picture[..., None]  # grey: the same value in each colour channel
    low = float(heat.min()) if vmin is None else vmin
    high = float(heat.max()) if vmax is None else vmax
    painter = _DecisionPainter(decision, full, size) if decision else None
    reach = painter.width if painter else 0

    def bands() -> Iterator[np.ndarray]:
        step = band_rows(size[1])
        for start in range(0, size[0], step):
            stop = min(start + step, size[0])
            # The band's rows and the painter's reach around them, read once.
            context = slice(max(0, start - reach), min(size[0], stop + reach))
            block = np.asarray(heat[context])
            normalized = (block[start - context.start : stop - context.start] - low) / max(
                high - low, 1e-12
            )
            values = picture[start:stop]
            if np.issubdtype(values.dtype, np.integer):
                values = np.divide(values, integer_scale(values.dtype), dtype=np.float32)
            blended = (1 - alpha) * np.clip(values, 0, 1) + alpha * colormap(normalized)
            band = np.round(blended * 255).astype(np.uint8)
            if painter:
                painter.paint(band, start, context, block)
            yield band

    return atomic_write_chunks(path, _png_chunks(size, bands()))


def _png_chunks(size: tuple[int, int], bands: Iterable[np.ndarray]) -> Iterator[bytes]:
    """An 8-bit RGB PNG of ``size = (H, W)`` from its rows, ``[n, W, 3]`` uint8 bands in order,
    encoded as they come: each row Sub-filtered (smooth overlays compress well so), zlib at its
    fastest level (a full panel's overlay at the default level takes tens of seconds)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width = size
    yield b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )
    compressor = zlib.compressobj(1)
    for band in bands:
        flat = band.reshape(len(band), width * 3)
        rows = np.empty((len(band), 1 + width * 3), np.uint8)
        rows[:, 0] = 1  # the Sub filter: each byte less the same channel's byte to its left
        rows[:, 1:4] = flat[:, :3]
        np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])  # modulo 256, as PNG wants
        data = compressor.compress(rows.tobytes())
        if data:
            yield chunk(b"IDAT", data)
    yield chunk(b"IDAT", compressor.flush()) + chunk(b"IEND", b"")


def save_anomaly_map(anomaly_map: Any, path: str | os.PathLike) -> Path:
    """Write the full-resolution map (an array or a ``MapOnDisk``): ``.npy`` keeps float32
    exactly (written a band of rows at a time); ``.png`` writes 16 bits scaled to the map's
    range (the range goes into the PNG's text chunk ``range``)."""
    path = Path(path)
    heat = anomaly_map if isinstance(anomaly_map, MapOnDisk) else to_array(anomaly_map)
    if path.suffix == ".npy":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": tuple(heat.shape)}
        )
        step = band_rows(heat.shape[-1])
        bands = (
            np.ascontiguousarray(heat[start : start + step], dtype="<f4").tobytes()
            for start in range(0, heat.shape[0], step)
        )
        return atomic_write_chunks(path, [header.getvalue(), *bands])
    if path.suffix != ".png":
        raise ValueError(f"save_anomaly_map writes .npy or .png, not {path.suffix!r}")
    from PIL import PngImagePlugin

    heat = np.asarray(heat)
    buffer = io.BytesIO()
    low, high = float(heat.min()), float(heat.max())
    scaled = np.round((heat - low) / max(high - low, 1e-12) * 65535).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("range", f"{low!r} {high!r}")
    Image.fromarray(scaled).save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())

"""Streaming tiled inference for images far larger than one tensor of tiles.

Tiles are cut and sent through the member ``batch_size`` at a time, in raster order, and their
maps merge into a band of rows (``MapAccumulator``) that is written out, divided by its
weights, as soon as no later tile can reach it: into one float32 full-resolution map per
channel, in memory, or on disk (``map_folder``: a ``MapOnDisk`` per channel). Peak memory is
the member, one batch of tiles (in and out, plus the member's activations), the band, and the
merged maps unless they are on disk, whatever the number of tiles; ``estimate_memory``
predicts it. An image given as a ``LazyImage`` is converted tile by tile, never whole.

The image score of a tiled image follows the member's ``score_from_tiles`` attribute:

- ``"map"`` (the default, also when the attribute is absent): the member's own
  ``compute_anomaly_score`` of the merged full-resolution map, for members whose image score is
  an aggregation of their map;
- ``"max"``: the largest of the member's own per-tile ``pred_score``, for members whose image
  score is not a function of their map (PatchCore's reweighted raw patch distance).

A module answering with several map channels (a ``MemberSet``, one channel per member) gives one
mode per channel, a sequence, and gets one score per channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.images import LazyImage, integer_scale, to_tensor
from data.maps import MapOnDisk
from tiling.grid import MapAccumulator, TileGrid, pad_image

TILE_SCORES = ("map", "max")


class _TileReader:
    """Tiles of one image, converted to float32 one at a time.

    A tensor is used as it is. An array (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``; a
    ``numpy.memmap`` included) is never converted whole: each tile is sliced, cast and, for
    integer images, scaled to [0, 1] on its own, so a file-backed image is read only as its
    tiles are needed. A ``LazyImage`` (``[H, W]`` or ``[H, W, 3]``) gives each tile converted by
    its own window, three channels as ``to_tensor`` makes them (a grey one's repeated). Only an
    image smaller than a tile, which must be padded, is converted whole.
    """

    def __init__(self, image: Any) -> None:
        self.lazy = isinstance(image, LazyImage)
        if self.lazy:
            self.source = image
            self.height, self.width = image.shape[:2]
            return
        if isinstance(image, torch.Tensor):
            source = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
            self.channels_last, self.scale = False, 1.0
        else:
            source = image if isinstance(image, np.ndarray) else np.asarray(image)
            self.channels_last = (
                source.ndim == 3 and source.shape[-1] in (1, 3, 4) and source.shape[0] not in (1, 3)
            )
            self.scale = integer_scale(source.dtype)
        source = source[None] if source.ndim == 2 else source
        if source.ndim != 3:
            raise ValueError(f"expected one image [C, H, W], got shape {tuple(source.shape)}")
        self.source = source
        shape = source.shape
        self.height, self.width = (shape[0], shape[1]) if self.channels_last else shape[1:]

    def pad_to(self, grid: TileGrid) -> None:
        """Convert and pad the whole image up to ``grid``'s padded size (only when needed)."""
        if grid.padded_size != (self.height, self.width):
            whole = to_tensor(np.asarray(self.source)) if self.lazy else self._float(self.source)
            self.source = pad_image(whole, grid)
            self.lazy, self.channels_last, self.scale = False, False, 1.0

    def _float(self, block: Any) -> torch.Tensor:
        if isinstance(block, torch.Tensor):
            return block.float()
        tensor = torch.from_numpy(np.ascontiguousarray(block).astype(np.float32, copy=False))
        tensor = tensor.permute(2, 0, 1) if self.channels_last else tensor
        return tensor / self.scale if self.scale != 1.0 else tensor

    def read(self, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
        """The ``[C, y1 - y0, x1 - x0]`` float32 tile at these coordinates."""
        if self.lazy:
            return to_tensor(self.source[y0:y1, x0:x1])
        if self.channels_last:
            return self._float(self.source[y0:y1, x0:x1])
        return self._float(self.source[:, y0:y1, x0:x1])


def _run(
    member: nn.Module, tiles: torch.Tensor, resize_to: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The member's maps ``[b, C, t, t]`` (at the tiles' size) and scores of one tile batch."""
    size = tiles.shape[-1]
    if resize_to is not None and resize_to != size:
        tiles = F.interpolate(
            tiles, size=(resize_to, resize_to), mode="bilinear", antialias=True, align_corners=False
        )
    out = member.predict(tiles) if hasattr(member, "predict") else member(tiles)
    maps = out["anomaly_map"].float()
    if maps.shape[-1] != size:
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return maps, out["pred_score"]


def tile_score_modes(member: nn.Module, channels: int) -> list[str]:
    """Each map channel's ``score_from_tiles`` mode (see the module docstring)."""
    declared = getattr(member, "score_from_tiles", "map")
    modes = [declared] * channels if isinstance(declared, str) else list(declared)
    if len(modes) != channels or any(mode not in TILE_SCORES for mode in modes):
        raise ValueError(
            f"score_from_tiles must be one of {TILE_SCORES} or one per map channel "
            f"({channels}), got {declared!r}"
        )
    return modes


def _channel_aggregator(member: nn.Module, channel: int, channels: int, shape: tuple) -> Any:
    """The ``ScoreAggregator`` that scores channel ``channel`` of ``member``'s map given in bands
    (``channel_score_aggregator`` of a ``MemberSet``, ``score_aggregator`` of a one-channel
    member), or None where it needs the map whole."""
    if hasattr(member, "channel_score_aggregator"):
        return member.channel_score_aggregator(channel, *shape)
    if channels == 1 and hasattr(member, "score_aggregator"):
        return member.score_aggregator(*shape)
    return None


def _channel_score(member: nn.Module, channel: int, merged: Sequence[Any]) -> float:
    """The image score of channel ``channel`` of the merged maps, where the module scores a
    channel on its own (``compute_channel_score``). A map on disk is read a band of rows at a
    time where the member's score is an aggregation of its pixels, whole otherwise."""
    channel_map = merged[channel]
    if not isinstance(channel_map, np.ndarray):
        aggregator = _channel_aggregator(member, channel, len(merged), channel_map.shape)
        if aggregator is not None:
            for band in channel_map.bands():
                aggregator.update(torch.from_numpy(band)[None, None])
            return float(aggregator.result()[0])
        channel_map = np.asarray(channel_map)
    return float(
        member.compute_channel_score(channel, torch.from_numpy(channel_map)[None, None])[0]
    )


def _image_scores(
    member: nn.Module,
    merged: Sequence[Any],
    modes: Sequence[str],
    tile_scores: list[torch.Tensor],
) -> torch.Tensor:
    """One image score per map channel of the merged maps (``[H, W]`` each; arrays or
    ``MapOnDisk``). A module that scores a channel on its own (``compute_channel_score``, as a
    ``MemberSet`` does) gets one channel at a time (``_channel_score``)."""
    scores = torch.empty(len(modes), dtype=torch.float64)
    if "max" in modes:
        from_tiles = torch.cat(tile_scores).amax(0)
    by_channel = hasattr(member, "compute_channel_score")
    if "map" in modes and not by_channel:
        stacked = merged if isinstance(merged, np.ndarray) else np.stack(merged)
        from_map = member.compute_anomaly_score(torch.from_numpy(stacked)[None])[0].reshape(-1)
    for channel, mode in enumerate(modes):
        if mode == "max":
            scores[channel] = from_tiles[channel]
        elif by_channel:
            scores[channel] = _channel_score(member, channel, merged)
        else:
            scores[channel] = float(from_map[channel])
    return scores


@torch.no_grad()
def infer_tiled(
    member: nn.Module,
    image: Any,
    tile_size: int,
    stride: int,
    batch_size: int = 8,
    reduction: str = "hann",
    resize_to: int | None = None,
    pad_mode: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    map_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Anomaly map of ``image`` at its full resolution, computed tile by tile.

    ``image``: ``[C, H, W]`` tensor, or an array (``[H, W]``, ``[H, W, C]``, ``[C, H, W]``;
    integer arrays are scaled to [0, 1]; a ``numpy.memmap`` is read tile by tile), or a
    ``LazyImage`` (converted tile by tile).
    ``resize_to``: feed tiles to the member at this side (for members fitted at a fixed size);
    maps are resized back. Returns ``{"anomaly_map": float32 ndarray [1, H, W],
    "pred_score": float}``, the score being the member's own aggregation of the merged map or,
    for a member with ``score_from_tiles = "max"``, the largest of its per-tile scores.
    A module answering with several map channels (a ``MemberSet``: one per member) gets
    ``[C, H, W]`` and one score per channel. With ``map_folder``, the map is a list of ``C``
    ``MapOnDisk`` in temporary files there (a panel's maps stay out of memory; close them when
    done).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    reader = _TileReader(image)
    height, width = int(reader.height), int(reader.width)
    grid = TileGrid(height, width, tile_size, stride, pad_mode)
    reader.pad_to(grid)
    if device is None:
        device = next((p.device for p in member.parameters()), torch.device("cpu"))
    accumulator = None
    modes: list[str] = []
    tile_scores: list[torch.Tensor] = []  # [b, C] per batch, kept only for "max" channels
    coords = grid.coords
    from tqdm.auto import tqdm

    for start in tqdm(
        range(0, len(coords), batch_size), desc="tiles", disable=not progress, leave=False
    ):
        chunk = coords[start : start + batch_size]
        tiles = torch.stack([reader.read(*box) for box in chunk.tolist()])
        maps, scores = _run(member, tiles.to(device, torch.float32), resize_to)
        if accumulator is None:  # as many channels as the member's maps have
            channels = int(maps.shape[1])
            out = None
            if map_folder is not None:
                out = [MapOnDisk((height, width), map_folder) for _ in range(channels)]
            # At the image's size: what tiles add to the padding is never needed.
            accumulator = MapAccumulator(height, width, tile_size, reduction, channels, out)
            modes = tile_score_modes(member, channels)
        accumulator.add(maps, chunk)
        if "max" in modes:
            tile_scores.append(scores.detach().double().cpu().reshape(len(chunk), -1))
    merged = accumulator.result()
    accumulator = None  # its band is not needed to score the maps
    image_scores = _image_scores(member, merged, modes, tile_scores)
    score = float(image_scores) if image_scores.numel() == 1 else image_scores.numpy()
    return {"anomaly_map": merged, "pred_score": score}


def infer_tiled_options(section: Mapping[str, Any]) -> dict[str, Any]:
    """``infer_tiled``'s keywords (``tile_size``, ``stride``, ``batch_size``, ``reduction``,
    ``pad_mode``) from a ``tiling`` configuration section; a section without ``pad_mode`` pads
    nothing."""
    options = {k: section[k] for k in ("tile_size", "stride", "batch_size", "reduction")}
    return {**options, "pad_mode": section.get("pad_mode")}


def estimate_memory(
    member: nn.Module,
    image_shape: tuple[int, ...],
    tile_size: int,
    stride: int,
    batch_size: int = 8,
    resize_to: int | None = None,
    activation_factor: float | None = None,
) -> dict[str, int]:
    """Predicted peak memory (bytes) of ``infer_tiled``, by part.

    Model: parameters and buffers of the member; one batch of input tiles (float32, at the fed
    size) and of output maps; the member's activations for one batch, estimated by running one
    tile through it and counting the bytes of every module output (``activation_factor``
    overrides that with bytes per input byte); the band the tiles merge in (float64 sums and
    weights, ``tile_size`` rows of the image's width); the merged float32 map at full
    resolution (none in memory with ``infer_tiled``'s ``map_folder``). The number of tiles does
    not appear: that is the point of streaming.
    """
    *channels, height, width = image_shape
    c = channels[-1] if channels else 1
    fed = resize_to or tile_size
    model = sum(
        t.numel() * t.element_size() for t in list(member.parameters()) + list(member.buffers())
    )
    batch_in = batch_size * c * fed * fed * 4
    batch_out = batch_size * tile_size * tile_size * 4 * 2
    if activation_factor is None:
        activation_factor = _activation_bytes(member, c, fed) / (c * fed * fed * 4)
    activations = int(activation_factor * batch_in)
    parts = {
        "model": model,
        "batch_input": batch_in,
        "batch_output": batch_out,
        "activations": activations,
        "merge_band": min(tile_size, height) * width * (8 + 8),
        "merged_maps": height * width * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


def _activation_bytes(member: nn.Module, channels: int, size: int) -> int:
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, (list, tuple)) else [output]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in member.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            device = next((p.device for p in member.parameters()), torch.device("cpu"))
            _run(member, torch.rand(1, channels, size, size, device=device), None)
    finally:
        for hook in hooks:
            hook.remove()
    return total

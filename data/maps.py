"""A full-resolution map kept on disk instead of in memory, read and written a band of rows at a
time: the storage under fusion's fused maps, tiled inference's member maps and region finding
on a full panel."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

# Pixels per band when a map or an overlay is read or written band by band: 256 rows of a
# 2048 px wide image, fewer of a wider one, so that a band's arithmetic takes the same memory.
BAND_PIXELS = 256 * 2048


def band_rows(width: int) -> int:
    """Rows per band of an image ``width`` pixels wide (``BAND_PIXELS`` of them, at least 1)."""
    return max(1, BAND_PIXELS // max(1, width))


class MapOnDisk:
    """A float32 ``[H, W]`` map held in an unnamed temporary file in ``folder`` instead of in
    memory (a 9344 x 7000 panel's fused map is 262 MB; 256 of its rows, 10 MB).

    ``map[rows] = values`` writes whole rows; ``map[rows]`` and ``map[rows, cols]`` (slices)
    read them back as an array; ``np.asarray(map)`` reads it whole. The file is gone once the
    map is closed or collected, or the process ends (a killed run leaves nothing behind)."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, shape: tuple[int, int], folder: str | os.PathLike | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.folder = folder
        self._file = tempfile.TemporaryFile(dir=folder)
        self._file.truncate(self.size * self.dtype.itemsize)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def _rows(self, key: Any) -> tuple[slice, Any]:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"a map on disk is indexed by slices of rows, got {key!r}")
        start, stop, _ = rows.indices(self.shape[0])
        return slice(start, max(start, stop)), cols

    def __setitem__(self, key: Any, values: Any) -> None:
        rows, cols = self._rows(key)
        if cols != slice(None):
            raise TypeError("a map on disk is written by whole rows")
        shape = (rows.stop - rows.start, self.shape[1])
        data = np.ascontiguousarray(np.broadcast_to(values, shape), dtype=self.dtype)
        view, offset = memoryview(data).cast("B"), rows.start * self.shape[1] * 4
        try:
            while view:
                written = os.pwrite(self._file.fileno(), view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:  # a full disk: say where
            raise OSError(
                exc.errno, exc.strerror, str(self.folder or tempfile.gettempdir())
            ) from exc

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = self._rows(key)
        buffer = bytearray((rows.stop - rows.start) * self.shape[1] * 4)
        if os.preadv(self._file.fileno(), [buffer], rows.start * self.shape[1] * 4) != len(buffer):
            raise OSError(f"a map on disk in {self.folder} was cut short")
        block = np.frombuffer(buffer, self.dtype).reshape(-1, self.shape[1])
        return block if cols == slice(None) else block[:, cols]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def bands(self) -> Iterator[np.ndarray]:
        """The map's rows, ``band_rows`` of them at a time."""
        rows = band_rows(self.shape[1])
        for start in range(0, self.shape[0], rows):
            yield self[start : start + rows]

    def max(self) -> float:
        return max(float(band.max()) for band in self.bands())

    def min(self) -> float:
        return min(float(band.min()) for band in self.bands())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MapOnDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

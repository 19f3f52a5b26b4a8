"""Reading images and masks robustly: every bit depth and mode becomes float32 in [0, 1].

Whatever the camera or file server delivers (8- or 16-bit grayscale, RGB, palette, 1-bit,
RGBA, ``.npy`` arrays) is read fully (a truncated file must fail here, not later) and converted;
anything unreadable raises ``ImageReadError`` naming the file and what is wrong. TIFFs are read
with tifffile (Pillow cuts 16-bit colour to 8 bits), uncompressed ones memory-mapped.

``read_image`` divides integers by their container's full scale (255 for 8-bit files, 65535 for
16-bit ones), the same for every file of a type. Cameras often store 10-, 12- or 14-bit counts in
16-bit files, which then reach the members at a fraction of their contrast: an
``IntensityWindow`` (``data.intensity``) is fitted once on a dataset's training images and maps
every image of every split, and at prediction time, through the same fixed linear window.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from tifffile import PHOTOMETRIC, TIFF

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
TIFF_SUFFIXES = (".tif", ".tiff")
# Truncated files must be errors, never silently padded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # panels reach 9344 x 7000; refuse absurd sizes

log = logging.getLogger(__name__)
INTENSITY_MODES = ("auto", "bitdepth", "percentile", "none")
BIT_DEPTHS = (8, 10, 12, 14, 16)
# Pixels pooled over all training images for the percentile window (each image subsampled).
PERCENTILE_PIXELS = 1 << 22


class ImageReadError(ValueError):
    """An image or mask file cannot be read."""


# Colour samples of the TIFF photometric interpretations tifffile reads here; the others
# (palette, min-is-white, CMYK, YCbCr, ...) go to Pillow, which converts them as for other files.
_TIFF_COLOURS = {PHOTOMETRIC.MINISBLACK: 1, PHOTOMETRIC.RGB: 3}
# Pillow modes read as the file holds them (in this dtype), then converted by ``_unit_array``.
_PIL_DTYPES = {
    "1": np.bool_,
    "L": np.uint8,
    "RGB": np.uint8,
    "I;16": np.uint16,
    "I;16B": np.uint16,
    "I;16L": np.uint16,
    "I;16N": np.uint16,
    "I": np.int32,
    "F": np.float32,
}


def _pil_scale(mode: str) -> float:
    """Full scale of a PIL mode's container: 65535 for the 16-bit modes and ``I`` (16-bit PNGs in
    older Pillow, 32-bit TIFFs), 1 for floats and 1-bit images, 255 for every 8-bit mode."""
    if mode.startswith("I"):
        return 65535.0
    return 1.0 if mode in ("F", "1") else 255.0


def _dtype_scale(dtype: np.dtype) -> float:
    """Full scale of an array's container: 255 for 8-bit integers, 65535 for wider integers
    (16-bit counts held in int32/int64 arrays), 1 for floats."""
    if not np.issubdtype(dtype, np.integer):
        return 1.0
    return 255.0 if np.dtype(dtype).itemsize == 1 else 65535.0


def _unit_array(array: np.ndarray, path: Path, keep_integers: bool = False) -> np.ndarray:
    """Decoded pixels as ``read_image`` returns them: 8- and 16-bit unsigned integers divided by
    their full scale (or kept, with ``keep_integers``), other integers by theirs once checked to
    fit 16 bits (negatives clipped), 1-bit pixels as 0 and 1, floats clipped to [0, 1] (divided
    by their maximum where it is above 1)."""
    kind, scale = array.dtype.kind, _dtype_scale(array.dtype)
    if kind == "b":
        return array.astype(np.float32)
    if kind == "u" and array.dtype.itemsize <= 2:
        if keep_integers:
            return array
        # Converted and scaled in one pass (the same float32 values): a 16-bit panel's float
        # copy is 262 MB, and a second one for the quotient would double what reading takes.
        return np.divide(array, scale, dtype=np.float32)
    if kind in "iu":
        peak = array.max(initial=0)
        if peak > scale:
            raise ImageReadError(
                f"{path}: {array.dtype.itemsize * 8}-bit integer values up to {peak} exceed "
                "16 bits; save the image as 16-bit or as a float .npy in [0, 1]"
            )
        return np.divide(np.clip(array, 0, None), scale, dtype=np.float32)
    if kind == "f":
        array = array.astype(np.float32, copy=False)
        return np.clip(array, 0.0, 1.0) if array.max(initial=0) <= 1.0 else array / array.max()
    raise ImageReadError(f"{path}: pixels of type {array.dtype} are not an image")


def _from_pil(image: Image.Image, path: Path, keep_integers: bool = False) -> np.ndarray:
    mode = image.mode
    if mode in _PIL_DTYPES:
        return _unit_array(np.asarray(image, dtype=_PIL_DTYPES[mode]), path, keep_integers)
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.float32) / 255.0
    if mode == "P":
        has_color = image.convert("RGB")
        rgb = np.asarray(has_color, dtype=np.float32) / 255.0
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return rgb[..., 0]
        return rgb
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _read_pil(path: Path, keep_integers: bool) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: truncation must surface here
            return _from_pil(image, path, keep_integers)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: unreadable or truncated image ({exc})") from exc


def _tiff_page(tif: tifffile.TiffFile, path: Path) -> tifffile.TiffPage | None:
    """The first page of a TIFF if tifffile reads it, None where Pillow does: photometric
    interpretations other than grey and RGB, and compressions (LZW, JPEG, CCITT) or predictors
    tifffile decodes only with ``imagecodecs``, which is not a dependency. More than 8 bits per
    colour sample in those is an error: Pillow would cut it to 8."""
    page = tif.pages[0]
    if page.photometric not in _TIFF_COLOURS:
        return None
    if page.dtype is None:
        raise ImageReadError(
            f"{path}: TIFF samples of {page.bitspersample} bits in sample format "
            f"{page.sampleformat} are not supported"
        )
    if page.compression in TIFF.DECOMPRESSORS and page.predictor in TIFF.UNPREDICTORS:
        return page
    if page.photometric == PHOTOMETRIC.RGB and page.bitspersample > 8:
        codec = getattr(page.compression, "name", page.compression)
        raise ImageReadError(
            f"{path}: {page.bitspersample}-bit RGB TIFF compressed with {codec} (predictor "
            f"{page.predictor}): tifffile decodes it only with the imagecodecs package "
            "(pip install imagecodecs), and Pillow would cut it to 8 bits"
        )
    return None


@contextmanager
def _tiff_errors(path: Path) -> Iterator[None]:
    """Whatever tifffile raises on a file as an ``ImageReadError`` naming it: beyond its own
    errors and short reads, corrupt tags surface as any Python error (flipped bytes gave
    TypeError, IndexError, ZeroDivisionError, struct.error, zlib.error)."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: unreadable or truncated TIFF ({exc})") from exc


def _read_tiff(path: Path, keep_integers: bool) -> np.ndarray | None:
    """A TIFF's first page (further pages, such as thumbnails, are not read) as ``read_image``
    returns it; None where Pillow reads the file instead (``_tiff_page``)."""
    with _tiff_errors(path), tifffile.TiffFile(path) as tif:
        page = _tiff_page(tif, path)
        if page is None:
            return None
        planes, depth, height, width, samples = page.shaped
        colours = _TIFF_COLOURS[page.photometric]
        if depth != 1 or planes * samples - len(page.extrasamples) != colours:
            raise ImageReadError(
                f"{path}: TIFF of {planes * samples} samples per pixel and depth {depth} is "
                f"not a {'grey' if colours == 1 else 'RGB'} image"
            )
        if height * width > Image.MAX_IMAGE_PIXELS:
            raise ImageReadError(
                f"{path}: {width} x {height} px exceeds the limit of {Image.MAX_IMAGE_PIXELS} px"
            )
        # Uncompressed pixels stored contiguously, as read_image lays them out, are mapped
        # rather than read: a LazyImage of the map reads only the pages of the windows it
        # converts (a 65 MP 16-bit panel is 131 MB). Compressed, tiled, planar or alpha
        # pixels are read whole: tifffile reads tiles lazily only through zarr (aszarr),
        # not a dependency. A mapped file must not be truncated while it is in use.
        mapped = (
            page.is_memmappable
            and planes == 1
            and samples == colours
            and np.dtype(tif.byteorder + page.dtype.char).isnative
        )
        raw = tifffile.memmap(path, page=0, mode="r") if mapped else page.asarray()
        # [H, W, C] of chunky or planar [C, H, W] samples (views of a mapped page), alpha dropped.
        array = np.moveaxis(raw.reshape(planes, height, width, samples), 0, 2)
        array = array.reshape(height, width, planes * samples)[..., :colours]
    return _unit_array(array, path, keep_integers)


def integer_scale(dtype: np.dtype) -> float:
    """The divisor that maps an array of ``dtype`` to [0, 1]: the full range of an integer
    type (255 for 8-bit, 65535 for 16-bit camera images), 1 for floats."""
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def read_image(path: str | os.PathLike, keep_integers: bool = False) -> np.ndarray:
    """Float32 in [0, 1]: ``[H, W]`` for grayscale, ``[H, W, 3]`` for color (alpha dropped).

    ``keep_integers``: 8-bit grey and RGB files, 16-bit grey ones and 16-bit RGB TIFFs as the
    file holds them (uint8, uint16: a quarter or half of float32's memory); ``to_array``, an
    ``IntensityWindow`` or a ``LazyImage`` brings them to the float32 values read without it.
    Other files are read as float32 either way. Of an uncompressed grey or RGB TIFF (samples
    interleaved, no alpha) it is then a read-only ``np.memmap`` of the file, read where it is
    indexed. Of a multi-page file (TIFF, GIF) only the first page is read."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    array = _read_tiff(path, keep_integers) if path.suffix.lower() in TIFF_SUFFIXES else None
    if array is None:
        array = _read_pil(path, keep_integers)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if min(array.shape[:2]) < 1:
        raise ImageReadError(f"{path}: image has no pixels {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        # A mapped TIFF stays a memmap: it is C-contiguous already.
        return array if isinstance(array, np.memmap) else np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ImageReadError(f"{path}: expected an [H, W] or [H, W, 3] array, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ImageReadError(f"{path}: array of {array.dtype} is not numeric")
    scale = _dtype_scale(array.dtype)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: array contains NaN or Inf values")
    if scale != 1.0:
        array = array / scale
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if low < 0 or high > 1:
        raise ImageReadError(f"{path}: values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    return array


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Boolean ``[H, W]`` defect mask: any nonzero pixel is defective."""
    array = read_image(path)
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


def to_tensor(image: np.ndarray | torch.Tensor, channels: int = 3) -> torch.Tensor:
    """A float32 ``[channels, H, W]`` tensor (1 or 3 channels) of an image: an array ``[H, W]``
    or ``[H, W, C]`` (as images are read; channels past the third are dropped) or a tensor
    ``[C, H, W]`` or ``[H, W]`` (as datasets give them; detached, on the CPU). The layout
    follows the type, not the shape, so a one- or three-row colour image keeps its rows. One
    channel is repeated to three, three become one by Rec. 709 luma."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if tensor.ndim == 3:
            tensor = tensor[..., :3].permute(2, 0, 1)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == channels:
        return tensor
    if channels == 3:
        return tensor.expand(3, -1, -1).contiguous()
    # Rec. 709 luma for grayscale from color.
    weights = torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)
    return (tensor * weights).sum(0, keepdim=True)


def to_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float32 ``[H, W, C]`` array (``[H, W]`` for one channel) of an image, tensor or array,
    ``[C, H, W]`` (C 1 or 3: as datasets give them), ``[H, W, C]`` or ``[H, W]``. Integer
    arrays (8- or 16-bit camera images) are scaled to [0, 1]. It may share memory with the
    input."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    scale = integer_scale(array.dtype)
    array = array.astype(np.float32, copy=False)
    if scale != 1.0:
        array = array / scale
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


class LazyImage:
    """An image kept as its file holds it (``read_image(..., keep_integers=True)``: a 16-bit
    9344 x 7000 panel is 131 MB, its float32 copy 262 MB) and converted only where it is read:
    ``image[rows, cols]`` is ``convert`` of those pixels (an elementwise map to float32 in [0, 1],
    an ``IntensityWindow`` by default), ``np.asarray(image)`` converts it whole.

    ``shape`` and indexing are an array's, ``[H, W]`` or ``[H, W, 3]``; ``luminance()`` is the
    ``[H, W]`` channel mean of a colour image, converted in the same way. ``raw`` may be the
    ``np.memmap`` that ``read_image`` gives of an uncompressed TIFF: a window read then reads
    only that window's pages of the file."""

    def __init__(
        self,
        raw: np.ndarray,
        convert: Callable[[np.ndarray], np.ndarray] | None = None,
        channel_mean: bool = False,
    ) -> None:
        self.raw = raw
        self.convert = convert or IntensityWindow()
        self.channel_mean = channel_mean and raw.ndim == 3
        self.shape = raw.shape[:2] if self.channel_mean else raw.shape
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        values = self.convert(self.raw[key])
        return values.mean(axis=-1) if self.channel_mean else values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def luminance(self) -> LazyImage:
        """The ``[H, W]`` luminance (the channels' mean) of a colour image; itself if grey."""
        return LazyImage(self.raw, self.convert, channel_mean=True) if self.raw.ndim == 3 else self


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> Path:
    """Write ``[H, W]`` or ``[H, W, 3]`` values in [0, 1] (or a bool mask) as PNG, atomically.
    ``bits=16`` keeps fractions of a percent of contrast (grayscale only)."""
    import io

    from artifacts.io import atomic_write_bytes

    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.float32)
    array = np.clip(array, 0.0, 1.0)
    if bits == 16:
        if array.ndim != 2:
            raise ValueError("16-bit PNG is written for grayscale images only")
        pil = Image.fromarray(np.round(array * 65535).astype(np.uint16))
    else:
        pil = Image.fromarray(np.round(array * 255).astype(np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``(height, width)`` of an image size given as one side (square) or ``[height, width]``;
    None stays None (native size)."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise ValueError(f"image size must be a positive int or [height, width], got {size!r}")
    if isinstance(size, int):
        pair: tuple[int, ...] = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str):
        pair = tuple(size)
    else:
        raise ValueError(f"image size must be a positive int or [height, width], got {size!r}")
    if len(pair) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair
    ):
        raise ValueError(f"image size must be a positive int or [height, width], got {size!r}")
    return int(pair[0]), int(pair[1])


def size_label(size: int | Sequence[int] | None) -> str:
    """``256`` for a square size, ``512x208`` for height x width, ``native`` for None."""
    pair = size_pair(size)
    if pair is None:
        return "native"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (sorted); an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def random_folder_images(
    paths: list[Path], count: int, size: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """``count`` images drawn at random (global torch generator, so a resumed training draws the
    same) from ``paths``, as ``[count, 3, H, W]`` in [0, 1] resized to ``size``."""
    picks = torch.randint(len(paths), (count,)).tolist()
    images = []
    for index in picks:
        image = to_tensor(read_image(paths[index]), 3)[None]
        images.append(
            F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        )
    return torch.cat(images).clamp_(0, 1).to(device)


# --- intensity windows ------------------------------------------------------------------------


def intensity_settings(mode: str, percentiles: Sequence[float]) -> tuple[str, tuple[float, float]]:
    """Check ``data.intensity`` and ``data.intensity_percentiles``; errors name the key, the value
    and what is allowed."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"data.intensity must be one of {INTENSITY_MODES}, got {mode!r}")
    values = list(percentiles) if isinstance(percentiles, (list, tuple)) else [percentiles]
    if (
        len(values) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        or not 0 <= values[0] < values[1] <= 100
    ):
        raise ValueError(
            "data.intensity_percentiles must be two numbers [low, high] with "
            f"0 <= low < high <= 100, got {percentiles!r}"
        )
    return mode, (float(values[0]), float(values[1]))


def _container_scale(item: str | os.PathLike | np.ndarray) -> float:
    """Full scale of an image's container, from the file header only (no decoding)."""
    if isinstance(item, np.ndarray):
        return _dtype_scale(item.dtype)
    path = Path(item)
    try:
        if path.suffix.lower() == ".npy":
            return _dtype_scale(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
        if path.suffix.lower() in TIFF_SUFFIXES:
            with _tiff_errors(path), tifffile.TiffFile(path) as tif:
                page = _tiff_page(tif, path)
                if page is not None:
                    return _dtype_scale(page.dtype)
        with Image.open(path) as image:
            return _pil_scale(image.mode)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


def _unit_values(item: str | os.PathLike | np.ndarray) -> np.ndarray:
    """An image as ``read_image`` returns it (arrays: integers divided by their full scale)."""
    if isinstance(item, np.ndarray):
        return item.astype(np.float32) / _dtype_scale(item.dtype)
    return read_image(item)


@dataclass(frozen=True)
class IntensityWindow:
    """One fixed linear map of a dataset's intensities to [0, 1]:
    ``clip((x - low) / (high - low), 0, 1)``.

    ``x`` is what ``read_image`` returns (integers divided by their container's full scale,
    floats as they are); a raw integer array is divided by its container's full scale first.
    Fit it once on a dataset's training images (``IntensityWindow.fit``) and apply it unchanged
    to every split and at prediction time: the scaling of an image never depends on the image,
    so a defect cannot change its own normalization. ``mode`` is what the fit resolved to:
    ``none`` (the identity), ``bitdepth`` (``high = (2**bits - 1) / full scale``, ``low = 0``:
    luminance ratios, hence contrast and SEMU, are kept) or ``percentile`` (a stretch between
    two percentiles of the training pixels: it moves the zero, so contrast in percent of the
    background is measured on the stretched values).
    """

    mode: str = "none"
    low: float = 0.0
    high: float = 1.0
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("none", "bitdepth", "percentile"):
            raise ValueError(f"unknown intensity window mode {self.mode!r}")
        if not self.high > self.low:
            raise ValueError(f"intensity window needs high > low, got [{self.low}, {self.high}]")

    @classmethod
    def fit(
        cls,
        images: Iterable[str | os.PathLike | np.ndarray],
        mode: str = "auto",
        percentiles: Sequence[float] = (0.5, 99.5),
    ) -> IntensityWindow:
        """The window of ``mode`` for a dataset whose training images are ``images`` (paths or
        arrays as a file holds them). Unreadable files are left out with a warning (reading
        them for training reports them).

        ``auto``: ``bitdepth`` when every training image is an integer image of the same
        container (8-bit images: divided by 255 as before; 16-bit files holding 12-bit counts:
        by 4095); the identity for float images and for a mix of containers.
        ``bitdepth``: integers divided by ``2**bits - 1`` for the smallest of
        ``BIT_DEPTHS`` that holds the largest training value; floats stay as they are.
        ``percentile``: the ``percentiles`` of the training pixels (subsampled) map to 0 and 1.
        """
        mode, (p_low, p_high) = intensity_settings(mode, percentiles)
        if mode == "none":
            return cls()
        items, scales = [], []
        for item in images:
            try:
                scales.append(_container_scale(item))
                items.append(item)
            except ImageReadError as exc:
                log.warning("intensity window: left out %s", exc)
        if not items:
            raise ValueError(f"data.intensity={mode}: no readable training image to fit it on")
        kinds = sorted(set(scales))
        if mode == "auto":
            if len(kinds) > 1 or kinds == [1.0]:
                return cls()
            mode = "bitdepth"
        if mode == "bitdepth":
            if len(kinds) > 1:
                raise ValueError(
                    f"data.intensity=bitdepth: the training images mix containers of full scale "
                    f"{kinds}; use none or percentile"
                )
            scale = kinds[0]
            if scale == 1.0:
                return cls()
            # 8-bit containers hold 8 bits; wider ones are decoded for their largest value.
            peaks = [scale] if scale == 255.0 else [v.max() * scale for v in _readable(items)]
            if not peaks:
                raise ValueError(f"data.intensity={mode}: no readable training image to fit it on")
            bits = next(b for b in BIT_DEPTHS if 2**b - 1 >= round(float(max(peaks))))
            return cls("bitdepth", 0.0, (2**bits - 1) / scale, bits)
        budget = max(1024, PERCENTILE_PIXELS // len(items))
        samples = []
        for values in _readable(items):
            step = max(1, int(np.ceil(np.sqrt(values.shape[0] * values.shape[1] / budget))))
            samples.append(values[::step, ::step].ravel())
        if not samples:
            raise ValueError(f"data.intensity={mode}: no readable training image to fit it on")
        low, high = (float(v) for v in np.percentile(np.concatenate(samples), [p_low, p_high]))
        if not high > low:
            raise ValueError(
                f"data.intensity=percentile: the training pixels' {p_low} and {p_high} "
                f"percentiles are both {low:.4g}; widen data.intensity_percentiles"
            )
        return cls("percentile", low, high)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image`` (``[H, W]`` or ``[H, W, C]``) through the window, as float32 in [0, 1]."""
        array = np.asarray(image)
        if np.issubdtype(array.dtype, np.integer):
            array = np.divide(array, _dtype_scale(array.dtype), dtype=np.float32)
        if self.low == 0.0 and self.high == 1.0:
            return array.astype(np.float32, copy=False)
        out = (array.astype(np.float32) - np.float32(self.low)) * np.float32(
            1.0 / (self.high - self.low)
        )
        return np.clip(out, 0.0, 1.0, out=out)

    def describe(self) -> str:
        if self.mode == "bitdepth":
            return f"bitdepth: {self.bits}-bit counts to [0, 1] (x {1 / self.high:.4g})"
        if self.mode == "percentile":
            return f"percentile: [{self.low:.4g}, {self.high:.4g}] to [0, 1]"
        return "none: integers divided by their type's full scale"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; ``from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IntensityWindow:
        try:
            return cls(**{k: values[k] for k in ("mode", "low", "high", "bits")})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a saved intensity window: {dict(values)!r}") from exc


def _readable(items: Iterable[str | os.PathLike | np.ndarray]) -> Iterator[np.ndarray]:
    """Each item's values (``[H, W]`` or ``[H, W, C]``), leaving out unreadable files."""
    for item in items:
        try:
            yield _unit_values(item)
        except ImageReadError as exc:
            log.warning("intensity window: left out %s", exc)

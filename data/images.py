"""Reading images and masks robustly: every bit depth and mode becomes float32 in [0, 1].

Whatever the camera or file server delivers (8- or 16-bit grayscale, RGB, palette, 1-bit,
RGBA, ``.npy`` arrays) is read fully (a truncated file must fail here, not later) and converted;
anything unreadable raises ``ImageReadError`` naming the file and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
# Truncated files must be errors, never silently padded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # panels reach 9344 x 7000; refuse absurd sizes


class ImageReadError(ValueError):
    """An image or mask file cannot be read."""


def _from_pil(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":
        array = np.asarray(image, dtype=np.int64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array, 0, None).astype(np.float32) / top
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array, 0.0, 1.0) if array.max(initial=0) <= 1.0 else array / array.max()
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in ("L",):
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.float32) / 255.0
    if mode == "P":
        has_color = image.convert("RGB")
        rgb = np.asarray(has_color, dtype=np.float32) / 255.0
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return rgb[..., 0]
        return rgb
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def integer_scale(dtype: np.dtype) -> float:
    """The divisor that maps an array of ``dtype`` to [0, 1]: the full range of an integer
    type (255 for 8-bit, 65535 for 16-bit camera images), 1 for floats."""
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Float32 in [0, 1]: ``[H, W]`` for grayscale, ``[H, W, 3]`` for color (alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: truncation must surface here
            array = _from_pil(image)
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: unreadable or truncated image ({exc})") from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if min(array.shape[:2]) < 1:
        raise ImageReadError(f"{path}: image has no pixels {array.shape}")
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
    integer = np.issubdtype(array.dtype, np.integer)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: array contains NaN or Inf values")
    if integer:
        array = array / (65535.0 if array.max(initial=0) > 255 else 255.0)
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


def to_tensor(image: np.ndarray, channels: int = 3) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, 3]`` float array to a ``[channels, H, W]`` tensor (1 or 3)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] == channels:
        return tensor
    if channels == 3:
        return tensor.expand(3, -1, -1).contiguous()
    # Rec. 709 luma for grayscale from color.
    weights = torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)
    return (tensor * weights).sum(0, keepdim=True)


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> Path:
    """Write ``[H, W]`` or ``[H, W, 3]`` values in [0, 1] (or a bool mask) as PNG, atomically.
    ``bits=16`` keeps fractions of a percent of contrast (grayscale only)."""
    import io

    from data.io import atomic_write_bytes

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

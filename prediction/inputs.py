"""Inputs of ``predict``: image files and folders, each read robustly; bad files are reported
and skipped, the rest go on."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts.io import sha256_file
from data.images import IMAGE_SUFFIXES, ImageReadError, read_image


@dataclass
class Skipped:
    path: str
    reason: str


def expand_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Skipped]]:
    """Files as given, folders searched recursively for images; missing paths are skipped with
    a reason. Order is stable (sorted within each folder)."""
    files: list[Path] = []
    skipped: list[Skipped] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                skipped.append(Skipped(str(path), "folder holds no image files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            skipped.append(Skipped(str(path), "no such file or folder"))
    return files, skipped


def read_input(path: Path, min_side: int = 1) -> np.ndarray | Skipped:
    """The file's image or why it was skipped: ``[H, W]`` or ``[H, W, 3]``, 8- and 16-bit
    files as they hold it (uint8, uint16: a 16-bit panel's float32 copy would be twice its
    size), others float32 in [0, 1] (``data.images.read_image``, ``keep_integers``)."""
    try:
        image = read_image(path, keep_integers=True)
    except ImageReadError as exc:
        return Skipped(str(path), str(exc).removeprefix(f"{path}: "))
    if min(image.shape[:2]) < min_side:
        return Skipped(
            str(path), f"image is {image.shape[1]}x{image.shape[0]} px, smaller than {min_side} px"
        )
    return image


@dataclass
class InputImage:
    """One input file as read: its SHA-256 and image, or why it was skipped; ``already_done``
    when a previous run predicted these bytes (the image is then not decoded)."""

    path: Path
    sha256: str | None
    image: np.ndarray | None = None
    skipped: str | None = None
    already_done: bool = False


def _load(path: Path, done: Mapping[str, str]) -> InputImage:
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return InputImage(path, None, skipped=f"cannot read the file: {exc.strerror or exc}")
    if done.get(str(path)) == digest:
        return InputImage(path, digest, already_done=True)
    image = read_input(path)
    if isinstance(image, Skipped):
        return InputImage(path, digest, skipped=image.reason)
    return InputImage(path, digest, image)


def read_ahead(
    files: Sequence[Path], done: Mapping[str, str], depth: int = 2
) -> Iterator[InputImage]:
    """The files in order, each hashed and decoded in worker threads up to ``depth`` images ahead
    of the caller (file reading, hashing and PNG/TIFF decoding release the GIL), so the disk and
    the decoder work while the members compute."""
    if depth < 1:
        yield from (_load(path, done) for path in files)
        return
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="read-ahead") as pool:
        pending: deque = deque()
        queue = iter(files)
        for path in queue:
            pending.append(pool.submit(_load, path, done))
            if len(pending) > depth:
                break
        while pending:
            yield pending.popleft().result()
            path = next(queue, None)
            if path is not None:
                pending.append(pool.submit(_load, path, done))

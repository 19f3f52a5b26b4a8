"""Inputs of ``predict``: image files and folders, each read robustly; bad files are reported
and skipped, the rest go on."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    """The file's image (float32 [H, W] or [H, W, 3] in [0, 1]) or why it was skipped."""
    try:
        image = read_image(path)
    except ImageReadError as exc:
        return Skipped(str(path), str(exc).removeprefix(f"{path}: "))
    if min(image.shape[:2]) < min_side:
        return Skipped(
            str(path), f"image is {image.shape[1]}x{image.shape[0]} px, smaller than {min_side} px"
        )
    return image

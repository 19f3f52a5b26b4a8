"""Dataset readers sharing one constructor and one sample layout.

``MVTecDataset`` reads the MVTec AD layout, which also serves OLED panel folders, KolektorSDD
and anything converted to it::

    <data_dir>/<category>/train/good/*            defect-free training images
    <data_dir>/<category>/test/good/*             defect-free test images
    <data_dir>/<category>/test/<defect_type>/*    defective test images
    <data_dir>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)

``BTADDataset`` (``01/02/03`` with ``ok``/``ko``) and ``VisADataset`` (``split_csv/1cls.csv``)
share the constructor ``(data_dir, categories, split, transform, normal_only, **kwargs)`` and
return the same sample: ``{"image": [C,H,W] float in [0,1], "mask": [1,H,W] in {0,1}, "label":
0|1, "defect_type": str, "path": str, "category": str, "group": str}`` (``group``: the
physical part or panel the image shows, by ``group_pattern``; its path where none is set).
Synthetic panels add ``"level"``,
``"defects"`` (from ``truth.jsonl``) and ``"instances"`` (per-defect ids).

Splits: ``train`` is train/good without a seeded held-out share (``val_fraction``); that share
is cut in two disjoint halves, ``calibration`` (what a member calibrates its own maps on:
pixel statistics, quantiles) and ``val`` (what members are chosen on and fusion is fitted on),
so nothing is fitted twice on the same images; ``test`` is the test folder. A category without
any ``ground_truth/`` folder is image-level only (``has_masks`` is False); where
``ground_truth/`` exists, a defective image without its mask or with a mask of another size is
an error naming the file.

``ImageFiles`` reads a plain list of image files (a retraining job's folders) into the same
sample, without masks or a category.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    IntensityWindow,
    intensity_settings,
    read_image,
    read_mask,
    size_pair,
    to_tensor,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "calibration", "val", "test")
HOLDOUT_SPLITS = ("calibration", "val")
NORMAL = "good"


@dataclass(frozen=True)
class Entry:
    """One image of a split: where it is, its label and type, its mask file if any."""

    path: Path
    label: int
    defect_type: str
    category: str
    mask: Path | None = None
    instances: Path | None = None
    truth: dict[str, Any] | None = None


def compile_group_pattern(pattern: str | None) -> re.Pattern | None:
    """``group_pattern`` compiled, or None; a pattern that is not a regex with a group is a
    ``ValueError`` that says so."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
    if compiled.groups < 1:
        raise ValueError(
            f"{pattern!r} has no group: its first group (in parentheses) names the part"
        )
    return compiled


def image_group(path: Path, pattern: re.Pattern | None) -> str:
    """The part an image shows: the first group of ``pattern`` searched in its file name
    (its path where ``pattern`` is None). A name the pattern does not match is an error that
    names the file."""
    if pattern is None:
        return str(path)
    found = pattern.search(path.name)
    if found is None or found.group(1) is None:
        raise ValueError(
            f"{path}: its name does not match data.group_pattern {pattern.pattern!r}, so its "
            "part is unknown; fix the pattern or the file name"
        )
    return found.group(1)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def holdout_split(items: Sequence[Any], fraction: float, seed: int, part: str) -> list[Any]:
    """Seeded, disjoint split of ``items`` into ``train`` and a held-out ``fraction``, the
    held-out share halved into ``calibration`` and ``val`` (``val`` gets the odd one)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if part not in ("train", *HOLDOUT_SPLITS):
        raise ValueError(f"part must be train, calibration or val, got {part!r}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_held = int(round(len(items) * fraction))
    if fraction > 0 and len(items) > 1:
        n_held = min(max(n_held, 1), len(items) - 1)
    n_calibration = n_held // 2
    chosen = {
        "calibration": order[:n_calibration],
        "val": order[n_calibration:n_held],
        "train": order[n_held:],
    }[part]
    return [items[i] for i in sorted(chosen)]


class AnomalyDataset(Dataset):
    """Shared loading, resizing and checks; subclasses list their entries.

    ``intensity`` is a fitted ``IntensityWindow`` or a ``data.intensity`` mode; a mode is fitted
    on the training split of the same categories (whatever ``split`` this is), so that every
    split of a dataset goes through the same window (``self.intensity``).
    """

    reader_name = "base"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        categories: Sequence[str],
        split: str = "train",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        normal_only: bool = False,
        image_size: int | Sequence[int] | None = None,
        channels: int = 3,
        val_fraction: float = 0.0,
        seed: int = 0,
        on_error: str = "raise",
        intensity: str | IntensityWindow = "none",
        intensity_percentiles: Sequence[float] = (0.5, 99.5),
        group_pattern: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(categories, str):
            categories = [categories]
        if not categories:
            raise ValueError("categories is empty: name at least one category")
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.data_dir}")
        self.categories = list(categories)
        self.split = split
        self.transform = transform
        self.image_size = size_pair(image_size)
        self.channels = channels
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []
        entries: list[Entry] = []
        self.has_masks = True
        for category in self.categories:
            found, has_masks = self._entries(category, split, val_fraction, seed)
            self.has_masks &= has_masks
            entries.extend(found)
        if normal_only:
            entries = [e for e in entries if e.label == 0]
        if not entries:
            raise ValueError(
                f"no images for split {split!r} of {self.categories} in {self.data_dir}"
            )
        self.entries = entries
        # Checked here, so a file the pattern misses is named before any work starts.
        pattern = compile_group_pattern(group_pattern)
        self.groups = [image_group(entry.path, pattern) for entry in entries]
        if isinstance(intensity, IntensityWindow):
            self.intensity = intensity
        else:
            self.intensity = self._training_window(
                intensity, intensity_percentiles, val_fraction, seed
            )
        if not self.has_masks and split == "test":
            log.warning(
                "%s: no ground_truth/ folder; image-level only, pixel metrics will be skipped",
                ", ".join(self.categories),
            )

    def _entries(
        self, category: str, split: str, val_fraction: float, seed: int
    ) -> tuple[list[Entry], bool]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.entries)

    def _training_window(
        self, mode: str, percentiles: Sequence[float], val_fraction: float, seed: int
    ) -> IntensityWindow:
        mode, pair = intensity_settings(mode, percentiles)
        if mode == "none":
            return IntensityWindow()
        paths = [
            entry.path
            for category in self.categories
            for entry in self._entries(category, "train", val_fraction, seed)[0]
        ]
        stamps = tuple((str(p), *_stamp(p)) for p in paths)
        window = _fit_window(stamps, mode, pair)
        log.info(
            "%s: data.intensity=%s fitted on %d training images: %s",
            ", ".join(self.categories),
            mode,
            len(paths),
            window.describe(),
        )
        return window

    def _resize(self, tensor: torch.Tensor, mode: str) -> torch.Tensor:
        if self.image_size is None or tuple(tensor.shape[-2:]) == self.image_size:
            return tensor
        if mode == "nearest":
            return F.interpolate(tensor[None].float(), size=self.image_size, mode="nearest")[0]
        out = F.interpolate(
            tensor[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False
        )
        return out[0].clamp_(0.0, 1.0)

    def load(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        image = self.intensity(read_image(entry.path))
        height, width = image.shape[:2]
        if entry.mask is not None:
            mask = read_mask(entry.mask)
            if mask.shape != (height, width):
                raise ImageReadError(
                    f"{entry.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{entry.path} is {width}x{height}"
                )
        else:
            mask = np.zeros((height, width), dtype=bool)
        sample: dict[str, Any] = {
            "image": self._resize(to_tensor(image, self.channels), "bilinear"),
            "mask": self._resize(torch.from_numpy(mask)[None].float(), "nearest"),
            "label": entry.label,
            "defect_type": entry.defect_type,
            "path": str(entry.path),
            "category": entry.category,
            "group": self.groups[index],
        }
        if entry.instances is not None:
            from PIL import Image

            with Image.open(entry.instances) as pil:
                ids = torch.from_numpy(np.asarray(pil, dtype=np.int32).copy())[None]
            sample["instances"] = self._resize(ids, "nearest").round().to(torch.int32)
        if entry.truth is not None:
            sample["level"] = int(entry.truth.get("level", 0))
            sample["defects"] = entry.truth.get("defects", [])
            sample["pixel_pitch_mm"] = entry.truth.get("pixel_pitch_mm")
        return self.transform(sample) if self.transform else sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.on_error == "raise":
            return self.load(index)
        try:
            return self.load(index)
        except ImageReadError as exc:
            self.skipped.append((str(self.entries[index].path), str(exc)))
            log.warning("skipped: %s", exc)
            return {"skipped": True, "path": str(self.entries[index].path), "error": str(exc)}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _fit_window(
    stamps: tuple[tuple[str, int, int], ...], mode: str, percentiles: tuple[float, float]
) -> IntensityWindow:
    # Keyed by the training files with their sizes and times: the train, val and test sets of
    # one job fit once, and a changed file fits again.
    return IntensityWindow.fit([Path(s[0]) for s in stamps], mode, percentiles)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:  # masks are images too; the first that exists
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_truth(category_dir: Path) -> dict[str, dict[str, Any]]:
    path = category_dir / "truth.jsonl"
    if not path.is_file():
        return {}
    truth = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            truth[record["path"]] = record
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}:{number}: not a truth record ({exc})") from exc
    return truth


class MVTecDataset(AnomalyDataset):
    """The MVTec AD folder layout (also OLED panel folders, KolektorSDD, synthetic panels)."""

    reader_name = "mvtec"
    normal_names = (NORMAL,)
    train_folder = "train"

    def _category_dir(self, category: str) -> Path:
        folder = self.data_dir / category
        if not folder.is_dir():
            raise FileNotFoundError(f"category folder not found: {folder}")
        return folder

    def _entries(
        self, category: str, split: str, val_fraction: float, seed: int
    ) -> tuple[list[Entry], bool]:
        root = self._category_dir(category)
        gt_root = root / "ground_truth"
        has_masks = gt_root.is_dir()
        if split in ("train", *HOLDOUT_SPLITS):
            folder = root / self.train_folder / self.normal_names[0]
            if not folder.is_dir():
                raise FileNotFoundError(f"training folder not found: {folder}")
            images = _images_in(folder)
            if not images:
                raise ValueError(f"no images in {folder}")
            chosen = holdout_split(images, val_fraction, seed, split)
            return [Entry(p, 0, NORMAL, category) for p in chosen], has_masks
        test_root = root / "test"
        if not test_root.is_dir():
            raise FileNotFoundError(f"test folder not found: {test_root}")
        truth = _read_truth(root)
        entries = []
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            normal = type_dir.name in self.normal_names
            images = _images_in(type_dir)
            for path in images:
                mask = instances = None
                if not normal and has_masks:
                    mask = _find_mask(gt_root / type_dir.name, path.stem)
                    if mask is None:
                        raise FileNotFoundError(
                            f"no mask for defective image {path}: expected "
                            f"{gt_root / type_dir.name / (path.stem + '_mask.png')}"
                        )
                    candidate = gt_root / type_dir.name / f"{path.stem}_instances.png"
                    instances = candidate if candidate.is_file() else None
                label = 0 if normal else 1
                defect_type = NORMAL if normal else type_dir.name
                record = truth.get(path.relative_to(root).as_posix())
                entries.append(Entry(path, label, defect_type, category, mask, instances, record))
        if not entries:
            raise ValueError(f"no images in {test_root}")
        return entries, has_masks


class BTADDataset(MVTecDataset):
    """BTAD: ``<cat>/train/ok``, ``<cat>/test/ok``, ``<cat>/test/ko``, ``ground_truth/ko``."""

    reader_name = "btad"
    normal_names = ("ok", NORMAL)


class VisADataset(AnomalyDataset):
    """VisA with its split CSV (``split_csv/1cls.csv``: object, split, label, image, mask)."""

    reader_name = "visa"

    def _entries(
        self, category: str, split: str, val_fraction: float, seed: int
    ) -> tuple[list[Entry], bool]:
        csv_path = self.data_dir / "split_csv" / "1cls.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"VisA split file not found: {csv_path}")
        rows = []
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("object") == category:
                    rows.append(row)
        if not rows:
            raise ValueError(f"{csv_path}: no rows for category {category!r}")
        wanted = "train" if split in ("train", *HOLDOUT_SPLITS) else "test"
        entries = []
        for row in rows:
            if row["split"] != wanted:
                continue
            anomalous = row["label"] == "anomaly"
            path = self.data_dir / row["image"]
            mask = self.data_dir / row["mask"] if anomalous and row.get("mask") else None
            if mask is not None and not mask.is_file():
                raise FileNotFoundError(f"no mask for defective image {path}: expected {mask}")
            entries.append(
                Entry(path, int(anomalous), "anomaly" if anomalous else NORMAL, category, mask)
            )
        if split in ("train", *HOLDOUT_SPLITS):
            entries = holdout_split([e for e in entries if e.label == 0], val_fraction, seed, split)
        return entries, True


_READERS: dict[str, type[AnomalyDataset]] = {
    "mvtec": MVTecDataset,
    "btad": BTADDataset,
    "visa": VisADataset,
}


def available_datasets() -> list[str]:
    return sorted(_READERS)


def get_dataset(name: str, **params: Any) -> AnomalyDataset:
    if name not in _READERS:
        raise KeyError(f"unknown dataset reader {name!r}; available: {available_datasets()}")
    return _READERS[name](**params)


class ImageFiles(Dataset):
    """A plain list of image files as samples (no folder layout, no masks), through an
    intensity window and resized to ``image_size`` (None: their own size): normal images, or
    labeled defects with one defect type per file (``labels``; ``good`` is normal)."""

    def __init__(
        self,
        paths: list[Path],
        image_size: int | Sequence[int] | None,
        window: IntensityWindow,
        labels: list[str] | None = None,
    ):
        self.paths, self.image_size, self.window = paths, size_pair(image_size), window
        self.types = labels or [NORMAL] * len(paths)
        self.has_masks = False

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = to_tensor(self.window(read_image(self.paths[index])))
        if self.image_size is not None:
            image = F.interpolate(
                image[None], size=self.image_size, mode="bilinear", antialias=True
            )[0]
        defect_type = self.types[index]
        return {
            "image": image.clamp(0, 1),
            "label": int(defect_type != NORMAL),
            "defect_type": defect_type,
            "path": str(self.paths[index]),
            "mask": torch.zeros(1, *image.shape[-2:]),
        }


def image_shape(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header (a ``.npy`` without reading it)."""
    if path.suffix.lower() == ".npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[:2])
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not an image file PIL can read ({exc})") from exc


class LabeledFolder(Dataset):
    """A plant's archive of labeled images, which the supervised member learns from
    (``retrain.labeled_dirs``)::

        <folder>/<type>/*                              defective images of that type
        <folder>/good/*                                defect-free images (optional)
        <folder>/ground_truth/<type>/<stem>_mask.png   a defect's mask (optional, or <stem>.png)

    A defective image with a mask is learned pixel by pixel, one without by its image label
    (mixed supervision). Everything is checked on construction, each error naming the file:
    an empty type folder, a mask whose image is not there or whose size differs from it, a
    ``ground_truth`` folder of a type that has none. Samples: ``image`` ``[C, H, W]`` at its
    own size (through ``window``), ``mask`` ``[1, H, W]``, ``has_mask``, ``label``,
    ``defect_type``, ``path`` and ``group`` (``group_pattern``)."""

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        window: IntensityWindow,
        group_pattern: str | None = None,
    ) -> None:
        self.window = window
        self.entries: list[tuple[Path, str, Path | None]] = []
        for folder in map(Path, folders):
            if not folder.is_dir():
                raise FileNotFoundError(f"labeled folder not found: {folder}")
            types = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "ground_truth")
            if not types:
                raise ValueError(f"{folder}: no type folders (<type>/ with images) inside")
            for type_dir in types:
                images = _images_in(type_dir)
                if not images:
                    raise ValueError(f"{type_dir}: an empty defect folder (no images)")
                truth = folder / "ground_truth" / type_dir.name
                for path in images:
                    mask = _find_mask(truth, path.stem) if truth.is_dir() else None
                    if mask is not None:
                        _check_mask_size(mask, path)
                    self.entries.append((path, type_dir.name, mask))
                if truth.is_dir():
                    stems = {p.stem for p in images}
                    for mask in _images_in(truth):
                        if mask.stem.removesuffix("_mask") not in stems:
                            raise ValueError(
                                f"{mask}: a mask for an image that is not there (expected "
                                f"{type_dir / mask.stem.removesuffix('_mask')}.*)"
                            )
            for truth in sorted((folder / "ground_truth").glob("*")):
                if truth.is_dir() and not (folder / truth.name).is_dir():
                    raise ValueError(
                        f"{truth}: masks of a type with no images ({folder / truth.name})"
                    )
        pattern = compile_group_pattern(group_pattern)
        self.groups = [image_group(path, pattern) for path, _, _ in self.entries]
        self.has_masks = any(mask is not None for _, _, mask in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        return [int(kind != NORMAL) for _, kind, _ in self.entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, kind, mask_path = self.entries[index]
        image = to_tensor(self.window(read_image(path)))
        label = int(kind != NORMAL)
        known = mask_path is not None or not label
        mask = read_mask(mask_path) if mask_path is not None else np.zeros(image.shape[-2:], bool)
        return {
            "image": image.clamp(0, 1),
            "mask": torch.from_numpy(mask)[None].float(),
            "has_mask": known,
            "label": label,
            "defect_type": kind,
            "path": str(path),
            "group": self.groups[index],
        }


def _check_mask_size(mask: Path, image: Path) -> None:
    mask_shape, image_shape_ = image_shape(mask), image_shape(image)
    if mask_shape != image_shape_:
        raise ImageReadError(
            f"{mask}: mask is {mask_shape[1]}x{mask_shape[0]} but its image {image} is "
            f"{image_shape_[1]}x{image_shape_[0]}"
        )


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep everything else (paths, defect lists) as lists.
    Samples a tolerant dataset skipped are left out."""
    samples = [s for s in samples if not s.get("skipped")]
    if not samples:
        return {"image": torch.empty(0), "path": [], "label": torch.empty(0, dtype=torch.long)}
    batch: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for s in samples for k in s))
    for key in keys:
        # A key only some samples have (instance maps of defective images) stays a list.
        values = [s.get(key) for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and all(
            v.shape == values[0].shape for v in values
        ):
            batch[key] = torch.stack(values)
        elif key == "label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def get_dataloader(
    name: str, batch_size: int = 8, shuffle: bool = False, num_workers: int = 0, **params: Any
) -> DataLoader:
    dataset = get_dataset(name, **params)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )

"""From a configuration's ``data`` section to datasets and loaders.

A data source is a folder in MVTec layout (or BTAD / VisA) plus how to read it. The embedded
default (``dataset: synthetic``) is generated once into a cache folder keyed by its parameters,
then read like any MVTec folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class DataSource:
    """One dataset to run on: ``reader`` is a name of ``data.datasets.get_dataset``."""

    name: str
    reader: str
    data_dir: Path
    categories: tuple[str, ...]
    image_size: int | list[int] | None
    channels: int = 3
    val_fraction: float = 0.2
    pixel_pitch_mm: float = 0.1
    # How camera counts become [0, 1] (``data.intensity``); ``none`` for sources saved before
    # the key existed, whose members were trained that way.
    intensity: str = "none"
    intensity_percentiles: tuple[float, ...] = (0.5, 99.5)
    extra: dict[str, Any] = field(default_factory=dict)
    # A regex whose first group, searched in a file name, is the image's part (its group in
    # cross-validation); None: each image its own group.
    group_pattern: str | None = None


def synthetic_parameters(
    data_cfg: Mapping[str, Any], synthetic_cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """``write_dataset``'s parameters (but the seed and category) from the ``synthetic`` and
    ``data`` sections: what the embedded default's panels are."""
    keys = ("n_train", "n_test", "size", "defect_fraction", "level_weights", "gain_pct")
    keys += ("panel_variation", "background_mura", "background_mura_semu")
    return {
        **{key: synthetic_cfg[key] for key in keys},
        "pixel_pitch_mm": data_cfg["pixel_pitch_mm"],
    }


def resolve_source(
    data_cfg: Mapping[str, Any],
    synthetic_cfg: Mapping[str, Any],
    seed: int,
    name: str | None = None,
) -> DataSource:
    """The data source a ``data`` section describes; generates the synthetic panels if needed."""
    reader = data_cfg["dataset"]
    if reader == SYNTHETIC:
        from data.synthetic import ensure_synthetic_dataset

        for key in ("n_train", "n_test", "size"):
            value = synthetic_cfg[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"synthetic.{key} must be a positive number, got {value!r}")

        categories = tuple(data_cfg["categories"]) or ("panel",)
        if len(categories) != 1:
            raise ValueError(f"the synthetic dataset has one category, got {list(categories)}")
        data_dir = ensure_synthetic_dataset(
            synthetic_cfg["cache_dir"],
            **synthetic_parameters(data_cfg, synthetic_cfg),
            seed=seed,
            category=categories[0],
        )
        reader = "mvtec"
    else:
        if not data_cfg.get("data_dir"):
            raise ValueError(f"data.data_dir must be set for dataset {reader!r}")
        data_dir = Path(data_cfg["data_dir"]).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data.data_dir does not exist or is not a folder: {data_dir}")
        categories = tuple(data_cfg["categories"])
        if not categories:
            categories = tuple(sorted(p.name for p in data_dir.iterdir() if (p / "test").is_dir()))
            if not categories:
                raise ValueError(f"no categories found in {data_dir} (folders with a test/ inside)")
    return DataSource(
        name=name or (SYNTHETIC if data_cfg["dataset"] == SYNTHETIC else Path(data_dir).name),
        reader=reader,
        data_dir=Path(data_dir),
        categories=categories,
        image_size=data_cfg["image_size"],
        channels=data_cfg["channels"],
        val_fraction=data_cfg["val_fraction"],
        pixel_pitch_mm=data_cfg["pixel_pitch_mm"],
        intensity=data_cfg["intensity"],
        intensity_percentiles=tuple(data_cfg["intensity_percentiles"]),
        group_pattern=data_cfg.get("group_pattern"),
    )


# Where a job folder's record finds its data from the folder itself (a copied tree of runs
# and data finds it again); ``data_dir`` is absolute.
FROM_RECORD = "data_dir_from_record"


def recorded_source(source: DataSource | Mapping[str, Any], folder: str | os.PathLike) -> dict:
    """``source`` (or its fields) as ``folder`` records it (JSON): its data folder absolute, and
    relative to ``folder``, so that the record resolves the same from any working directory."""
    fields = asdict(source) if isinstance(source, DataSource) else dict(source)
    data_dir = Path(fields["data_dir"]).resolve()
    relative = os.path.relpath(data_dir, Path(folder).resolve())
    return {**fields, "data_dir": str(data_dir), FROM_RECORD: relative}


def source_from_record(record: Mapping[str, Any], folder: str | os.PathLike) -> DataSource:
    """The ``DataSource`` that ``folder`` recorded (``recorded_source``). Its data is looked for
    beside the folder as it was recorded, then at its absolute path; a record made before
    both were kept names a path relative to where its run was started, looked for from here
    and from each folder above ``folder``. Missing everywhere: an error that names the data,
    every place tried and the record."""
    folder = Path(folder)
    fields = {k: v for k, v in record.items() if k != FROM_RECORD}
    recorded = Path(record["data_dir"])
    if FROM_RECORD in record:
        tried = [Path(os.path.normpath(folder / record[FROM_RECORD])), recorded]
    else:
        tried = [recorded, *(above / recorded for above in folder.resolve().parents)]
    found = next((path for path in tried if path.is_dir()), None)
    if found is None:
        places = ", ".join(str(p) for p in dict.fromkeys(tried))
        raise FileNotFoundError(
            f"{folder}: the data this was made on ({record['name']}, categories "
            f"{', '.join(record['categories'])}) is missing; looked in {places}. Copy the "
            "dataset folder to one of these places."
        )
    fields["data_dir"] = found
    fields["categories"] = tuple(fields["categories"])
    return DataSource(**fields)


def make_dataset(
    source: DataSource,
    category: str,
    split: str,
    seed: int,
    image_size: int | None | str = "source",
) -> Dataset:
    """``split``: ``train`` (train/good without the held-out share), ``calibration`` and ``val``
    (the two disjoint halves of the held-out share), or ``test``."""
    from data.datasets import get_dataset

    size = source.image_size if image_size == "source" else image_size
    return get_dataset(
        source.reader,
        data_dir=source.data_dir,
        categories=[category],
        split=split,
        image_size=size,
        channels=source.channels,
        val_fraction=source.val_fraction,
        seed=seed,
        # Fitted on the train split whatever ``split`` is: one window for every split.
        intensity=source.intensity,
        intensity_percentiles=tuple(source.intensity_percentiles),
        group_pattern=source.group_pattern,
    )


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0
) -> DataLoader:
    from data.datasets import collate_samples

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )

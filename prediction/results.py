"""Predict's results as a stream that survives: one JSON line per image, appended and flushed as
soon as the image is done, so a killed run keeps every finished image and a re-run resumes.

``predictions.jsonl`` is the record; ``predictions.json``, ``predictions.csv``, ``regions.csv``
and ``report.html`` are rebuilt from it (atomically) at the end of each run. Workers that predict
in parallel (``prediction.ray_executor``) each stream into their own file under ``shards/``;
``merge_shards`` moves those entries into the record, at the end of such a run and at the start
of any run (so a run killed before its merge resumes under either executor).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_csv, atomic_write_json
from reporting.predict_report import write_predict_report

log = logging.getLogger(__name__)

STREAM_NAME = "predictions.jsonl"
SHARD_DIR = "shards"  # one stream per parallel worker, merged into STREAM_NAME
IMAGE_COLUMNS = (
    "path",
    "status",
    "score",
    "label",
    "level",
    "regions",
    "mura_energy_pct",
    "wavelet_uniformity_pct",
    "delta_e2000_mean",
    "delta_e2000_p99",
    "warning",
    "error",
)
REGION_COLUMNS = (
    "path",
    "type",
    "type_confidence",
    "level",
    "bbox",
    "area_px",
    "area_mm2",
    "contrast_pct",
    "semu",
    "score",
)


class ResultsError(RuntimeError):
    """The output folder holds results that this run cannot continue."""


def read_stream(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete entries of a results stream. A last line cut short by a killed run is
    dropped from the file (it is not a result); any other unreadable line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete, newline, tail = data.rpartition(b"\n")
    if tail:
        log.warning("%s: dropping an unfinished last line (%d bytes)", path, len(tail))
        with open(path, "r+b") as fh:
            fh.truncate(len(complete) + len(newline))
    entries = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as exc:
            raise ResultsError(f"{path}, line {number}: not a JSON result ({exc})") from exc
    return entries


class ResultStream:
    """Appends one result per line; each line is flushed and synced before the next image."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, entry: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(entry, default=_json_default) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_shards(out: str | os.PathLike) -> int:
    """Append the entries of every stream under ``out/shards/`` to ``out/predictions.jsonl``
    (synced), then delete those streams; returns how many entries moved. A kill between the
    two leaves entries in both places: ``latest_per_image`` keeps one per image."""
    out = Path(out)
    shards = sorted((out / SHARD_DIR).glob("*.jsonl"))
    if not shards:
        return 0
    read_stream(out / STREAM_NAME)  # drops a line a kill cut short, which this would extend
    moved = 0
    with open(out / STREAM_NAME, "a", encoding="utf-8") as fh:
        for shard in shards:
            for entry in read_stream(shard):
                fh.write(json.dumps(entry, default=_json_default) + "\n")
                moved += 1
        fh.flush()
        os.fsync(fh.fileno())
    for shard in shards:
        shard.unlink()
    return moved


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy and torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def finished(entries: Iterable[Mapping[str, Any]], hybrid_id: str) -> dict[str, str]:
    """path -> SHA-256 of the images already done by the hybrid ``hybrid_id`` (with its runtime:
    ``Hybrid.model_id_``). Results of another hybrid or runtime in the same folder are
    an error: mixing them would make one report of two models."""
    done: dict[str, str] = {}
    for entry in entries:
        if entry.get("hybrid_id") != hybrid_id:
            raise ResultsError(
                "the output folder holds results of another hybrid or runtime "
                f"({entry.get('hybrid_id')!r}, this one is {hybrid_id!r}): choose a new --out"
            )
        if entry.get("sha256"):
            done[entry["path"]] = entry["sha256"]
    return done


def latest_per_image(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per path, the latest (a file changed between runs is predicted again)."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        latest.pop(entry["path"], None)  # keep the order in which results were finished
        latest[entry["path"]] = dict(entry)
    return list(latest.values())


def write_reports(out: str | os.PathLike, hybrid: str, entries: list[dict[str, Any]]) -> None:
    """``predictions.json``, ``predictions.csv``, ``regions.csv`` and the HTML report
    ``report.html`` (``reporting.predict_report``) from the stream's entries."""
    out = Path(out)
    atomic_write_json(out / "predictions.json", {"hybrid": hybrid, "images": entries})
    image_rows = [{**e, "regions": len(e.get("regions", []))} for e in entries]
    atomic_write_csv(out / "predictions.csv", image_rows, IMAGE_COLUMNS)
    region_rows = [{"path": e["path"], **r} for e in entries for r in e.get("regions", [])]
    atomic_write_csv(out / "regions.csv", region_rows, REGION_COLUMNS)
    write_predict_report(out, hybrid, entries)

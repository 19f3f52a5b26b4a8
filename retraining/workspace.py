"""A retraining workspace: what keeps a scheduled retraining safe (a data manifest, atomic
promotion of the champion, a kept history; the run lock is ``artifacts.lock``'s, on ``lock``)
and the intensity window fixed in it.

Workspace layout (``retrain.workspace``)::

    lock                 flock-ed while a run works (the kernel frees it if the run dies)
    lock.holder.json     who holds it: {"pid", "host", "started"}, for messages
    manifest.json        SHA-256 of every data file seen by the last completed run
    holdout.json         the fixed holdout (chosen once), so champion and challenger compare fairly
    intensity.json       the intensity window (fitted once), so every hybrid sees the same scaling
    hybrids/<id>/        complete hybrid folders (each with its own SHA-256 manifest)
    current -> hybrids/<id>    the champion; switched with one atomic rename
    history.jsonl        one line per run: data used, scores, promoted or not, why

A hybrid is built in a temporary folder and renamed into ``hybrids/`` only when complete; the
``current`` link is replaced by renaming a new link over it. Killing the process at any point
leaves ``current`` pointing at a complete champion.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_json, atomic_write_text, sha256_file
from data.images import IMAGE_SUFFIXES, IntensityWindow

log = logging.getLogger(__name__)
CURRENT = "current"


def scan_files(folders: Iterable[str | os.PathLike], root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every image file below ``folders``, keyed by path relative to ``root``."""
    root = Path(root)
    entries = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                entries[path.relative_to(root).as_posix()] = sha256_file(path)
    return entries


def read_manifest(workspace: Path) -> dict[str, str]:
    path = workspace / "manifest.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["files"]


def write_manifest(workspace: Path, files: dict[str, str]) -> None:
    atomic_write_json(workspace / "manifest.json", {"files": files, "written": time.time()})


def new_files(previous: dict[str, str], current: dict[str, str]) -> list[str]:
    """Files added or changed since ``previous``."""
    return sorted(path for path, digest in current.items() if previous.get(path) != digest)


def current_champion(workspace: Path) -> Path | None:
    link = workspace / CURRENT
    if not link.is_symlink() and not link.exists():
        return None
    target = link.resolve()
    return target if target.is_dir() else None


def promote(workspace: Path, hybrid_dir: Path) -> None:
    """Point ``current`` at ``hybrid_dir`` (inside ``workspace/hybrids``) with one rename."""
    hybrid_dir = Path(hybrid_dir)
    if hybrid_dir.parent.resolve() != (workspace / "hybrids").resolve():
        raise ValueError(f"{hybrid_dir} is not inside {workspace / 'hybrids'}")
    tmp = workspace / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(Path("hybrids") / hybrid_dir.name, tmp)
    os.replace(tmp, workspace / CURRENT)


def append_history(workspace: Path, entry: dict[str, Any]) -> None:
    """Append one run to ``history.jsonl`` (rewritten atomically, so a kill never truncates it)."""
    path = workspace / "history.jsonl"
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(entry, default=str) + "\n")


def read_history(workspace: Path) -> list[dict[str, Any]]:
    path = workspace / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def workspace_intensity(
    workspace: Path, training: list[str], data_cfg: Mapping[str, Any]
) -> IntensityWindow:
    """The workspace's intensity window: fitted once, on the first run's training images
    (``data.intensity``), and kept, so every champion, challenger and the holdout see the
    same scaling."""
    path = workspace / "intensity.json"
    if path.is_file():
        return IntensityWindow.from_dict(json.loads(path.read_text()))
    window = IntensityWindow.fit(
        [Path(p) for p in training], data_cfg["intensity"], data_cfg["intensity_percentiles"]
    )
    atomic_write_json(path, window.to_dict())
    log.info("intensity window: %s", window.describe())
    return window

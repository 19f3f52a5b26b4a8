"""Apply a hybrid to many images: each result streamed to disk as soon as it is done, images
already done skipped on a re-run, Ctrl-C honoured between images.

The loop reads top to bottom: for each file, its SHA-256 (a file done before with the same bytes
by the same hybrid is skipped), the image, the panel's uniformity figures, the hybrid's result,
the overlay and map files, one line in the stream.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.io import MANIFEST_NAME, fault_point, sha256_file
from prediction.inputs import Skipped, read_ahead
from prediction.results import ResultStream

log = logging.getLogger(__name__)


def hybrid_id(folder: str | Path) -> str:
    """What identifies a saved hybrid: the SHA-256 of its manifest (which lists every file's)."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


class StopRequest:
    """Ctrl-C while images are predicted: the first finishes the current image and stops
    after it; a second stops at once (the current image is dropped, nothing done is lost)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: finishing the current image, then stopping (Ctrl-C again: now)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class PredictionCounts:
    predicted: int = 0
    skipped: int = 0
    already_done: int = 0
    defective: int = 0
    skipped_paths: list[tuple[str, str]] = field(default_factory=list)


def predict_files(
    hybrid: Any,
    files: Sequence[Path],
    missing: Sequence[Skipped],
    out: Path,
    stream: ResultStream,
    *,
    hybrid_ref: str,
    done: Mapping[str, str],
    prepare: Callable[[Any], Any],
    overlays: bool = True,
    overlay_max_side: int | None = None,
    save_maps: bool = False,
    stop: StopRequest | None = None,
    progress: bool = True,
    read_ahead_images: int = 2,
) -> PredictionCounts:
    """Predict ``files`` with ``hybrid`` and append each result to ``stream`` (``missing``: the
    paths given that were not image files, recorded as skipped).

    ``done`` maps path -> SHA-256 of images finished by this hybrid (``hybrid_ref``) before:
    those are skipped. ``prepare`` turns the image as read into the members' input (the hybrid's
    intensity window). ``read_ahead_images``: how many files are read and decoded ahead.
    """
    from tqdm.auto import tqdm

    from metrics.quality import panel_quality
    from tiling import save_anomaly_map, save_heatmap_overlay

    threshold = hybrid.calibrator_.threshold_
    counts = PredictionCounts()
    for entry in missing:
        log.warning("skipped %s: %s", entry.path, entry.reason)
        counts.skipped += 1
        counts.skipped_paths.append((entry.path, entry.reason))
        stream.append(
            {
                "path": entry.path,
                "hybrid_id": hybrid_ref,
                "status": "skipped",
                "error": entry.reason,
            }
        )
    inputs = read_ahead(files, done, read_ahead_images)
    for item in tqdm(inputs, total=len(files), desc="predict", unit="image", disable=not progress):
        if stop is not None and stop.requested:
            break
        if item.already_done:
            counts.already_done += 1
            continue
        path = item.path
        entry: dict[str, Any] = {"path": str(path), "hybrid_id": hybrid_ref, "sha256": item.sha256}
        if item.skipped is not None:
            entry.update(status="skipped", error=item.skipped)
        else:
            image = item.image
            try:
                quality = panel_quality(image)  # the panel as read, before the members' window
                result = hybrid.predict(prepare(image), member_maps=False)
            except (ValueError, RuntimeError) as exc:
                entry.update(status="skipped", error=str(exc))
            else:
                entry.update(_result_entry(image, result, quality))
                stem = f"{path.stem}-{item.sha256[:10]}"
                if overlays:
                    fused = result["anomaly_map"]
                    entry["overlay"] = str(
                        save_heatmap_overlay(
                            image,
                            fused,
                            out / "overlays" / f"{stem}.png",
                            max_preview_side=overlay_max_side or max(fused.shape),
                            vmin=0.0,
                            vmax=max(2 * threshold, float(fused.max())),
                        )
                    )
                if save_maps:
                    map_path = out / "maps" / f"{stem}.npy"
                    entry["map"] = str(save_anomaly_map(result["anomaly_map"], map_path))
        if entry["status"] == "ok":
            counts.predicted += 1
            counts.defective += int(entry["label"])
        else:
            log.warning("skipped %s: %s", path, entry["error"])
            counts.skipped += 1
            counts.skipped_paths.append((str(path), entry["error"]))
        stream.append(entry)
        fault_point("predict_image_done")
    return counts


def _result_entry(image: Any, result: Mapping[str, Any], quality: Mapping[str, Any]) -> dict:
    return {
        "status": "ok",
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "score": result["score"],
        "label": result["label"],
        "level": result["level"],
        "regions": [r.to_dict() for r in result["regions"]],
        **quality,
    }

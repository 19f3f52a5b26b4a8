"""Apply a hybrid to many images: each result streamed to disk as soon as it is done, images
already done skipped on a re-run, Ctrl-C honoured between images.

The loop reads top to bottom: for each file, its SHA-256 (a file done before with the same bytes
by the same hybrid is skipped) and the image; for each batch, the hybrid's results
(``Hybrid.predict_batch``); for each image, the panel's uniformity figures, the overlay and map
files, one line in the stream.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.io import fault_point
from fusion.hybrid import Hybrid, Prediction
from prediction.inputs import InputImage, Skipped, read_ahead
from prediction.results import ResultStream

log = logging.getLogger(__name__)


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


def record_missing(
    missing: Sequence[Skipped], stream: ResultStream, hybrid_ref: str
) -> PredictionCounts:
    """The paths given that were not image files, each recorded in ``stream`` as skipped."""
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
    return counts


def predict_options(section: Mapping[str, Any]) -> dict[str, Any]:
    """``predict_files``' keywords from the ``predict`` configuration section (overlays, maps,
    read-ahead, batching), one place for every executor."""
    return {
        "overlays": section["overlays"],
        "overlay_max_side": section["overlay_max_side"],
        "save_maps": section["save_maps"],
        "read_ahead_images": section["read_ahead"],
        "batch_size": section["batch_size"],
        "batch_megapixels": section["batch_megapixels"],
    }


def predict_files(
    hybrid: Hybrid,
    files: Sequence[Path],
    missing: Sequence[Skipped],
    out: Path,
    stream: ResultStream,
    *,
    done: Mapping[str, str],
    overlays: bool = True,
    overlay_max_side: int | None = None,
    save_maps: bool = False,
    stop: StopRequest | None = None,
    progress: bool = True,
    read_ahead_images: int = 2,
    batch_size: int = 4,
    batch_megapixels: float = 16.0,
) -> PredictionCounts:
    """Predict ``files`` with ``hybrid`` and append each result to ``stream`` (``missing``: the
    paths given that were not image files, recorded as skipped).

    ``hybrid``: loaded with ``Hybrid.load`` (its results record its ``model_id_``). ``done`` maps
    path -> SHA-256 of images finished by that model before: those are skipped.
    ``read_ahead_images``: how many files are read and decoded ahead. Images go to
    ``Hybrid.predict_batch`` ``batch_size`` at a time (fewer once a batch holds
    ``batch_megapixels``); its results, the quality figures and the files follow image by image.
    """
    from tqdm.auto import tqdm

    from metrics.quality import panel_quality
    from tiling import save_anomaly_map, save_heatmap_overlay

    counts = record_missing(missing, stream, hybrid.model_id_)
    warned = False

    def record(item: InputImage, entry: dict[str, Any]) -> None:
        if entry["status"] == "ok":
            counts.predicted += 1
            counts.defective += int(entry["label"])
        else:
            log.warning("skipped %s: %s", item.path, entry["error"])
            counts.skipped += 1
            counts.skipped_paths.append((str(item.path), entry["error"]))
        stream.append(entry)
        fault_point("predict_image_done")

    def predict_batch(batch: list[InputImage]) -> None:
        """The batch's results from the hybrid, then each image's figures, files and line; a
        stop request ends it after the image in hand."""
        nonlocal warned
        images = [item.image for item in batch if item.image is not None]
        # The fused maps go to files in the output folder, read back in bands.
        results = hybrid.predict_batch(images, map_folder=out)
        for item in batch:
            entry: dict[str, Any] = {
                "path": str(item.path),
                "hybrid_id": hybrid.model_id_,
                "sha256": item.sha256,
            }
            result = next(results) if item.skipped is None else None
            if item.skipped is not None:
                entry.update(status="skipped", error=item.skipped)
            elif isinstance(result, Exception):
                entry.update(status="skipped", error=str(result))
            else:
                with result.anomaly_map:
                    # As read, before the members' intensity window.
                    entry.update(_result_entry(item.image, result, panel_quality(item.image)))
                    entry.update(write_files(item, result))
                if result.warning and not warned:  # each result holds it; the log once
                    log.warning("%s: %s", item.path, result.warning)
                    warned = True
            record(item, entry)
            if stop is not None and stop.requested:
                results.close()
                return

    def write_files(item: InputImage, result: Prediction) -> dict[str, str]:
        files: dict[str, str] = {}
        stem = f"{item.path.stem}-{item.sha256[:10]}"
        fused = result.anomaly_map
        if overlays:
            files["overlay"] = str(
                save_heatmap_overlay(
                    item.image,
                    fused,
                    out / "overlays" / f"{stem}.png",
                    max_preview_side=overlay_max_side or max(fused.shape),
                    vmin=0.0,
                    vmax=max(2 * result.pixel_threshold, float(fused.max())),
                    decision=result.decision(),
                )
            )
        if save_maps:
            files["map"] = str(save_anomaly_map(fused, out / "maps" / f"{stem}.npy"))
        return files

    batch: list[InputImage] = []
    inputs = read_ahead(files, done, read_ahead_images)
    for item in tqdm(inputs, total=len(files), desc="predict", unit="image", disable=not progress):
        if stop is not None and stop.requested:
            break
        if item.already_done:
            counts.already_done += 1
            continue
        batch.append(item)
        pixels = sum(i.image.shape[0] * i.image.shape[1] for i in batch if i.image is not None)
        # A batch ends at batch_size images or batch_megapixels (a few panels fill it).
        if len(batch) == batch_size or pixels >= batch_megapixels * 1e6:
            predict_batch(batch)
            batch = []
    if batch and not (stop is not None and stop.requested):
        predict_batch(batch)
    return counts


def _result_entry(image: Any, result: Prediction, quality: Mapping[str, Any]) -> dict:
    return {
        "status": "ok",
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "score": result.score,
        "label": result.label,
        "level": result.level,
        "regions": [r.to_dict() for r in result.regions],
        **quality,
        **({"warning": result.warning} if result.warning else {}),
    }

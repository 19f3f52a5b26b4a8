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
from functools import partial
from pathlib import Path
from typing import Any

from artifacts.io import fault_point
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


def hybrid_window(hybrid: Any) -> Any:
    """The intensity window the hybrid's members were trained with (fitted on their training
    images), never one fitted on the images predicted. Hybrids saved without one: integers /
    their type's maximum."""
    from data.images import IntensityWindow

    saved = hybrid.options.get("intensity")
    return IntensityWindow.from_dict(saved) if saved else IntensityWindow()


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
    batch_size: int = 4,
    batch_megapixels: float = 16.0,
) -> PredictionCounts:
    """Predict ``files`` with ``hybrid`` and append each result to ``stream`` (``missing``: the
    paths given that were not image files, recorded as skipped).

    ``done`` maps path -> SHA-256 of images finished by this hybrid (``hybrid_ref``) before:
    those are skipped. ``prepare`` turns the image as read into the members' input (the hybrid's
    intensity window): elementwise, as it is applied window by window (``LazyImage``: a panel
    stays in its file's dtype). ``read_ahead_images``: how many files are read and decoded ahead.
    Images go through the members ``batch_size`` at a time (fewer once a batch holds
    ``batch_megapixels``); fusion, grading and files follow image by image.
    """
    from tqdm.auto import tqdm

    from data.images import LazyImage
    from metrics.quality import panel_quality
    from tiling import save_anomaly_map, save_heatmap_overlay

    threshold = hybrid.calibrator_.threshold_
    counts = record_missing(missing, stream, hybrid_ref)
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
        """The batch's member pass at once, then each image's fusion, grading and files; a
        stop request ends it after the image in hand."""
        nonlocal warned
        prepared = {
            k: LazyImage(item.image, prepare)
            for k, item in enumerate(batch)
            if item.image is not None
        }
        outputs = _member_outputs(hybrid, prepared, out)
        for k, item in enumerate(batch):
            entry: dict[str, Any] = {
                "path": str(item.path),
                "hybrid_id": hybrid_ref,
                "sha256": item.sha256,
            }
            if item.skipped is not None:
                entry.update(status="skipped", error=item.skipped)
            elif isinstance(outputs[k], Exception):
                entry.update(status="skipped", error=str(outputs[k]))
            else:
                try:
                    quality = panel_quality(item.image)  # as read, before the members' window
                    # The fused map goes to a file in the output folder, read back in bands.
                    result = hybrid.predict(
                        prepared[k], outputs[k], member_maps=False, map_folder=out
                    )
                except (ValueError, RuntimeError) as exc:
                    entry.update(status="skipped", error=str(exc))
                else:
                    with result["anomaly_map"]:
                        entry.update(_result_entry(item.image, result, quality))
                        entry.update(write_files(item, result))
                    if result["warning"] and not warned:  # each result holds it; the log once
                        log.warning("%s: %s", item.path, result["warning"])
                        warned = True
            record(item, entry)
            if stop is not None and stop.requested:
                return

    def write_files(item: InputImage, result: Mapping[str, Any]) -> dict[str, str]:
        files: dict[str, str] = {}
        stem = f"{item.path.stem}-{item.sha256[:10]}"
        fused = result["anomaly_map"]
        if overlays:
            files["overlay"] = str(
                save_heatmap_overlay(
                    item.image,
                    fused,
                    out / "overlays" / f"{stem}.png",
                    max_preview_side=overlay_max_side or max(fused.shape),
                    vmin=0.0,
                    vmax=max(2 * threshold, float(fused.max())),
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


def _member_outputs(hybrid: Any, images: Mapping[int, Any], map_folder: Path) -> dict[int, Any]:
    """Each image's member outputs, in one batched pass; where that fails, image by image, so
    that one bad image is skipped with its own error and the others go on. A tiled hybrid's
    member maps go to temporary files in ``map_folder``, as the fused map does."""
    batch = partial(hybrid.member_outputs_batch, at_image_size=False, map_folder=map_folder)
    try:
        outputs = batch(list(images.values()))
        return dict(zip(images, outputs))
    except (ValueError, RuntimeError):
        found: dict[int, Any] = {}
        for k, image in images.items():
            try:
                found[k] = batch([image])[0]
            except (ValueError, RuntimeError) as exc:
                found[k] = exc
        return found


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
        **({"warning": result["warning"]} if result["warning"] else {}),
    }

"""python -m pipelines.predict — apply a hybrid to images or folders of any size.

    python -m pipelines.predict --hybrid reports/RUN/hybrid-rank-top3/hybrid panels/ one.png

Writes, in ``--out``: ``predictions.json`` (per image: score, label, level, its regions with
type, level, bbox, area, contrast, SEMU, score, and the panel's uniformity figures from
``metrics.quality.panel_quality``), ``predictions.csv`` (one row per image),
``regions.csv`` (one row per region), ``overlays/`` (heatmap overlay PNGs at the original
resolution) and ``skipped`` entries for files that could not be read: a bad file is reported and
skipped, the others are still processed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_csv, atomic_write_json
from configs import ConfigError, Flag, add_config_arguments, load_config
from pipelines.common import PipelineError, main_guard, setup_logging

log = logging.getLogger("pipelines.predict")

IMAGE_COLUMNS = (
    "path",
    "status",
    "score",
    "label",
    "level",
    "regions",
    "mura_energy_pct",
    "delta_e2000_mean",
    "delta_e2000_p99",
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.predict", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--hybrid", help="the hybrid folder")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("paths", nargs="+", help="image files and folders")
    return parser.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[Flag]:
    """--hybrid and --out as overrides (applied after --set, so they win); paths stay text."""
    flags = [Flag("predict.hybrid", args.hybrid, "--hybrid")] if args.hybrid else []
    return flags + ([Flag("predict.out", args.out, "--out")] if args.out else [])


@main_guard
def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from data.images import IntensityWindow
    from fusion.hybrid import Hybrid
    from metrics.quality import panel_quality
    from pipelines.inputs import expand_inputs, read_inputs
    from tiling import save_anomaly_map, save_heatmap_overlay

    args = parse_args(argv)
    cfg = load_config("predict", args.config, [*args.overrides, *overrides_from_flags(args)])
    opts = cfg["predict"]
    if opts["overlay_max_side"] is not None and opts["overlay_max_side"] <= 0:
        raise ConfigError(
            "predict.overlay_max_side must be a positive number or null, "
            f"got {opts['overlay_max_side']}"
        )
    if not opts["hybrid"]:
        raise PipelineError("no hybrid given: pass --hybrid DIR (or predict.hybrid)")
    out = Path(opts["out"] or f"predictions-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "log.txt")
    hybrid = Hybrid.load(opts["hybrid"])
    threshold = hybrid.calibrator_.threshold_
    # The intensity window the members were trained with (fitted on their training images),
    # never one fitted on the images predicted. Hybrids saved without one: integers / type max.
    saved_window = hybrid.options.get("intensity")
    window = IntensityWindow.from_dict(saved_window) if saved_window else IntensityWindow()
    log.info("intensity window: %s", window.describe())
    files, skipped = expand_inputs(args.paths)
    predictions: list[dict[str, Any]] = [
        {"path": s.path, "status": "skipped", "error": s.reason} for s in skipped
    ]
    region_rows: list[dict[str, Any]] = []
    for number, (path, image) in enumerate(
        tqdm(read_inputs(files), total=len(files), desc="predict", unit="image")
    ):
        if not hasattr(image, "shape"):  # a Skipped: unreadable or unusable file
            log.warning("skipped %s: %s", image.path, image.reason)
            predictions.append({"path": image.path, "status": "skipped", "error": image.reason})
            continue
        try:
            # The panel as read, before the members' intensity window.
            quality = panel_quality(image)
            image = window(image)
            result = hybrid.predict(image)
        except (ValueError, RuntimeError) as exc:
            log.warning("skipped %s: %s", path, exc)
            predictions.append({"path": str(path), "status": "skipped", "error": str(exc)})
            continue
        regions = [r.to_dict() for r in result["regions"]]
        entry = {
            "path": str(path),
            "status": "ok",
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "score": result["score"],
            "label": result["label"],
            "level": result["level"],
            "regions": regions,
            **quality,
        }
        stem = f"{number:05d}-{path.stem}"
        if opts["overlays"]:
            fused = result["anomaly_map"]
            entry["overlay"] = str(
                save_heatmap_overlay(
                    image,
                    fused,
                    out / "overlays" / f"{stem}.png",
                    max_preview_side=opts["overlay_max_side"] or max(fused.shape),
                    vmin=0.0,
                    vmax=max(2 * threshold, float(fused.max())),
                )
            )
        if opts["save_maps"]:
            map_path = out / "maps" / f"{stem}.npy"
            entry["map"] = str(save_anomaly_map(result["anomaly_map"], map_path))
        predictions.append(entry)
        region_rows += [{"path": str(path), **r} for r in regions]
    image_rows = [{**p, "regions": len(p.get("regions", []))} for p in predictions]
    atomic_write_json(
        out / "predictions.json", {"hybrid": str(opts["hybrid"]), "images": predictions}
    )
    atomic_write_csv(out / "predictions.csv", image_rows, IMAGE_COLUMNS)
    atomic_write_csv(out / "regions.csv", region_rows, REGION_COLUMNS)
    done = [p for p in predictions if p["status"] == "ok"]
    print(
        f"{len(done)} image(s) predicted, {len(predictions) - len(done)} skipped; "
        f"{sum(p['label'] for p in done)} defective\nresults: {out / 'predictions.json'}"
    )
    for p in predictions:
        if p["status"] != "ok":
            print(f"skipped {p['path']}: {p['error']}")
    if not done:
        raise PipelineError("no image could be predicted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

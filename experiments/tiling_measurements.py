"""Measurements behind ``python -m pipelines.tiling_benchmark``: merge exactness, and the speed,
peak memory and accuracy of streaming tiled inference on synthetic high-resolution panels, by a
member fitted on tiles of defect-free panels (``fit_member_on_tiles``).

Each panel size is measured in a fresh process (``measure_panel``), so one size's peak resident
memory does not hide the next one's. The panel is written to disk first, by yet another process,
and read back as a ``numpy.memmap``: the measuring process never holds the whole image.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.memory import current_rss_bytes, peak_rss_bytes
from tiling.grid import REDUCTIONS, MapAccumulator, TileGrid


def fit_member_on_tiles(cfg: dict[str, Any], out_dir: Path) -> Path:
    """Fit the configured member on random tiles of defect-free panels; save it to out_dir."""
    import torch
    from torch.utils.data import DataLoader

    from data.datasets import collate_samples
    from data.synthetic import PanelGenerator
    from members.build import build_member, build_trainer, member_options, trainer_options
    from tiling import TiledDataset

    bench, tiling = cfg["tiling_benchmark"], cfg["tiling"]
    generator = PanelGenerator(size=bench["train_panel_size"], seed=cfg["seed"])
    panels = [
        {
            "image": torch.from_numpy(generator.generate_normal(i)["image"])[None],
            "mask": torch.zeros(1, bench["train_panel_size"], bench["train_panel_size"]),
            "label": 0,
        }
        for i in range(bench["train_panels"])
    ]
    tiles = TiledDataset(
        panels, tiling["tile_size"], mode="random", crops_per_image=bench["crops_per_panel"]
    )
    loader = DataLoader(tiles, batch_size=tiling["batch_size"], collate_fn=collate_samples)
    name = bench["member"]
    member = build_member(name, member_options(cfg["members"], name))
    trainer = build_trainer(
        cfg["device"],
        trainer_options(cfg["trainer"], cfg["members"], name),
        seed=cfg["seed"],
        progress=False,
    )
    member.fit(loader, None, trainer)
    return member.save(out_dir)


def merge_errors(
    sizes: list[tuple[int, int]], tile_size: int, strides: list[int], seed: int = 0
) -> list[dict[str, Any]]:
    """Max abs error of merging the tiles of a random float32 map back, per size, stride and
    reduction (``max`` merges identical values, so it must be exact too). Tiles are added one
    batch at a time, as in streaming inference."""
    rng = np.random.default_rng(seed)
    rows = []
    for height, width in sizes:
        truth = rng.random((1, height, width), dtype=np.float32)
        for stride in strides:
            grid = TileGrid(height, width, tile_size, stride)
            for reduction in REDUCTIONS:
                accumulator = MapAccumulator(height, width, tile_size, reduction)
                coords = grid.coords
                for start in range(0, len(coords), 64):
                    chunk = coords[start : start + 64]
                    maps = np.stack([truth[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
                    accumulator.add(maps, chunk)
                merged = accumulator.result()
                rows.append(
                    {
                        "height": height,
                        "width": width,
                        "tile_size": tile_size,
                        "stride": stride,
                        "reduction": reduction,
                        "tiles": len(coords),
                        "max_abs_error": float(np.abs(merged - truth).max()),
                    }
                )
                del accumulator, merged
        del truth
    return rows


def write_panel(folder: str | Path, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """A defective synthetic panel of ``height x width`` as 16-bit ``image.npy`` (a camera's
    raw depth) and its bool ``mask.npy``; returns the defect count and area.

    Its defects are the sharp, few-pixel kinds (pixels, lines, scratches, particles) that
    downscaling a whole panel loses and tiling is for; mura spans hundreds of pixels at a
    contrast below the panel's own nonuniformity, and is graded on a downscaled view instead."""
    from data.synthetic import SHARP_TYPES, PanelGenerator

    folder = Path(folder)
    generator = PanelGenerator(
        size=(height, width), defect_types=SHARP_TYPES, max_defects=6, seed=seed
    )
    sample = generator.generate_defective(0)
    folder.mkdir(parents=True, exist_ok=True)
    image = np.round(np.clip(sample["image"], 0, 1) * 65535).astype(np.uint16)
    np.save(folder / "image.npy", image)
    np.save(folder / "mask.npy", np.asarray(sample["mask"], dtype=bool))
    return {"defects": len(sample["defects"]), "defect_px": int(np.count_nonzero(sample["mask"]))}


def pixel_auroc_sampled(
    anomaly_map: np.ndarray, mask: np.ndarray, n_normal: int = 2_000_000, seed: int = 0
) -> float:
    """Pixel AUROC over every defect pixel and a random sample of defect-free ones (a full-
    resolution sort of tens of millions of pixels would dominate the measurement)."""
    from sklearn.metrics import roc_auc_score

    flat_map, flat_mask = anomaly_map.reshape(-1), mask.reshape(-1)
    defect = np.flatnonzero(flat_mask)
    if len(defect) == 0:
        return float("nan")
    normal_count = flat_mask.size - len(defect)
    rng = np.random.default_rng(seed)
    picks = rng.choice(flat_mask.size, size=min(n_normal * 2, flat_mask.size), replace=False)
    normal = picks[~flat_mask[picks]][:n_normal] if normal_count else picks[:0]
    scores = np.concatenate([flat_map[defect], flat_map[normal]])
    labels = np.concatenate([np.ones(len(defect)), np.zeros(len(normal))])
    return float(roc_auc_score(labels, scores))


def measure_panel(
    member_dir: str | Path,
    panel_dir: str | Path,
    tile_size: int,
    stride: int,
    batch_size: int,
    reduction: str,
    pad_mode: str | None = None,
) -> dict[str, Any]:
    """Run a saved member tile by tile over ``panel_dir``'s image (memory-mapped) and measure
    wall time, seconds per megapixel and peak RSS against ``estimate_memory``'s prediction."""
    import torch

    from members import load_member
    from tiling.inference import estimate_memory, infer_tiled

    torch.set_grad_enabled(False)
    panel_dir = Path(panel_dir)
    member = load_member(member_dir).eval()
    image = np.load(panel_dir / "image.npy", mmap_mode="r")
    height, width = image.shape[:2]
    estimate = estimate_memory(member, (1, height, width), tile_size, stride, batch_size)
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    out = infer_tiled(member, image, tile_size, stride, batch_size, reduction, pad_mode=pad_mode)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    mask = np.load(panel_dir / "mask.npy", mmap_mode="r")
    megapixels = height * width / 1e6
    return {
        "height": height,
        "width": width,
        "megapixels": round(megapixels, 2),
        "tiles": len(TileGrid(height, width, tile_size, stride, pad_mode)),
        "seconds": round(seconds, 1),
        "s_per_mp": round(seconds / megapixels, 2),
        "rss_before_mb": round(rss_before / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "added_by_inference_mb": round((peak - rss_before) / 2**20),
        "estimate_mb": round(estimate["total"] / 2**20),
        "estimate_merged_maps_mb": round(estimate["merged_maps"] / 2**20),
        "estimate_per_batch_mb": round(
            (estimate["batch_input"] + estimate["batch_output"] + estimate["activations"]) / 2**20
        ),
        "image_score": out["pred_score"],
        "pixel_auroc": round(pixel_auroc_sampled(out["anomaly_map"][0], np.asarray(mask)), 4),
    }

"""High-resolution panels: tile grids, exact merging, streaming tiled inference, tiled training
data and heatmap overlays at original resolution."""

from tiling.dataset import TiledDataset, evaluate_tiled
from tiling.grid import REDUCTIONS, MapAccumulator, TileGrid, tile, untile, window
from tiling.inference import estimate_memory, infer_tiled, infer_tiled_options
from tiling.visualize import Decision, colormap, save_anomaly_map, save_heatmap_overlay

__all__ = [
    "REDUCTIONS",
    "MapAccumulator",
    "TileGrid",
    "TiledDataset",
    "Decision",
    "colormap",
    "estimate_memory",
    "evaluate_tiled",
    "infer_tiled",
    "infer_tiled_options",
    "save_anomaly_map",
    "save_heatmap_overlay",
    "tile",
    "untile",
    "window",
]

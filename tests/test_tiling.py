"""Tiling: grids, exact merging, streaming inference, tiled data, overlays."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.maps import MapOnDisk
from members.base import ScoreAggregator, aggregate_scores
from tiling import (
    REDUCTIONS,
    MapAccumulator,
    TiledDataset,
    TileGrid,
    colormap,
    estimate_memory,
    infer_tiled,
    save_anomaly_map,
    save_heatmap_overlay,
    tile,
    untile,
)


class LocalContrast(torch.nn.Module):
    """A stand-in member: the map is |image - local mean|, a fixed function of the pixels.
    It records the largest batch it saw, to check streaming."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.largest_batch = 0

    def forward(self, images):
        self.largest_batch = max(self.largest_batch, images.shape[0])
        gray = images.mean(1, keepdim=True)
        local = F.avg_pool2d(gray, 5, stride=1, padding=2, count_include_pad=False)
        maps = (gray - local).abs() * self.scale
        return {"anomaly_map": maps, "pred_score": maps.flatten(1).amax(1)}

    def compute_anomaly_score(self, anomaly_map):
        return aggregate_scores(anomaly_map, "max")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("height", "width", "tile_size", "stride"),
    [
        (64, 64, 32, 32),
        (100, 70, 32, 20),
        (37, 129, 37, 11),
        (200, 150, 64, 48),
        (33, 33, 32, 1),
    ],
)
def test_merging_the_tiles_of_a_map_reconstructs_it_exactly(
    height, width, tile_size, stride, reduction
):
    full = torch.rand(1, height, width, generator=torch.Generator().manual_seed(height + width))
    tiles, coords = tile(full, tile_size, stride)
    merged = untile(tiles, coords, (height, width), reduction)
    assert merged.shape == full.shape
    assert (merged - full).abs().max() <= 1e-6


def test_grid_aligns_the_last_tiles_with_the_edges():
    grid = TileGrid(100, 70, 32, 30)
    coords = grid.coords
    assert coords[:, 2].max() == 100 and coords[:, 3].max() == 70
    assert (coords[:, 2] - coords[:, 0] == 32).all() and (coords >= 0).all()
    covered = np.zeros((100, 70), bool)
    for y0, x0, y1, x1 in coords:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_bad_grids_are_clear_errors():
    with pytest.raises(ValueError, match="smaller than one 64 px tile"):
        TileGrid(50, 200, 64, 32)
    with pytest.raises(ValueError, match="stride"):
        TileGrid(100, 100, 32, 40)
    with pytest.raises(ValueError, match="tile_size must be a positive"):
        TileGrid(100, 100, 0, 1)
    with pytest.raises(ValueError, match="pad_mode"):
        TileGrid(10, 10, 32, 32, pad_mode="wrap")


def test_explicit_padding_handles_images_smaller_than_a_tile():
    image = torch.rand(1, 20, 50)
    tiles, coords = tile(image, 32, 16, pad_mode="reflect")
    assert tiles.shape[-2:] == (32, 32)
    merged = untile(tiles, coords, (20, 50), "hann")
    assert (merged - image).abs().max() <= 1e-6


def test_untile_needs_no_earlier_tile_call():
    maps = torch.ones(4, 1, 8, 8) * torch.arange(4).view(4, 1, 1, 1)
    coords = torch.tensor([[0, 0, 8, 8], [0, 8, 8, 16], [8, 0, 16, 8], [8, 8, 16, 16]])
    merged = untile(maps, coords, (16, 16), "mean")
    assert (
        merged[0, 0, 0] == 0
        and merged[0, 0, 15] == 1
        and merged[0, 15, 0] == 2
        and merged[0, 15, 15] == 3
    )


def test_hann_window_does_not_zero_the_image_corners():
    maps = torch.ones(1, 1, 32, 32)
    merged = untile(maps, torch.tensor([[0, 0, 32, 32]]), (32, 32), "hann")
    assert torch.allclose(merged, torch.ones_like(merged))


def test_tiled_and_untiled_inference_agree_on_a_single_tile_image():
    member = LocalContrast().eval()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    direct = member(image[None])["anomaly_map"][0].detach().numpy()
    for reduction in REDUCTIONS:
        out = infer_tiled(member, image, tile_size=64, stride=64, reduction=reduction)
        assert np.array_equal(out["anomaly_map"], direct)
        assert out["pred_score"] == pytest.approx(float(direct.max()))


def test_streaming_sends_one_batch_at_a_time_and_accepts_arrays():
    member = LocalContrast().eval()
    image = np.random.default_rng(0).random((300, 260, 3)).astype(np.float32)
    out = infer_tiled(member, image, tile_size=64, stride=48, batch_size=5, reduction="gaussian")
    assert out["anomaly_map"].shape == (1, 300, 260) and out["anomaly_map"].dtype == np.float32
    assert np.isfinite(out["anomaly_map"]).all()
    assert member.largest_batch == 5  # 36 tiles, never more than one batch at once
    memory = estimate_memory(member, (3, 300, 260), 64, 48, batch_size=5)
    big = estimate_memory(member, (3, 3000, 2600), 64, 48, batch_size=5)
    # Only the merged maps grow with the image; the per-batch parts do not.
    assert (
        big["batch_input"] == memory["batch_input"] and big["activations"] == memory["activations"]
    )
    assert big["merged_maps"] == 100 * memory["merged_maps"]


def test_a_defect_is_found_at_full_resolution():
    member = LocalContrast().eval()
    image = torch.full((3, 256, 384), 0.5)
    image[:, 200:203, 301:304] = 1.0  # a 3-px bright spot, near no tile centre
    out = infer_tiled(member, image, tile_size=64, stride=40, batch_size=16)
    peak = np.unravel_index(np.argmax(out["anomaly_map"][0]), (256, 384))
    assert 198 <= peak[0] <= 204 and 299 <= peak[1] <= 305


def test_tiled_dataset_covers_images_and_draws_new_crops_each_epoch(tmp_path):
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            mask = torch.zeros(1, 100, 130)
            mask[0, 10:20, 10:20] = i
            return {"image": torch.rand(3, 100, 130), "mask": mask, "label": i, "path": f"{i}.png"}

    all_tiles = TiledDataset(Images(), tile_size=64, stride=36, mode="all")
    assert len(all_tiles) == 2 * len(TileGrid(100, 130, 64, 36))
    labels = [all_tiles[k]["label"] for k in range(len(all_tiles))]
    assert 0 < sum(labels) < len(labels) / 2  # only tiles that hold the defect are defective
    random_tiles = TiledDataset(Images(), tile_size=64, mode="random", crops_per_image=3)
    first = [random_tiles[k]["tile_coords"].tolist() for k in range(6)]
    random_tiles.set_epoch(1)
    second = [random_tiles[k]["tile_coords"].tolist() for k in range(6)]
    assert first != second and random_tiles[0]["image"].shape == (3, 64, 64)


def test_overlay_and_map_files(tmp_path):
    image = np.random.default_rng(0).random((900, 3000)).astype(np.float32)
    heat = np.zeros((900, 3000), np.float32)
    heat[100:200, 1000:1200] = 5.0
    path = save_heatmap_overlay(image, heat, tmp_path / "overlay.png", max_preview_side=1000)
    with Image.open(path) as overlay:
        assert overlay.size == (1000, 300) and overlay.mode == "RGB"
        pixels = np.asarray(overlay).astype(int)
    assert pixels[50, 350].tolist() != pixels[5, 5].tolist()  # the hot region is coloured
    saved = save_anomaly_map(heat, tmp_path / "map.npy")
    assert np.array_equal(np.load(saved), heat)
    png = save_anomaly_map(heat, tmp_path / "map.png")
    with Image.open(png) as im:
        assert np.asarray(im).max() == 65535 and im.text["range"] == "0.0 5.0"
    # A 16-bit camera image is shown as it looks, not clipped to white.
    raw = np.round(image * 65535).astype(np.uint16)
    from_raw = save_heatmap_overlay(raw, heat, tmp_path / "raw.png", max_preview_side=1000)
    with Image.open(from_raw) as overlay:
        assert np.abs(np.asarray(overlay).astype(int) - pixels).max() <= 1


def test_a_panel_overlay_and_map_written_band_by_band_are_those_of_the_whole_image(
    kolektorsdd_dir, tmp_path, monkeypatch
):
    """A real 8-bit image as its file holds it and its map on disk, written a few rows at a time
    (a panel's RGB overlay would be hundreds of megabytes): the overlay is the blend computed on
    the whole image, the .npy map is the map, and the temporary map file leaves nothing behind."""
    import data.maps
    from data.images import read_image

    path = sorted((kolektorsdd_dir / "test" / "crack").iterdir())[0]
    raw = read_image(path, keep_integers=True)
    image = read_image(path)
    assert raw.dtype == np.uint8 and np.array_equal(raw / np.float32(255), image)
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    heat = np.exp(-((rows - 600.0) ** 2 + (cols - 250.0) ** 2) / 80.0**2).astype(np.float32)
    monkeypatch.setattr(data.maps, "BAND_PIXELS", 7 * image.shape[1])
    folder = tmp_path / "maps"
    folder.mkdir()
    with MapOnDisk(heat.shape, folder) as on_disk:
        assert list(folder.iterdir()) == []  # an unnamed file
        for start in range(0, heat.shape[0], 100):
            on_disk[start : start + 100] = heat[start : start + 100]
        assert np.array_equal(np.asarray(on_disk), heat)
        assert np.array_equal(on_disk[5:300, 7:90], heat[5:300, 7:90])
        assert on_disk.max() == heat.max() and on_disk.min() == heat.min()
        written = save_heatmap_overlay(raw, on_disk, tmp_path / "o.png", 5000, vmin=0, vmax=1)
        assert np.array_equal(np.load(save_anomaly_map(on_disk, tmp_path / "m.npy")), heat)
    alpha = 0.45  # the blend on the whole image at once
    blended = (1 - alpha) * np.clip(image, 0, 1)[..., None] + alpha * colormap(heat)
    with Image.open(written) as overlay:
        assert overlay.size == image.shape[::-1]
        assert np.array_equal(np.asarray(overlay), np.round(blended * 255).astype(np.uint8))
    assert list(folder.iterdir()) == []
    with pytest.raises(TypeError, match="slices of rows"):
        on_disk[3]


@pytest.mark.slow
def test_kolektorsdd_image_runs_tiled_end_to_end(kolektorsdd_dir):
    from data.images import read_image, to_tensor

    path = sorted((kolektorsdd_dir / "test" / "crack").iterdir())[0]
    image = to_tensor(read_image(path), 3)
    member = LocalContrast().eval()
    out = infer_tiled(member, image, tile_size=256, stride=192, batch_size=4)
    assert out["anomaly_map"].shape == (1, *image.shape[-2:])
    assert np.isfinite(out["anomaly_map"]).all()


def test_integer_and_memory_mapped_images_are_read_tile_by_tile(tmp_path):
    member = LocalContrast().eval()
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, size=(150, 210), dtype=np.uint16)
    np.save(tmp_path / "panel.npy", raw)
    mapped = np.load(tmp_path / "panel.npy", mmap_mode="r")
    tiled = infer_tiled(member, mapped, tile_size=64, stride=48, batch_size=3)
    # The same as the [0, 1] float image: integers are scaled by their type's full range.
    scaled = torch.from_numpy(raw.astype(np.float32) / 65535)[None]
    expected = infer_tiled(member, scaled, tile_size=64, stride=48, batch_size=3)
    assert np.allclose(tiled["anomaly_map"], expected["anomaly_map"], atol=1e-6)
    # Channels-last 8-bit colour images too.
    rgb = rng.integers(0, 256, size=(100, 90, 3), dtype=np.uint8)
    out = infer_tiled(member, rgb, tile_size=64, stride=40)
    direct = infer_tiled(member, torch.from_numpy(rgb / 255.0).permute(2, 0, 1), 64, 40)
    assert np.allclose(out["anomaly_map"], direct["anomaly_map"], atol=1e-6)


class TwoChannels(LocalContrast):
    """``LocalContrast`` and its square as two map channels, each scored on its own (as a
    ``MemberSet`` scores its members), by ``score_from_tiles``."""

    def __init__(self, score_from_tiles=("map", "max")):
        super().__init__()
        self.score_from_tiles = score_from_tiles

    def forward(self, images):
        contrast = super().forward(images)["anomaly_map"]
        maps = torch.cat([contrast, contrast**2], 1)
        return {"anomaly_map": maps, "pred_score": maps.flatten(2).amax(2)}

    def compute_channel_score(self, channel, anomaly_map):
        return aggregate_scores(anomaly_map, "topk", topk_percent=1.0)

    def channel_score_aggregator(self, channel, height, width):
        return ScoreAggregator(height, width, "topk", topk_percent=1.0)


def test_a_panel_merges_band_by_band_into_maps_on_disk(tmp_path, monkeypatch):
    """A 16-bit panel as its file holds it (a ``LazyImage``, converted tile by tile), its two
    channels merged a band of rows at a time and written to disk: the maps and scores are those
    of the whole image converted and merged in memory, and neither the merge nor the scores
    hold a full-size map (numpy's traced peak is under half of one; merging the whole image in
    memory held five)."""
    import tracemalloc

    import data.maps
    from data.images import LazyImage, to_tensor

    raw = np.random.default_rng(2).integers(0, 65536, size=(2400, 600), dtype=np.uint16)
    raw[700:704, 300:380] = 65535  # a bright line across a tile seam
    monkeypatch.setattr(data.maps, "BAND_PIXELS", 50 * 600)  # a panel's bands, scaled
    lazy = LazyImage(raw)
    member = TwoChannels().eval()
    options = {"tile_size": 64, "stride": 48, "batch_size": 8}
    in_memory = infer_tiled(member, to_tensor(np.asarray(lazy)), **options)
    on_disk = infer_tiled(member, lazy, **options, map_folder=tmp_path)
    assert len(on_disk["anomaly_map"]) == 2 and list(tmp_path.iterdir()) == []  # unnamed files
    for channel, expected in zip(on_disk["anomaly_map"], in_memory["anomaly_map"]):
        assert np.array_equal(np.asarray(channel), expected)
    np.testing.assert_array_equal(on_disk["pred_score"], in_memory["pred_score"])
    # Scored band by band from disk, no channel is ever read back whole.
    tracemalloc.start()
    try:
        infer_tiled(member, lazy, **options, map_folder=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < raw.size * 4 / 2, peak
    # A tile above rows already written cannot be merged any more: an error, not a wrong map.
    accumulator = MapAccumulator(200, 64, 64, "hann")
    accumulator.add(np.ones((2, 1, 64, 64)), [[0, 0, 64, 64], [48, 0, 112, 64]])
    with pytest.raises(ValueError, match="raster order"):
        accumulator.add(np.ones((1, 1, 64, 64)), [[0, 0, 64, 64]])


def test_a_member_set_runs_every_member_on_each_tile_batch(panels_dir):
    """A tiled hybrid cuts the tiles once and feeds them to all its members (their shared
    backbone runs once per batch) and gets exactly each member's own tiled map and score."""
    from collections import Counter
    from types import SimpleNamespace

    from data.synthetic import PanelGenerator
    from evaluation import shared_work_cost
    from members import create_member
    from members.member_set import MemberSet
    from tests.helpers import fit_member

    members = {}
    for name in ("patchcore", "padim"):
        members[name] = create_member(name, backbone="efficientnet_lite0")
        fit_member(members[name], panels_dir)
    member_set = MemberSet(members)
    assert len(member_set.extractors) == 1  # one shared efficientnet_lite0
    # Count the backbone passes: the shared extractor's and each member's own.
    passes: Counter[str] = Counter()
    extractors = {"shared": member_set.extractors[0]}
    extractors |= {name: member.feature_extractor for name, member in members.items()}
    for key, extractor in extractors.items():
        extractor.register_forward_hook(lambda *_, key=key: passes.update([key]))

    def batches(height: int, width: int) -> int:
        return -(-len(TileGrid(height, width, 128, 96).coords) // 4)

    image = torch.from_numpy(PanelGenerator(size=(200, 300), seed=5).generate_defective(0)["image"])
    image = image[None]
    together = infer_tiled(member_set, image, tile_size=128, stride=96, batch_size=4)
    assert together["anomaly_map"].shape == (2, 200, 300)
    # One shared backbone pass per tile batch served both members; neither ran its own.
    assert batches(200, 300) == 2 and passes == Counter(shared=2)
    for i, (name, member) in enumerate(members.items()):
        passes.clear()
        alone = infer_tiled(member, image, tile_size=128, stride=96, batch_size=4)
        assert passes == Counter({name: 2})
        assert np.allclose(together["anomaly_map"][i], alone["anomaly_map"][0], atol=1e-4), name
        assert together["pred_score"][i] == pytest.approx(alone["pred_score"], rel=1e-4), name
    # The ensemble's cost comparison times these same paths: the members together run only the
    # shared backbone (a warm-up image, then every image), each member alone only its own.
    passes.clear()
    tiling = {"tile_size": 128, "stride": 96, "batch_size": 4, "reduction": "hann"}
    hybrid = SimpleNamespace(tiling_options=tiling, image_size=None, member_set=member_set)
    cost = shared_work_cost(hybrid, [image[:, :150, :200], image])
    assert set(cost) >= {"members_together_ms", "patchcore_alone_ms", "padim_alone_ms"}
    every_image = batches(150, 200) + batches(200, 300)
    assert passes == Counter(
        shared=batches(150, 200) + every_image, patchcore=every_image, padim=every_image
    )


@pytest.mark.slow
def test_tiling_benchmark_pipeline_measures_speed_memory_and_exactness(tmp_path):
    import json

    from pipelines import tiling_benchmark

    status = tiling_benchmark.main(
        [
            "--set", f"output_dir={tmp_path}",
            "--set", "tiling.tile_size=64",
            "--set", "tiling.stride=48",
            "--set", "tiling_benchmark.sizes=[[300, 420], [600, 840]]",
            "--set", "tiling_benchmark.train_panel_size=256",
            "--set", "tiling_benchmark.crops_per_panel=16",
            "--set", "tiling_benchmark.merge_sizes=[[200, 150]]",
            "--set", "tiling_benchmark.merge_strides=[64, 40]",
        ]
    )  # fmt: skip
    assert status == 0
    results = json.loads((tmp_path / "tiling-benchmark" / "results.json").read_text())
    assert results["merge_max_abs_error"] <= 1e-6
    assert len(results["merge_errors"]) == 2 * len(REDUCTIONS)
    small, large = results["panels"]
    assert large["tiles"] > 3 * small["tiles"]
    for panel in (small, large):
        assert panel["peak_rss_mb"] >= panel["rss_before_mb"] > 0
        assert panel["seconds"] > 0 and panel["estimate_mb"] > 0
        assert panel["pixel_auroc"] > 0.8, panel  # its few-pixel defects are found at full size
    assert not (tmp_path / "tiling-benchmark" / "panels").exists()  # the big inputs are removed

"""Predict's input side: files read ahead in threads arrive in order with the same content as
read one by one; files done before are hashed, not decoded. A panel predicted in its file's
dtype, with its fused map on disk, band by band, gets the answer of the whole image in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from artifacts.io import sha256_file
from data.images import read_image, write_png
from data.synthetic import PanelGenerator
from fusion.hybrid import Hybrid
from members import create_member
from metrics.quality import panel_quality
from prediction.inputs import read_ahead
from prediction.results import STREAM_NAME, ResultStream, read_stream
from prediction.run import predict_files
from tests.helpers import fit_member
from tiling import save_heatmap_overlay


def _images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        path = folder / f"{k}.png"
        write_png(path, rng.random((16 + k, 20)).astype(np.float32))
        paths.append(path)
    (folder / "bad.png").write_text("not an image")
    return [*paths[:3], folder / "bad.png", *paths[3:]]


def test_read_ahead_keeps_order_and_content(tmp_path):
    files = _images(tmp_path, 7)
    one_by_one = list(read_ahead(files, {}, depth=0))
    ahead = list(read_ahead(files, {}, depth=3))
    assert [i.path for i in ahead] == files == [i.path for i in one_by_one]
    for a, b in zip(ahead, one_by_one):
        assert a.sha256 == b.sha256 == sha256_file(a.path)
        assert a.skipped == b.skipped
        if a.image is None:
            assert a.path.name == "bad.png" and "bad.png" not in a.skipped  # reason, not path
        else:
            np.testing.assert_array_equal(a.image, b.image)


def test_files_done_before_are_not_decoded(tmp_path):
    files = _images(tmp_path, 3)
    done = {str(files[1]): sha256_file(files[1]), str(files[2]): "0" * 64}  # [2] has changed
    items = list(read_ahead(files, done, depth=2))
    assert [i.already_done for i in items] == [False, True, False, False]
    assert items[1].image is None and items[2].image is not None


@pytest.fixture(scope="module")
def hybrid(panels_dir) -> Hybrid:
    """PatchCore and PaDiM fitted on the 128 px panels, fused and graded on panels of the same
    generator (a few seconds)."""
    members = {
        "patchcore": create_member("patchcore", coreset_ratio=0.1),
        "padim": create_member("padim", n_features=32),
    }
    for member in members.values():
        fit_member(member, panels_dir)
    generator = PanelGenerator(size=128, seed=3)
    samples = [generator.generate(i, defective=i >= 6, split="val") for i in range(12)]
    return Hybrid(members, image_size=128).fit(samples)


@pytest.fixture(scope="module")
def tiled_hybrid(hybrid) -> Hybrid:
    """The same members run on 128 px tiles of the panel at its own size, fused and graded."""
    tiling = {"enabled": True, "tile_size": 128, "stride": 96, "batch_size": 4, "reduction": "hann"}
    generator = PanelGenerator(size=(200, 260), seed=3)
    samples = [generator.generate(i, defective=i >= 4, split="val") for i in range(8)]
    return Hybrid(hybrid.member_set.members, None, tiling).fit(samples)


@pytest.mark.parametrize("which", ["hybrid", "tiled_hybrid"])
def test_a_panel_predicted_band_by_band_gets_the_answer_of_the_whole_image(
    which, request, tmp_path, monkeypatch
):
    """Predict holds a 16-bit panel as its file does and converts windows of it (a tiled
    hybrid's, tile by tile), writes the fused map (and a tiled hybrid's member maps, merged a
    band at a time) to files and reads them back in bands (here 7 rows: a full panel's would
    take 262 MB each): the same score, label, level, regions (measured on blocks too), map and
    overlay as the float image and its whole maps in memory; no temporary map is left behind."""
    import data.maps
    import grading.regions

    hybrid = request.getfixturevalue(which)

    # Large regions are measured on blocks, as a panel-wide one is, reading the map on windows.
    monkeypatch.setattr(grading.regions, "MEASURE_PIXELS", 120 * 120)
    # The first panel of the generator where the hybrid finds more than one region.
    generator = PanelGenerator(size=(600, 800), seed=7)
    for index in range(5, 25):
        panel = generator.generate_defective(index)["image"]
        path = write_png(tmp_path / "panel.png", panel, bits=16)
        image = read_image(path)
        expected = hybrid.predict(image, member_maps=False)  # as predict did it before
        if expected.label == 1 and len(expected.regions) >= 2:
            break
    assert expected.label == 1 and len(expected.regions) >= 2
    monkeypatch.setattr(data.maps, "BAND_PIXELS", 7 * 800)
    out = tmp_path / "out"
    loaded = Hybrid.load(hybrid.save(tmp_path / "hybrid"))  # predict's hybrid is a saved one
    with ResultStream(out / STREAM_NAME) as stream:
        predict_files(loaded, [path], [], out, stream, done={}, save_maps=True, progress=False)
    (entry,) = read_stream(out / STREAM_NAME)
    assert entry["status"] == "ok", entry
    assert entry["hybrid_id"] == loaded.model_id_
    assert (entry["score"], entry["label"], entry["level"]) == (
        expected.score,
        expected.label,
        expected.level,
    )
    regions = [json.loads(json.dumps(r.to_dict())) for r in expected.regions]
    assert entry["regions"] == regions
    # 800 px shrunk to the resizing hybrid's 128: said in the result, as the hybrid says it.
    assert entry.get("warning") == expected.warning == hybrid.shrink_warning(image.shape)
    assert entry["mura_energy_pct"] == panel_quality(image)["mura_energy_pct"]
    fused = expected.anomaly_map
    assert np.array_equal(np.load(entry["map"]), fused)
    vmax = max(2 * hybrid.calibrator_.threshold_, float(fused.max()))
    # The decision drawn (threshold contour, boxes, labels) is the same band by band too.
    whole = save_heatmap_overlay(
        image, fused, tmp_path / "whole.png", 800, vmin=0.0, vmax=vmax, decision=expected.decision()
    )
    with Image.open(entry["overlay"]) as banded, Image.open(whole) as reference:
        assert np.array_equal(np.asarray(banded), np.asarray(reference))
    assert sorted(p.name for p in out.iterdir()) == ["maps", "overlays", STREAM_NAME]
    # predict_batch, on the panel as its file holds it, yields that same result.
    (again,) = loaded.predict_batch([image])
    assert (again.score, again.label, again.level) == (
        expected.score,
        expected.label,
        expected.level,
    )
    assert np.array_equal(again.anomaly_map, fused)


def test_a_panel_shrunk_more_than_4x_is_said_to_lose_small_defects(hybrid):
    """A hybrid that resizes says, for a panel more than 4x its input side, by how much it is
    shrunk, what size of defect is lost and which configuration builds a tiled hybrid; a
    panel near its input size, or a tiled hybrid, says nothing."""
    assert hybrid.shrink_warning((128, 128)) is None
    assert hybrid.shrink_warning((512, 400)) is None  # 4x: kept
    warning = hybrid.shrink_warning((7000, 9344, 3))
    assert "9344 x 7000 px" in warning and "shrunk 73.0x" in warning
    assert "smaller than about 73 px" in warning and "configs/datasets/highres.yaml" in warning
    panel = PanelGenerator(size=(600, 520), seed=2).generate_normal(0)["image"]
    assert "shrunk 4.7x" in hybrid.predict(panel, member_maps=False).warning
    assert hybrid.predict(panel[:256, :256], member_maps=False).warning is None
    tiled = Hybrid(hybrid.member_set.members, None, {"enabled": True, "tile_size": 128})
    assert tiled.shrink_warning((7000, 9344)) is None


def test_a_panel_below_the_image_threshold_pays_no_region_work(hybrid, monkeypatch):
    """Region finding, descriptors and the type classifier run only for a flagged panel: a
    defect-free one is answered from its score and fused map alone, a defective one as before
    (its regions found, described and typed)."""
    import fusion.hybrid

    calls = {"regions": 0, "describer": 0}
    find_regions, describer = fusion.hybrid.find_regions, hybrid.describer

    def counted(work, function):
        def run(*args, **kwargs):
            calls[work] += 1
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(fusion.hybrid, "find_regions", counted("regions", find_regions))
    monkeypatch.setattr(hybrid, "describer", counted("describer", describer))
    generator = PanelGenerator(size=128, seed=21)
    normal = [generator.generate_normal(i, split="test")["image"] for i in range(6)]
    clean = [r for r in map(hybrid.predict, normal) if r.label == 0]
    assert len(clean) >= 4 and calls == {"regions": 0, "describer": 0}
    assert all(r.regions == [] and r.level == 0 for r in clean)
    assert all(r.anomaly_map.shape == (128, 128) for r in clean)
    defective = [generator.generate_defective(i, split="test")["image"] for i in range(6)]
    flagged = [r for r in map(hybrid.predict, defective) if r.label == 1]
    assert flagged and calls["regions"] >= len(flagged)
    assert hybrid.type_classifier_ is not None and calls["describer"] == len(flagged)
    assert all(r.regions and r.regions[0].type for r in flagged)

"""Overlays that show the decision (``tiling.visualize``): each element drawn where it belongs,
at full size and in a preview, the same whether written in one band or many."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tiling.visualize as visualize
from data.maps import MapOnDisk
from fusion.hybrid import Prediction
from grading.regions import Region
from tiling import Decision, save_heatmap_overlay
from tiling.visualize import BOX_RGB, CONTOUR_RGB, TRUTH_RGB, line_width


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _is(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == np.array(rgb), axis=-1)


def _disc(shape: tuple[int, int], center: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def _around(inside: np.ndarray) -> np.ndarray:
    """Pixels outside ``inside`` with a 4-neighbour in it: a one-pixel line around it."""
    padded = np.pad(inside, 1, constant_values=False)
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    return ~inside & np.logical_or.reduce(neighbours)


@pytest.fixture
def panel():
    rng = np.random.default_rng(0)
    image = (0.5 + 0.02 * rng.standard_normal((120, 160))).astype(np.float32)
    heat = np.zeros((120, 160), np.float32)
    heat[_disc(heat.shape, (60, 50), 15)] = 3.0  # one blob above the threshold 1.0
    truth = _disc(heat.shape, (62, 52), 9)
    return image, heat, truth


def test_the_threshold_contour_goes_around_the_blob_and_leaves_it_in_view(panel, tmp_path):
    image, heat, _ = panel
    path = save_heatmap_overlay(image, heat, tmp_path / "o.png", decision=Decision(1.0))
    white = _is(_pixels(path), CONTOUR_RGB)
    inside = heat >= 1.0
    # Every pixel next to the blob is drawn, none of the blob's own, and no more than a line.
    assert white[_around(inside)].all()
    assert not white[inside].any()
    assert white.sum() <= 2 * _around(inside).sum()
    # Without a decision, no pixel is the contour's white.
    plain = _pixels(save_heatmap_overlay(image, heat, tmp_path / "p.png"))
    assert not _is(plain, CONTOUR_RGB).any()


def test_the_true_mask_is_outlined_in_green(panel, tmp_path):
    image, heat, truth = panel
    path = save_heatmap_overlay(image, heat, tmp_path / "o.png", decision=Decision(truth=truth))
    green = _is(_pixels(path), TRUTH_RGB)
    assert green[_around(truth)].all()
    assert not green[truth].any()
    assert green.sum() <= 2 * _around(truth).sum()


def test_each_region_gets_a_box_and_a_label_with_type_and_level(panel, tmp_path):
    image, heat, _ = panel
    boxes = [
        ([35, 45, 66, 76], "spot_mura L3"),
        ([120, 0, 150, 30], "particle L1"),  # touches the top edge
        ([150, 100, 160, 120], "line_defect L5"),  # the right and bottom edges
    ]
    path = save_heatmap_overlay(image, heat, tmp_path / "o.png", decision=Decision(boxes=boxes))
    pixels = _pixels(path)
    magenta = _is(pixels, BOX_RGB)
    for (x0, y0, x1, y1), _ in boxes:
        # A line just outside the box (where the image goes on), nothing inside it.
        assert magenta[y0:y1, x0 - 1].all()
        assert y0 == 0 or magenta[y0 - 1, x0 - 1 : x1].all()
        assert x1 == 160 or magenta[y0:y1, x1].all()
        assert y1 == 120 or magenta[y1, x0 - 1 : x1 + 1].all()
        assert not magenta[y0:y1, x0:x1].any()
    dark = pixels.sum(axis=-1) < 150  # the labels' black text
    # The first label sits above its box, on a magenta tag.
    tag = pixels[44 - 14 : 44, 34:80]
    assert _is(tag, BOX_RGB).mean() > 0.5 and dark[44 - 14 : 44, 34:80].sum() >= 20
    assert dark[31:46, 119:160].sum() >= 10  # no room above the second: below it
    assert dark[85:99, 100:160].sum() >= 10  # the third, shifted left to fit the image


def test_a_prediction_draws_its_threshold_regions_types_and_levels():
    region = Region(
        bbox=[3, 4, 10, 12], area_px=40, area_mm2=0.4, contrast_pct=2.0, semu=1.5, score=3.0,
        mean_score=2.0, type="line_mura", level=2,
    )  # fmt: skip
    untyped = Region(
        bbox=[0, 0, 2, 2], area_px=4, area_mm2=0.04, contrast_pct=1.0, semu=0.5, score=2.0,
        mean_score=1.5, level=1,
    )  # fmt: skip
    heat = np.zeros((16, 16), np.float32)
    result = Prediction(0.9, 1, 2, [region, untyped], heat, {}, None, None, 1.25)
    truth = np.zeros((16, 16), bool)
    decision = result.decision(truth)
    assert decision.threshold == 1.25 and decision.truth is truth
    assert decision.boxes == [([3, 4, 10, 12], "line_mura L2"), ([0, 0, 2, 2], "untyped L1")]


@pytest.mark.parametrize("width", [1, 2])
def test_bands_and_maps_on_disk_give_the_same_overlay(panel, tmp_path, monkeypatch, width):
    image, heat, truth = panel
    monkeypatch.setattr(visualize, "line_width", lambda size: width)
    decision = Decision(1.0, [([35, 45, 66, 76], "spot_mura L3")], truth)
    whole = _pixels(save_heatmap_overlay(image, heat, tmp_path / "a.png", decision=decision))
    # Bands of 7 rows: the contour, the outline, the box and its label cross band edges.
    monkeypatch.setattr(visualize, "band_rows", lambda columns: 7)
    on_disk = MapOnDisk(heat.shape, tmp_path)
    on_disk[:] = heat
    banded = save_heatmap_overlay(image, on_disk, tmp_path / "b.png", decision=decision)
    np.testing.assert_array_equal(_pixels(banded), whole)
    assert _is(whole, CONTOUR_RGB).any() and _is(whole, TRUTH_RGB).any()


def test_a_preview_scales_the_decision_and_keeps_small_defects_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(visualize, "band_rows", lambda columns: 7)
    image = np.full((3000, 600), 0.5, np.float32)
    heat = np.zeros((3000, 600), np.float32)
    heat[1000:1100, 200:300] = 3.0
    heat[2000:2003, 400:403] = 3.0  # 3 px above the threshold: a sixth of a preview pixel
    truth = np.zeros((3000, 600), bool)
    truth[2500:2503, 100:103] = True  # likewise
    decision = Decision(1.0, [([180, 960, 320, 1140], "area_mura L4")], truth)
    path = save_heatmap_overlay(
        image, heat, tmp_path / "o.png", max_preview_side=500, decision=decision
    )
    pixels = _pixels(path)
    assert pixels.shape[:2] == (500, 100)
    magenta = _is(pixels, BOX_RGB)  # the box, scaled: x 30-54, y 160-190, drawn around
    assert magenta[160:190, 29].all() and magenta[159, 29:55].all()
    assert not magenta[160:190, 30:54].any()
    white = _is(pixels, CONTOUR_RGB)
    # The blob's contour, scaled (rows 166-183, columns 33-49 at or above), and the spot's.
    assert white[165, 33:50].all() and white[184, 33:50].all() and not white[166:184, 33:50].any()
    assert white[332:335, 65:69].any()
    assert _is(pixels, TRUTH_RGB)[415:420, 15:19].any()


def test_lines_widen_with_the_overlay_so_a_full_panel_shows_them():
    assert line_width((256, 256)) == line_width((1500, 800)) == 1
    assert line_width((7000, 9344)) == 9


def test_a_true_mask_of_another_size_is_refused(panel, tmp_path):
    image, heat, _ = panel
    with pytest.raises(ValueError, match="true mask"):
        save_heatmap_overlay(
            image, heat, tmp_path / "o.png", decision=Decision(truth=np.zeros((10, 10), bool))
        )

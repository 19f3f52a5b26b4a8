"""TIFFs read through tifffile: every bit depth kept, uncompressed panels memory-mapped."""

import importlib.util
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from data.images import (
    ImageReadError,
    IntensityWindow,
    LazyImage,
    _container_scale,
    read_image,
    read_mask,
)

RNG = np.random.default_rng(0)


def _write(path, data, **kwargs):
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize(
    ("dtype", "high", "scale"),
    [(np.uint8, 255, 255), (np.uint16, 4095, 65535), (np.uint16, 65535, 65535)],
    ids=["8-bit", "12-in-16-bit", "16-bit"],
)
def test_grey_integers_are_divided_by_their_container(tmp_path, dtype, high, scale):
    counts = RNG.integers(0, high + 1, (40, 56)).astype(dtype)
    path = _write(tmp_path / "grey.tif", counts)
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (40, 56)
    np.testing.assert_array_equal(image, (counts / scale).astype(np.float32))
    kept = read_image(path, keep_integers=True)
    assert kept.dtype == dtype
    np.testing.assert_array_equal(kept, counts)
    assert _container_scale(path) == scale


def test_16_bit_rgb_keeps_all_16_bits(tmp_path):
    rgb = RNG.integers(0, 65536, (24, 32, 3)).astype(np.uint16)
    # Two colours one count apart in red: Pillow reads both as the same 8-bit colour.
    rgb[0, 0], rgb[0, 1] = (40000, 20000, 1000), (40001, 20000, 1000)
    path = _write(tmp_path / "rgb16.tiff", rgb)
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (24, 32, 3)
    np.testing.assert_array_equal(image, (rgb / 65535).astype(np.float32))
    assert image[0, 0, 0] != image[0, 1, 0]
    kept = read_image(path, keep_integers=True)
    assert kept.dtype == np.uint16
    np.testing.assert_array_equal(kept, rgb)
    assert _container_scale(path) == 65535


def test_planar_and_alpha_layouts_read_as_chunky_rgb(tmp_path):
    rgb = RNG.integers(0, 65536, (16, 20, 3)).astype(np.uint16)
    planar = _write(
        tmp_path / "planar.tif",
        np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        photometric="rgb",
        planarconfig="separate",
    )
    np.testing.assert_array_equal(read_image(planar, keep_integers=True), rgb)
    np.testing.assert_array_equal(read_image(planar), (rgb / 65535).astype(np.float32))
    alpha = np.full((16, 20, 1), 7, np.uint16)
    rgba = _write(
        tmp_path / "rgba.tif",
        np.concatenate([rgb, alpha], axis=2),
        photometric="rgb",
        extrasamples=["unassalpha"],
    )
    np.testing.assert_array_equal(read_image(rgba, keep_integers=True), rgb)
    grey_alpha = _write(
        tmp_path / "grey_alpha.tif",
        np.concatenate([rgb[..., :1], alpha], axis=2),
        photometric="minisblack",
        extrasamples=["unassalpha"],
    )
    np.testing.assert_array_equal(read_image(grey_alpha, keep_integers=True), rgb[..., 0])


def test_float_tiffs_as_other_float_images(tmp_path):
    values = RNG.random((12, 10), dtype=np.float32)
    np.testing.assert_array_equal(read_image(_write(tmp_path / "unit.tif", values)), values)
    # Above 1: divided by the maximum, as Pillow's float TIFFs were.
    path = _write(tmp_path / "wide.tif", values * 3 + 0.5)
    expected = (values * 3 + 0.5) / (values * 3 + 0.5).max()
    np.testing.assert_allclose(read_image(path, keep_integers=True), expected, rtol=1e-6)
    assert _container_scale(path) == 1.0


def test_first_page_of_a_multi_page_tiff_and_masks(tmp_path):
    pages = np.stack([np.eye(8, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8)])
    path = _write(tmp_path / "stack.tif", pages)
    np.testing.assert_array_equal(read_image(path, keep_integers=True), pages[0])
    np.testing.assert_array_equal(read_mask(path), np.eye(8, dtype=bool))


def test_a_bigtiff_panel_is_mapped_and_read_window_by_window(tmp_path):
    panel = RNG.integers(0, 4096, (1024, 768, 3)).astype(np.uint16)
    path = _write(tmp_path / "panel.tif", panel, bigtiff=True)
    squeezed = _write(tmp_path / "panel_zlib.tif", panel, compression="zlib")
    window = IntensityWindow("bitdepth", 0.0, 4095 / 65535, 12)
    tracemalloc.start()
    try:
        raw = read_image(path, keep_integers=True)
        lazy = LazyImage(raw, window)
        tile = lazy[100:164, 200:264]
        grey = lazy.luminance()[900:964, 0:64]
        mapped_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        assert not isinstance(read_image(squeezed, keep_integers=True), np.memmap)
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(raw, np.memmap) and raw.shape == panel.shape
    assert lazy.shape == (1024, 768, 3)
    # The mapped read allocates about its windows; a compressed file is decoded whole.
    assert mapped_peak < panel.nbytes / 20 < read_peak / 20
    np.testing.assert_allclose(tile, panel[100:164, 200:264] / 4095, rtol=1e-6)
    np.testing.assert_allclose(grey, panel[900:964, :64].mean(axis=2) / 4095, rtol=1e-6)


def test_intensity_window_of_a_16_bit_tiff_is_that_of_the_png(tmp_path):
    counts = [RNG.integers(100, 4000, (32, 32)).astype(np.uint16) for _ in range(3)]
    tiffs = [_write(tmp_path / f"{i}.tif", c) for i, c in enumerate(counts)]
    pngs = []
    for i, c in enumerate(counts):
        Image.fromarray(c).save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
    assert [_container_scale(p) for p in tiffs] == [_container_scale(p) for p in pngs]
    for mode in ("auto", "bitdepth", "percentile"):
        window = IntensityWindow.fit(tiffs, mode)
        assert window == IntensityWindow.fit(pngs, mode)
        np.testing.assert_array_equal(window(read_image(tiffs[0])), window(read_image(pngs[0])))
        lazy = LazyImage(read_image(tiffs[0], keep_integers=True), window)
        np.testing.assert_array_equal(lazy[...], window(read_image(pngs[0])))
    assert IntensityWindow.fit(tiffs).bits == 12


def test_lzw_tiffs_go_to_pillow_unless_it_would_lose_bits(tmp_path):
    rgb8 = RNG.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "lzw8.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "lzw8.tif", keep_integers=True), rgb8)
    if importlib.util.find_spec("imagecodecs") is not None:
        pytest.skip("imagecodecs installed: tifffile decodes LZW itself")
    path = _write(tmp_path / "lzw16.tif", np.zeros((8, 8, 3), np.uint16))
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(5)  # LZW: the tag is what routes the file
    for read in (read_image, _container_scale):
        with pytest.raises(ImageReadError, match=r"lzw16\.tif: 16-bit RGB .*imagecodecs"):
            read(path)


@pytest.mark.parametrize("cut", [0.5, 0.995, 0.01])
def test_truncated_or_foreign_files_name_the_file(tmp_path, cut):
    counts = RNG.integers(0, 65536, (64, 64)).astype(np.uint16)
    for compression in (None, "zlib"):
        data = _write(tmp_path / "whole.tif", counts, compression=compression).read_bytes()
        path = tmp_path / "cut.tif"
        path.write_bytes(data[: int(len(data) * cut)])
        for keep in (False, True):
            with pytest.raises(ImageReadError, match=r"cut\.tif: unreadable or truncated TIFF"):
                read_image(path, keep_integers=keep)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "png.tif", format="PNG")
    for read in (read_image, _container_scale):
        with pytest.raises(ImageReadError, match=r"png\.tif: .*not a TIFF file"):
            read(tmp_path / "png.tif")

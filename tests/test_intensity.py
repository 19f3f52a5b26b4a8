"""Intensity windows (``data.intensity``): camera counts to [0, 1], fitted once per dataset."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import ConfigError, load_config
from data.datasets import get_dataset
from data.images import IntensityWindow, read_image

SIZE = 64
SPOT = (slice(24, 40), slice(24, 40))


def _panel(seed: int, low: float = 200, high: float = 4000) -> np.ndarray:
    """A lit panel in 12-bit counts: a left-to-right ramp with a little sensor noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(low, high, SIZE)[None, :].repeat(SIZE, axis=0)
    return ramp + rng.normal(0, 2, (SIZE, SIZE))


def _save16(path: Path, counts: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(counts), 0, 65535).astype(np.uint16)).save(path)
    return path


def _twelve_bit_dataset(root: Path, spot_gain: float) -> Path:
    """Three training panels, a defect-free test panel and the same panel with a spot whose
    luminance is ``spot_gain`` times the background (12-bit counts in 16-bit PNGs)."""
    for i in range(3):
        _save16(root / "cat" / "train" / "good" / f"{i}.png", _panel(i))
    test = _panel(10)
    _save16(root / "cat" / "test" / "good" / "000.png", test)
    test[SPOT] *= spot_gain
    _save16(root / "cat" / "test" / "spot" / "000.png", test)
    return root


def _images(root: Path, intensity: str) -> dict[str, np.ndarray]:
    """The test images by folder name, as a dataset with ``intensity`` loads them."""
    dataset = get_dataset(
        "mvtec", data_dir=root, categories=["cat"], split="test", channels=1, intensity=intensity
    )
    return {
        Path(dataset[i]["path"]).parent.name: dataset[i]["image"][0].numpy()
        for i in range(len(dataset))
    }


def test_bitdepth_spans_the_unit_range_and_keeps_defect_contrast(tmp_path):
    root = _twelve_bit_dataset(tmp_path, spot_gain=0.99)  # a 1 % dark mura
    raw = read_image(root / "cat" / "test" / "spot" / "000.png")
    assert raw.max() < 1 / 16 + 1e-3  # today's scaling: 1/16 of the range
    image = _images(root, "bitdepth")["spot"]
    assert image.min() < 0.06 and image.max() > 0.97  # 12-bit counts over [0, 1]
    np.testing.assert_allclose(image, raw * 65535 / 4095, atol=1e-6)
    normal = _images(root, "bitdepth")["good"]
    contrast = image[SPOT].mean() / normal[SPOT].mean() - 1
    raw_normal = read_image(root / "cat" / "test" / "good" / "000.png")
    assert contrast == pytest.approx(raw[SPOT].mean() / raw_normal[SPOT].mean() - 1, abs=1e-5)
    assert contrast == pytest.approx(-0.01, abs=2e-3)


@pytest.mark.parametrize("mode", ["bitdepth", "percentile"])
def test_the_training_window_scales_every_split_and_defect_alike(tmp_path, mode):
    root = _twelve_bit_dataset(tmp_path, spot_gain=2.0)  # bright: past the training maximum
    sets = {
        split: get_dataset(
            "mvtec",
            data_dir=root,
            categories=["cat"],
            split=split,
            val_fraction=0.34,
            intensity=mode,
            intensity_percentiles=[1, 99],
        )
        for split in ("train", "val", "test")
    }
    window = sets["train"].intensity
    assert window.mode == mode and all(s.intensity == window for s in sets.values())
    train_paths = [e.path for e in sets["train"].entries]
    assert IntensityWindow.fit(train_paths, mode, [1, 99]) == window
    assert IntensityWindow.from_dict(window.to_dict()) == window  # as a hybrid saves it
    samples = [sets["test"][i] for i in range(len(sets["test"]))]
    images = {Path(s["path"]).parent.name: s["image"][0].numpy() for s in samples}
    outside = np.ones((SIZE, SIZE), bool)
    outside[SPOT] = False
    # The defect does not change its image's scaling: the rest of the panel is as without it.
    np.testing.assert_array_equal(images["spot"][outside], images["good"][outside])
    assert images["spot"][SPOT].max() == 1.0  # clipped, not rescaled
    # predict applies the saved window to what read_image returns: the same values.
    predicted = window(read_image(root / "cat" / "test" / "spot" / "000.png"))
    np.testing.assert_allclose(predicted, images["spot"], atol=1e-6)


def test_auto_leaves_8_bit_and_full_range_16_bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / "cat" / "train" / "good" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(20, 90, (SIZE, SIZE), dtype=np.uint8)).save(path)
    test = tmp_path / "cat" / "test" / "good" / "0.png"
    test.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(test)
    auto, none = _images(tmp_path, "auto"), _images(tmp_path, "none")
    np.testing.assert_array_equal(auto["good"], none["good"])
    assert auto["good"].max() == 1.0  # a value above the training maximum keeps 255 / 255
    window = IntensityWindow.fit(sorted((tmp_path / "cat" / "train" / "good").iterdir()))
    assert (window.mode, window.bits, window.high) == ("bitdepth", 8, 1.0)
    # The embedded default's 16-bit panels (40 % gray) use the full 16 bits: unchanged too.
    sixteen = [np.full((8, 8), 26214, np.uint16), np.full((8, 8), 30000, np.uint16)]
    assert IntensityWindow.fit(sixteen).high == 1.0
    # Float images stay as they are.
    assert IntensityWindow.fit([np.full((8, 8), 0.2, np.float32)]) == IntensityWindow()


def test_integer_arrays_are_scaled_by_their_type_not_by_their_content(tmp_path):
    dark, bright = np.full((4, 4), 200, np.uint16), np.full((4, 4), 40000, np.uint16)
    np.save(tmp_path / "dark.npy", dark)
    np.save(tmp_path / "bright.npy", bright)
    assert read_image(tmp_path / "dark.npy").max() == pytest.approx(200 / 65535)
    assert read_image(tmp_path / "bright.npy").max() == pytest.approx(40000 / 65535)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.intensity=gamma",
            "data.intensity must be one of ('auto', 'bitdepth', 'percentile', 'none'), got 'gamma'",
        ),
        ("data.intensity_percentiles=[99, 1]", "data.intensity_percentiles must be two numbers"),
        ("data.intensity_percentiles=[5]", "got [5]"),
    ],
)
def test_bad_intensity_settings_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("benchmark", overrides=[override])
    if override.startswith("data.intensity="):
        _twelve_bit_dataset(tmp_path, 1.0)
        with pytest.raises(ValueError, match=re.escape(message)):
            get_dataset("mvtec", data_dir=tmp_path, categories=["cat"], intensity="gamma")

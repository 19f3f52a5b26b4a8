"""Dataset readers: layouts, bit depths, holdout, and errors that name the file."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import available_datasets, collate_samples, get_dataloader, get_dataset
from data.images import ImageReadError, read_image, read_mask, to_tensor


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None and image.mode != mode and not mode.startswith("I;16"):
        image = image.convert(mode)
    image.save(path)
    return path


def make_mvtec(root, category="cat", n_train=5, with_gt=True, size=(20, 30)):
    h, w = size
    rng = np.random.default_rng(0)
    base = root / category
    for i in range(n_train):
        save(base / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
    save(base / "test" / "good" / "000.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
    for i in range(2):
        save(
            base / "test" / "scratch" / f"{i:03d}.png",
            rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        )
        if with_gt:
            mask = np.zeros((h, w), np.uint8)
            mask[2:6, 3:9] = 255
            save(base / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def test_mvtec_layout_reads_labels_masks_and_types(tmp_path):
    make_mvtec(tmp_path)
    test = get_dataset("mvtec", data_dir=tmp_path, categories=["cat"], split="test")
    assert len(test) == 3 and test.has_masks
    samples = [test[i] for i in range(3)]
    assert [s["label"] for s in samples] == [0, 1, 1]
    assert [s["defect_type"] for s in samples] == ["good", "scratch", "scratch"]
    assert samples[0]["mask"].sum() == 0 and samples[1]["mask"].sum() == 24
    assert samples[1]["image"].shape == (3, 20, 30) and samples[1]["image"].max() <= 1
    resized = get_dataset(
        "mvtec", data_dir=tmp_path, categories=["cat"], split="test", image_size=16
    )
    assert resized[1]["image"].shape == (3, 16, 16)
    assert set(resized[1]["mask"].unique().tolist()) <= {0.0, 1.0}
    # [height, width] keeps a tall or wide part's proportions; the mask follows.
    kept = get_dataset(
        "mvtec", data_dir=tmp_path, categories=["cat"], split="test", image_size=[10, 15]
    )
    assert kept[1]["image"].shape == (3, 10, 15) and kept[1]["mask"].shape == (1, 10, 15)
    assert kept[1]["mask"].sum() == 6  # the 4 x 6 defect at half scale


def test_holdout_is_seeded_and_disjoint(tmp_path):
    make_mvtec(tmp_path, n_train=10)
    kw = dict(data_dir=tmp_path, categories=["cat"], val_fraction=0.3)
    train = get_dataset("mvtec", split="train", seed=1, **kw)
    calibration = get_dataset("mvtec", split="calibration", seed=1, **kw)
    val = get_dataset("mvtec", split="val", seed=1, **kw)
    # The held-out 3 are halved: members calibrate on one part, selection and fusion use the other.
    assert len(train) == 7 and len(calibration) == 1 and len(val) == 2
    parts = [{e.path for e in d.entries} for d in (train, calibration, val)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 10
    again = get_dataset("mvtec", split="val", seed=1, **kw)
    other = get_dataset("mvtec", split="val", seed=2, **kw)
    assert [e.path for e in again.entries] == [e.path for e in val.entries]
    assert [e.path for e in other.entries] != [e.path for e in val.entries]


def test_image_level_only_category_loads(tmp_path):
    make_mvtec(tmp_path, with_gt=False)
    test = get_dataset("mvtec", data_dir=tmp_path, categories=["cat"], split="test")
    assert not test.has_masks
    assert test[1]["label"] == 1 and test[1]["mask"].sum() == 0


def test_missing_mask_and_wrong_size_mask_name_the_file(tmp_path):
    make_mvtec(tmp_path)
    missing = tmp_path / "cat" / "ground_truth" / "scratch" / "001_mask.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="001.png"):
        get_dataset("mvtec", data_dir=tmp_path, categories=["cat"], split="test")
    save(missing, np.zeros((5, 5), np.uint8))
    test = get_dataset("mvtec", data_dir=tmp_path, categories=["cat"], split="test")
    with pytest.raises(ImageReadError, match="001_mask.png"):
        test[2]


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        get_dataset("mvtec", data_dir=tmp_path / "nope", categories=["cat"])
    make_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match="dog"):
        get_dataset("mvtec", data_dir=tmp_path, categories=["dog"])
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        get_dataset("mvtec", data_dir=tmp_path, categories=["empty"])
    with pytest.raises(KeyError, match="available"):
        get_dataset("kitti", data_dir=tmp_path, categories=["cat"])
    assert {"mvtec", "btad", "visa"} <= set(available_datasets())


@pytest.mark.parametrize(
    ("mode", "array", "expected_max"),
    [
        ("L", np.full((4, 4), 255, np.uint8), 1.0),
        ("I;16", np.full((4, 4), 65535, np.uint16), 1.0),
        ("I;16", np.full((4, 4), 32768, np.uint16), 32768 / 65535),
        ("RGB", np.full((4, 4, 3), 51, np.uint8), 0.2),
        ("RGBA", np.full((4, 4, 4), 255, np.uint8), 1.0),
    ],
)
def test_bit_depths_and_modes_become_unit_floats(tmp_path, mode, array, expected_max):
    path = save(tmp_path / f"x_{mode.replace(';', '')}.png", array, mode)
    image = read_image(path)
    assert image.dtype == np.float32 and image.max() == pytest.approx(expected_max, abs=1e-6)
    assert to_tensor(image, 3).shape == (3, 4, 4)


def test_palette_and_one_bit_images(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (2, 2, 3)
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert read_mask(tmp_path / "b.png").tolist() == [[False, True], [True, False]]


def test_broken_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-30])
    np.save(tmp_path / "nan.npy", np.array([[0.5, np.nan]], np.float32))
    for name in ("zero.png", "text.png", "cut.jpg", "cut.png", "nan.npy", "absent.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)


def test_skip_mode_records_unreadable_images(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "cat" / "test" / "good" / "000.png").write_bytes(b"broken")
    test = get_dataset(
        "mvtec", data_dir=tmp_path, categories=["cat"], split="test", on_error="skip"
    )
    batch = collate_samples([test[i] for i in range(len(test))])
    assert len(batch["path"]) == 2 and len(test.skipped) == 1
    assert "000.png" in test.skipped[0][0]


def test_btad_and_visa_layouts(tmp_path):
    rng = np.random.default_rng(0)
    btad = tmp_path / "btad" / "01"
    for i in range(3):
        save(btad / "train" / "ok" / f"{i}.bmp", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    save(btad / "test" / "ok" / "0.bmp", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    save(btad / "test" / "ko" / "0.bmp", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    save(btad / "ground_truth" / "ko" / "0.png", np.full((8, 8), 255, np.uint8))
    test = get_dataset("btad", data_dir=tmp_path / "btad", categories=["01"], split="test")
    assert [test[i]["label"] for i in range(2)] == [1, 0] or [
        test[i]["label"] for i in range(2)
    ] == [0, 1]
    assert len(get_dataset("btad", data_dir=tmp_path / "btad", categories=["01"])) == 3

    visa = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        save(
            visa / "candle" / "Data" / "Images" / "Normal" / f"{i}.png",
            rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        )
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i}.png,")
    save(
        visa / "candle" / "Data" / "Images" / "Anomaly" / "a.png",
        rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
    )
    save(visa / "candle" / "Data" / "Masks" / "Anomaly" / "a.png", np.full((8, 8), 1, np.uint8))
    rows.append(
        "candle,test,anomaly,candle/Data/Images/Anomaly/a.png,candle/Data/Masks/Anomaly/a.png"
    )
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    test = get_dataset("visa", data_dir=visa, categories=["candle"], split="test")
    assert test[0]["label"] == 1 and test[0]["mask"].sum() == 64
    loader = get_dataloader(
        "visa", data_dir=visa, categories=["candle"], split="train", batch_size=2
    )
    assert next(iter(loader))["image"].shape == (2, 3, 8, 8)


@pytest.mark.slow
def test_kolektorsdd_reads_as_mvtec(kolektorsdd_dir):
    kw = dict(data_dir=kolektorsdd_dir.parent, categories=[kolektorsdd_dir.name], image_size=128)
    test = get_dataset("mvtec", split="test", **kw)
    assert len(test) == 102 and test.has_masks
    labels = [e.label for e in test.entries]
    assert labels.count(1) == 52 and labels.count(0) == 50
    crack = test[labels.index(1)]
    good = test[labels.index(0)]
    assert crack["mask"].sum() > 0 and good["mask"].sum() == 0
    assert crack["image"].shape == (3, 128, 128)
    native = get_dataset(
        "mvtec", split="train", data_dir=kw["data_dir"], categories=kw["categories"]
    )
    assert native[0]["image"].shape[0] == 3 and native[0]["image"].shape[2] == 500
    assert torch.isclose(native[0]["image"][0], native[0]["image"][1]).all()  # gray -> 3 channels


def test_group_pattern_names_each_images_part(tmp_path, kolektorsdd_dir):
    from data.datasets import compile_group_pattern, image_group

    test = get_dataset(
        "mvtec",
        split="test",
        data_dir=kolektorsdd_dir.parent,
        categories=[kolektorsdd_dir.name],
        group_pattern=r"^(kos\d+)_",
    )
    # KolektorSDD: the eight surfaces of one commutator share its kosNN prefix.
    assert test.groups[0].startswith("kos") and len(set(test.groups)) < len(test)
    by_part = {}
    for entry, group in zip(test.entries, test.groups):
        by_part.setdefault(group, set()).add(entry.path.name.split("_")[0])
    assert all(len(names) == 1 for names in by_part.values())
    # No pattern: each image is its own group.
    plain = get_dataset("mvtec", split="test", data_dir=make_mvtec(tmp_path), categories=["cat"])
    assert len(set(plain.groups)) == len(plain) and plain[0]["group"] == str(plain.entries[0].path)
    with pytest.raises(ValueError, match="has no group"):
        compile_group_pattern("kos")
    with pytest.raises(ValueError, match="not a regular expression"):
        compile_group_pattern("(kos")
    with pytest.raises(ValueError, match=r"000\.png: its name does not match"):
        image_group(tmp_path / "000.png", compile_group_pattern(r"^(kos\d+)_"))


def make_labeled(root, masks=True):
    rng = np.random.default_rng(1)
    for i in range(3):
        save(root / "crack" / f"p{i}_a.png", rng.integers(0, 255, (20, 30), dtype=np.uint8))
        save(root / "good" / f"p{i}_b.png", rng.integers(0, 255, (20, 30), dtype=np.uint8))
    if masks:
        mask = np.zeros((20, 30), np.uint8)
        mask[5:9, 4:12] = 255
        save(root / "ground_truth" / "crack" / "p0_a_mask.png", mask)
    return root


def test_labeled_folder_reads_masks_where_present_and_labels_elsewhere(tmp_path):
    from data.datasets import LabeledFolder
    from data.images import IntensityWindow

    folder = LabeledFolder([make_labeled(tmp_path)], IntensityWindow(), group_pattern=r"^(p\d)_")
    assert len(folder) == 6 and folder.labels.count(1) == 3 and folder.has_masks
    samples = {folder.entries[i][0].name: folder[i] for i in range(len(folder))}
    with_mask, without = samples["p0_a.png"], samples["p1_a.png"]
    assert with_mask["has_mask"] and with_mask["mask"].sum() == 32 and with_mask["label"] == 1
    assert not without["has_mask"] and without["label"] == 1 and without["defect_type"] == "crack"
    assert samples["p1_b.png"]["has_mask"] and samples["p1_b.png"]["label"] == 0
    assert with_mask["group"] == "p0" and samples["p0_b.png"]["group"] == "p0"


def test_labeled_folder_errors_name_the_file(tmp_path):
    from data.datasets import LabeledFolder
    from data.images import IntensityWindow

    window = IntensityWindow()
    wrong = make_labeled(tmp_path / "wrong")
    save(wrong / "ground_truth" / "crack" / "p1_a_mask.png", np.zeros((10, 30), np.uint8))
    with pytest.raises(ImageReadError, match=r"p1_a_mask\.png: mask is 30x10 but its image"):
        LabeledFolder([wrong], window)
    empty = make_labeled(tmp_path / "empty")
    (empty / "scratch").mkdir()
    with pytest.raises(ValueError, match=r"scratch: an empty defect folder"):
        LabeledFolder([empty], window)
    orphan = make_labeled(tmp_path / "orphan")
    save(orphan / "ground_truth" / "crack" / "p9_a_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"p9_a_mask\.png: a mask for an image that is not there"):
        LabeledFolder([orphan], window)
    stray = make_labeled(tmp_path / "stray")
    save(stray / "ground_truth" / "dent" / "p0_a_mask.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"dent: masks of a type with no images"):
        LabeledFolder([stray], window)
    with pytest.raises(FileNotFoundError, match="labeled folder not found"):
        LabeledFolder([tmp_path / "absent"], window)

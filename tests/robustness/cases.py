"""The bad inputs and faults the robustness suite tries, in one place: the tests parametrize
over these lists, and ``test_figures`` checks the README's counts against them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# --- images: (name, writer, expected) with expected "ok" (read and used) or the words the
# reported reason must contain (the file is skipped) ---------------------------------------


def _panel(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.45 + 0.05 * rng.random((height, width))).astype(np.float32)


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _gray8(height: int = 64, width: int = 64) -> Image.Image:
    return Image.fromarray((_panel(height, width) * 255).astype(np.uint8), mode="L")


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated_png(path: Path) -> None:
    data = _png_bytes(_gray8())
    path.write_bytes(data[: len(data) // 2])


def truncated_jpeg(path: Path) -> None:
    data = _png_bytes(_gray8().convert("RGB"), "JPEG")
    path.write_bytes(data[: len(data) // 2])


def text_as_png(path: Path) -> None:
    path.write_text("this is a text file, not an image\n")


def gray16(path: Path) -> None:
    Image.fromarray((_panel() * 65535).astype(np.uint16)).save(path)


def one_bit(path: Path) -> None:
    _gray8().convert("1").save(path)


def rgba(path: Path) -> None:
    image = _gray8().convert("RGBA")
    image.putalpha(128)
    image.save(path)


def palette(path: Path) -> None:
    _gray8().convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)


def one_pixel(path: Path) -> None:
    Image.fromarray(np.full((1, 1), 120, dtype=np.uint8)).save(path)


def very_thin(path: Path) -> None:
    _gray8(2, 300).save(path)


def npy_nan(path: Path) -> None:
    array = _panel()
    array[3, 5] = np.nan
    np.save(path, array)


def npy_inf(path: Path) -> None:
    array = _panel()
    array[7, 1] = np.inf
    np.save(path, array)


def larger_than_tile(path: Path) -> None:
    # Larger than any member's input (64 px in the suite) and than a 32 px tile, not square.
    _gray8(150, 220).save(path)


IMAGE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("zero_bytes.png", zero_bytes, "empty file"),
    ("truncated.png", truncated_png, "truncated"),
    ("truncated.jpg", truncated_jpeg, "truncated"),
    ("text_named.png", text_as_png, "not an image"),
    ("gray16.png", gray16, "ok"),
    ("one_bit.png", one_bit, "ok"),
    ("rgba.png", rgba, "ok"),
    ("palette.png", palette, "ok"),
    ("one_pixel.png", one_pixel, "ok"),
    ("very_thin.png", very_thin, "ok"),
    ("nan_map.npy", npy_nan, "NaN or Inf"),
    ("inf_map.npy", npy_inf, "NaN or Inf"),
    ("larger_than_tile.png", larger_than_tile, "ok"),
]


# --- folders ----------------------------------------------------------------------------------


def _write_gray(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def make_category(folder: Path, n_train: int = 8, masks: bool = True) -> Path:
    """A small MVTec-layout category: normal panels, and panels with a bright spot and masks."""
    for i in range(n_train):
        _write_gray(folder / "train" / "good" / f"{i:03d}.png", _panel(seed=i))
    for i in range(2):
        _write_gray(folder / "test" / "good" / f"{i:03d}.png", _panel(seed=100 + i))
        image, mask = _panel(seed=200 + i), np.zeros((64, 64), dtype=np.float32)
        image[20:30, 20 + 10 * i : 30 + 10 * i] = 0.9
        mask[20:30, 20 + 10 * i : 30 + 10 * i] = 1.0
        _write_gray(folder / "test" / "spot" / f"{i:03d}.png", image)
        if masks:
            _write_gray(folder / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return folder


class Case:
    """A named case; the attributes each list's tests read are set by keyword."""

    def __init__(self, name: str, **fields) -> None:
        self.name = name
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return self.name


def _empty_train(data: Path) -> None:
    folder = make_category(data / "empty_train")
    for path in (folder / "train" / "good").iterdir():
        path.unlink()


def _missing_train(data: Path) -> None:
    import shutil

    shutil.rmtree(make_category(data / "missing_train") / "train")


def _missing_masks(data: Path) -> None:
    (make_category(data / "missing_masks") / "ground_truth" / "spot" / "001_mask.png").unlink()


def _bad_train_image(data: Path) -> None:
    zero_bytes(make_category(data / "bad_train_image") / "train" / "good" / "003.png")


# Categories of one benchmark run: each fails its own job naming what is wrong.
BENCHMARK_FOLDER_CASES = [
    Case(
        "empty_train",
        make=_empty_train,
        expected="no images in",
        names=lambda data: str(data / "empty_train" / "train" / "good"),
    ),
    Case(
        "missing_train",
        make=_missing_train,
        expected="training folder not found",
        names=lambda data: str(data / "missing_train" / "train" / "good"),
    ),
    Case(
        "missing_masks",
        make=_missing_masks,
        expected="no mask for defective image",
        names=lambda data: str(data / "missing_masks" / "test" / "spot" / "001.png"),
    ),
    Case(
        "bad_train_image",
        make=_bad_train_image,
        expected="empty file",
        names=lambda data: str(data / "bad_train_image" / "train" / "good" / "003.png"),
    ),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _retrain_args(root: Path, folder: Path) -> list[str]:
    return [
        "--set",
        f"retrain.workspace={root / 'ws'}",
        "--set",
        f"retrain.normal_dirs=[{folder}]",
    ]


def _bench_args(root: Path, folder: Path) -> list[str]:
    return ["--set", f"output_dir={root / 'out'}", "--data-dir", str(folder)]


# Whole data folders that are wrong: the run stops at once with an error naming the folder.
BAD_FOLDERS = [
    Case(
        "benchmark_missing_data_dir",
        entry="benchmark",
        make=lambda root: root / "no_such_folder",
        args=_bench_args,
        code=1,
        expected="does not exist",
    ),
    Case(
        "benchmark_empty_data_dir",
        entry="benchmark",
        make=lambda root: _mkdir(root / "empty"),
        args=_bench_args,
        code=1,
        expected="no categories found",
    ),
    Case(
        "retrain_missing_normal_dir",
        entry="retrain",
        make=lambda root: root / "no_such_folder",
        args=_retrain_args,
        code=1,
        expected="does not exist",
    ),
    Case(
        "retrain_empty_normal_dir",
        entry="retrain",
        make=lambda root: _mkdir(root / "empty"),
        args=_retrain_args,
        code=1,
        expected="normal images",
    ),
]

# Extra predict inputs: reported and skipped, the other inputs are predicted.
PREDICT_FOLDER_CASES = [
    Case("empty_folder", make=lambda root: _mkdir(root / "empty"), expected="no image files"),
    Case("missing_path", make=lambda root: root / "missing.png", expected="no such file"),
]


# --- configs ----------------------------------------------------------------------------------


def _set(entry: str, item: str) -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        needed = {"ensemble": ["--from", str(root)], "predict": [str(root / "x.png")]}
        return [*needed.get(entry, []), "--set", item]

    return args


def _config_file(root: Path) -> list[str]:
    path = root / "mine.yaml"
    path.write_text("data:\n  image_size: 64\n  batchsize: 4\n")
    return ["--config", str(path)]


def _config(name: str, entry: str, item: str, key: str, expected: str, code: int = 2) -> Case:
    return Case(name, entry=entry, args=_set(entry, item), key=key, expected=expected, code=code)


# Each stops the entry point at once with exit status 2 and one line naming the key.
BAD_CONFIGS = [
    _config("unknown_key", "benchmark", "data.imagesize=64", "data.imagesize", "unknown key"),
    _config("wrong_type", "benchmark", "data.image_size=big", "data.image_size", "must be int"),
    _config(
        "negative_image_size", "benchmark", "data.image_size=-64", "data.image_size", "positive"
    ),
    _config("negative_tile", "benchmark", "tiling.tile_size=-32", "tiling.tile_size", "positive"),
    _config("stride_above_tile", "benchmark", "tiling.stride=512", "tiling.stride", "larger than"),
    _config("negative_panel_size", "benchmark", "synthetic.size=-8", "synthetic.size", "positive"),
    _config(
        "negative_n_train", "benchmark", "synthetic.n_train=-3", "synthetic.n_train", "positive"
    ),
    _config(
        "unknown_member_option",
        "benchmark",
        "members.padim.n_feature=10",
        "members.padim.n_feature",
        "unknown key",
    ),
    _config(
        "member_option_type",
        "benchmark",
        "members.patchcore.coreset_ratio=lots",
        "members.patchcore.coreset_ratio",
        "must be float",
    ),
    Case(
        "unknown_key_in_file",
        entry="benchmark",
        args=_config_file,
        key="data.batchsize",
        expected="mine.yaml",
        code=2,
    ),
    _config("ensemble_unknown_key", "ensemble", "ensemble.topk=2", "ensemble.topk", "unknown key"),
    _config(
        "ensemble_negative_top_k", "ensemble", "ensemble.top_k=-1", "ensemble.top_k", "positive"
    ),
    _config(
        "predict_wrong_type",
        "predict",
        "predict.overlays=often",
        "predict.overlays",
        "must be bool",
    ),
    _config(
        "predict_negative_side",
        "predict",
        "predict.overlay_max_side=-5",
        "predict.overlay_max_side",
        "positive",
    ),
    _config(
        "retrain_unknown_key",
        "retrain",
        "retrain.normal_dir=[x]",
        "retrain.normal_dir",
        "unknown key",
    ),
    _config(
        "retrain_negative_size",
        "retrain",
        "retrain.image_size=-64",
        "retrain.image_size",
        "positive",
    ),
    _config(
        "retrain_wrong_type", "retrain", "retrain.margin=high", "retrain.margin", "must be float"
    ),
]


def _missing_backbone(root: Path) -> list[str]:
    return ["members.patchcore.backbone=resnet18", f"members.patchcore.weights_dir={root / 'none'}"]


def _corrupted_backbone(root: Path) -> list[str]:
    folder = root / "corrupted"
    folder.mkdir(exist_ok=True)
    (folder / "resnet18-f37072fd.pth").write_bytes(b"\x80\x02 not really weights" * 100)
    return ["members.padim.backbone=resnet18", f"members.padim.weights_dir={folder}"]


# Member settings a job can only find wrong when it builds the member: that job fails naming the
# file or key, the run's other jobs go on.
MEMBER_CONFIG_CASES = [
    Case(
        "missing_backbone_file",
        member="patchcore",
        overrides=_missing_backbone,
        expected="resnet18-f37072fd.pth",
        names=lambda root: str((root / "none").resolve()),
    ),
    Case(
        "corrupted_backbone_file",
        member="padim",
        overrides=_corrupted_backbone,
        expected="resnet18-f37072fd.pth",
        names=lambda root: "SHA-256",
    ),
    Case(
        "negative_member_size",
        member="vae",
        overrides=lambda root: ["members.vae.latent_channels=-4"],
        expected="latent_channels",
        names=lambda root: ">= 1",
    ),
]


# --- artifacts --------------------------------------------------------------------------------


def _append_byte(relative: str) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        with open(folder / relative, "ab") as fh:
            fh.write(b"\0")

    return tamper


def _manifest_outside(folder: Path) -> None:
    import json

    manifest = folder / "manifest.sha256.json"
    entries = json.loads(manifest.read_text())
    entries["sha256"]["../../escape.joblib"] = "0" * 64
    manifest.write_text(json.dumps(entries))


def _resigned_garbage(folder: Path) -> None:
    """The attacker also rewrites the manifest: the bytes verify but are not a hybrid."""
    from artifacts.io import write_manifest

    (folder / "hybrid.json").write_text("{ not json")
    write_manifest(folder)


# A hybrid folder that was changed after it was written: predict refuses it, naming the file.
BAD_ARTIFACTS = [
    Case(
        "modified_grading",
        tamper=_append_byte("grading.joblib"),
        names="grading.joblib",
        expected="does not match the manifest",
    ),
    Case(
        "modified_member_weights",
        tamper=_append_byte("members/padim/weights.pt"),
        names="weights.pt",
        expected="does not match the manifest",
    ),
    Case(
        "missing_fusion",
        tamper=lambda folder: (folder / "fusion.joblib").unlink(),
        names="fusion.joblib",
        expected="missing",
    ),
    Case(
        "missing_manifest",
        tamper=lambda folder: (folder / "manifest.sha256.json").unlink(),
        names="manifest.sha256.json",
        expected="incomplete",
    ),
    Case(
        "manifest_points_outside",
        tamper=_manifest_outside,
        names="escape.joblib",
        expected="outside",
    ),
    Case(
        "resigned_garbage",
        tamper=_resigned_garbage,
        names="hybrid.json",
        expected="hybrid.json",
    ),
]


# 64 px panels through a member that runs tile by tile (tiling.enabled): larger than the tile
# they are cut and merged back; smaller, and without padding, the job says which key to change.
TILE_CASES = [
    Case(
        "image_larger_than_tile",
        settings=("tiling.tile_size=32", "tiling.stride=16"),
        expected="ok",
    ),
    Case(
        "image_smaller_than_tile",
        settings=("tiling.tile_size=128", "tiling.stride=128"),
        expected="pad_mode",
    ),
]

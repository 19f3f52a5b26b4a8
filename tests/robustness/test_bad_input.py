"""Bad input through the real entry points and dataset loading: every case ends in a clear error
or a reported skip that names the file or key, no traceback reaches the user, and the other
inputs of the same run are still processed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.datasets import collate_samples, get_dataset
from data.images import ImageReadError, read_image, write_png
from pipelines import benchmark, ensemble, predict, retrain
from pipelines.common import PARTIAL_FAILURE
from tests.helpers import run_module
from tests.robustness.cases import (
    BAD_ARTIFACTS,
    BAD_CONFIGS,
    BAD_FOLDERS,
    BENCHMARK_FOLDER_CASES,
    IMAGE_CASES,
    MEMBER_CONFIG_CASES,
    PREDICT_FOLDER_CASES,
    TILE_CASES,
    make_category,
)
from tests.robustness.support import assert_clean, call, tiny

IMAGE_IDS = [case[0] for case in IMAGE_CASES]


def _good(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [
        write_png(folder / f"good{i}.png", 0.45 + 0.05 * rng.random((64, 64)), 16)
        for i in range(count)
    ]


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,writer,expected", IMAGE_CASES, ids=IMAGE_IDS)
def test_dataset_loading_names_a_bad_image_and_keeps_the_others(tmp_path, name, writer, expected):
    train = tmp_path / "cat" / "train" / "good"
    _good(train, 2)
    writer(train / name)
    _good(tmp_path / "cat" / "test" / "good", 1)
    options = {"data_dir": tmp_path, "categories": ["cat"], "split": "train", "image_size": 64}
    dataset = get_dataset("mvtec", **options)
    index = [entry.path.name for entry in dataset.entries].index(name)
    if expected == "ok":
        image = dataset[index]["image"]
        assert image.shape == (3, 64, 64) and torch.isfinite(image).all()
        assert 0 <= float(image.min()) and float(image.max()) <= 1
        return
    with pytest.raises(ImageReadError) as info:
        dataset[index]
    assert str(train / name) in str(info.value) and expected in str(info.value)
    tolerant = get_dataset("mvtec", on_error="skip", **options)
    batch = collate_samples([tolerant[i] for i in range(len(tolerant))])
    assert batch["image"].shape[0] == 2  # the two good images
    assert [path for path, _ in tolerant.skipped] == [str(train / name)]


@pytest.fixture(scope="module")
def predicted(tiny_run, tmp_path_factory) -> dict:
    """One predict run over every bad image, the folder cases and good images: as a user runs it,
    in its own process."""
    root = tmp_path_factory.mktemp("predict-bad")
    inputs = root / "inputs"
    inputs.mkdir()
    for name, writer, _ in IMAGE_CASES:
        writer(inputs / name)
    good = _good(root / "good", 2, seed=1)
    extra = [case.make(root) for case in PREDICT_FOLDER_CASES]
    out = root / "out"
    args = ["--hybrid", tiny_run["hybrid"], "--out", out, inputs, *good, *extra]
    result = run_module("pipelines.predict", *args)
    report = json.loads((out / "predictions.json").read_text())
    return {
        "result": result,
        "inputs": inputs,
        "good": good,
        "extra": extra,
        "by_path": {p["path"]: p for p in report["images"]},
    }


def test_predict_goes_on_past_bad_files(predicted):
    result = predicted["result"]
    # Some inputs were skipped: a partial failure a scheduler can see.
    assert result.returncode == PARTIAL_FAILURE, result.stderr[-2000:]
    assert_clean(result.stderr)
    for path in predicted["good"]:
        entry = predicted["by_path"][str(path)]
        assert entry["status"] == "ok"
        # The panel's figures: grey images get a mura energy and no colour uniformity.
        assert entry["mura_energy_pct"] > 0 and entry["delta_e2000_mean"] is None


@pytest.mark.parametrize("name,writer,expected", IMAGE_CASES, ids=IMAGE_IDS)
def test_predict_reports_a_bad_image_by_name(predicted, name, writer, expected):
    path = str(predicted["inputs"] / name)
    entry = predicted["by_path"][path]
    if expected == "ok":
        assert entry["status"] == "ok", entry
        height, width = read_image(path).shape[:2]
        assert (entry["height"], entry["width"]) == (height, width)
        assert np.isfinite(entry["score"]) and entry["level"] in range(6)
        assert Path(entry["overlay"]).is_file()
    else:
        assert entry["status"] == "skipped" and expected in entry["error"], entry
        assert f"skipped {path}: " in predicted["result"].stdout


@pytest.mark.parametrize("case", PREDICT_FOLDER_CASES, ids=lambda c: c.name)
def test_predict_reports_a_bad_folder_by_name(predicted, case):
    path = str(predicted["extra"][PREDICT_FOLDER_CASES.index(case)])
    entry = predicted["by_path"][path]
    assert entry["status"] == "skipped" and case.expected in entry["error"]
    assert f"skipped {path}: " in predicted["result"].stdout


# --- folders ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark_folders(tmp_path_factory) -> dict:
    """One benchmark run over a folder holding a good category and one per bad-folder case."""
    root = tmp_path_factory.mktemp("bench-folders")
    data = root / "data"
    make_category(data / "good_category")
    for case in BENCHMARK_FOLDER_CASES:
        case.make(data)
    args = [*tiny(root), "--data-dir", data, "--members", "padim", "--run-name", "run"]
    code = benchmark.main([str(a) for a in args])
    results = json.loads((root / "run" / "results.json").read_text())["jobs"]
    return {"code": code, "data": data, "results": {r["category"]: r for r in results}}


def test_benchmark_goes_on_past_bad_categories(benchmark_folders):
    assert benchmark_folders["code"] == PARTIAL_FAILURE  # the bad categories' jobs failed
    assert benchmark_folders["results"]["good_category"]["status"] == "ok"


@pytest.mark.parametrize("case", BENCHMARK_FOLDER_CASES, ids=lambda c: c.name)
def test_benchmark_names_what_is_wrong_in_a_category(benchmark_folders, case):
    job = benchmark_folders["results"][case.name]
    assert job["status"] == "failed"
    assert case.expected in job["error"] and case.names(benchmark_folders["data"]) in job["error"]


@pytest.mark.parametrize("case", BAD_FOLDERS, ids=lambda c: c.name)
def test_a_bad_data_folder_is_a_clear_error(tmp_path, capsys, case):
    folder = case.make(tmp_path)
    main = {"benchmark": benchmark, "retrain": retrain}[case.entry].main
    args = case.args(tmp_path, folder)
    code, out, err = call(main, args, capsys)
    assert code == case.code and str(folder) in err and case.expected in err, err


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=lambda c: c.name)
def test_a_bad_config_names_the_key(tmp_path, capsys, case):
    main = {"benchmark": benchmark, "ensemble": ensemble, "predict": predict, "retrain": retrain}
    code, out, err = call(main[case.entry].main, case.args(tmp_path), capsys)
    assert code == case.code, err
    assert case.key in err and case.expected in err, err
    assert len(err.strip().splitlines()) == 1  # one clear line


@pytest.fixture(scope="module")
def member_configs(tmp_path_factory) -> dict:
    """One benchmark run: a job per bad member setting, and a member that is fine."""
    root = tmp_path_factory.mktemp("member-configs")
    overrides = [o for case in MEMBER_CONFIG_CASES for o in case.overrides(root)]
    members = ",".join([*(c.member for c in MEMBER_CONFIG_CASES), "autoencoder"])
    extra = [*overrides, "benchmark.backbones=[]"]
    args = [*tiny(root, *extra), "--members", members, "--run-name", "run"]
    code = benchmark.main([str(a) for a in args])
    results = json.loads((root / "run" / "results.json").read_text())["jobs"]
    return {"code": code, "root": root, "results": {r["member"]: r for r in results}}


def test_the_other_members_still_run(member_configs):
    assert member_configs["code"] == PARTIAL_FAILURE  # the bad members' jobs failed
    assert member_configs["results"]["autoencoder"]["status"] == "ok"


@pytest.mark.parametrize("case", MEMBER_CONFIG_CASES, ids=lambda c: c.name)
def test_a_bad_member_setting_names_the_file_or_key(member_configs, case):
    job = member_configs["results"][case.member]
    assert job["status"] == "failed"
    assert case.expected in job["error"] and case.names(member_configs["root"]) in job["error"]
    job_dir = member_configs["root"] / "run" / "jobs" / job["job_id"]
    assert not (job_dir / "weights").exists()  # nothing half-made is left to load


# --- artifacts --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_ARTIFACTS, ids=lambda c: c.name)
def test_a_tampered_hybrid_is_refused_by_name(tiny_run, tmp_path, capsys, case):
    import shutil

    hybrid = tmp_path / "hybrid"
    shutil.copytree(tiny_run["hybrid"], hybrid)
    case.tamper(hybrid)
    image = _good(tmp_path / "in", 1)[0]
    code, out, err = call(
        predict.main, ["--hybrid", hybrid, "--out", tmp_path / "out", image], capsys
    )
    assert code == 1 and case.names in err and case.expected in err, err
    assert not (tmp_path / "out" / "predictions.json").exists()


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: c.name)
def test_images_and_the_tile_size(tmp_path, capsys, case):
    extra = ["tiling.enabled=true", *case.settings]
    args = [*tiny(tmp_path, *extra), "--members", "patchcore", "--run-name", "run"]
    code, out, err = call(benchmark.main, args, capsys)
    job = json.loads((tmp_path / "run" / "results.json").read_text())["jobs"][0]
    if case.expected == "ok":
        assert code == 0 and job["status"] == "ok" and job["tiling"], job
        assert job["cost"]["test_images"] == 6
    else:
        assert code == 1 and job["status"] == "failed"
        assert case.expected in job["error"] and case.expected in err, job["error"]


def test_a_one_row_color_image_keeps_its_layout(tiny_run):
    from fusion.hybrid import Hybrid

    image = np.full((1, 40, 3), 0.47, dtype=np.float32)  # one row of RGB pixels
    result = Hybrid.load(tiny_run["hybrid"]).predict(image)
    assert result.anomaly_map.shape == (1, 40)

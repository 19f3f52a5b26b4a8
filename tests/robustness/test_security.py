"""Security: weights load with ``weights_only=True``, pickles only after their SHA-256 manifest
verifies, and a run writes nothing outside its configured output folders."""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path

import joblib
import pytest
import torch

from artifacts.io import (
    ArtifactError,
    load_joblib_verified,
    torch_load,
    write_manifest,
)
from tests.helpers import run_module
from tests.robustness.support import assert_clean, tiny

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "pipelines",
    "members",
    "fusion",
    "tiling",
    "data",
    "grading",
    "metrics",
    "configs",
    "artifacts",
    "evaluation",
    "reporting",
    "experiments",
    "prediction",
    "retraining",
    "deploy",
    "graphs",
)


def _calls(*names: str) -> list[tuple[Path, ast.Call]]:
    """Every call ``a.b(...)`` with ``a.b`` in ``names`` in the packages' source."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
                    imported = {a.name for a in node.names}
                    assert not imported & {"load", "loads"}, f"{path}: imports a bare load"
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and f"{node.func.value.id}.{node.func.attr}" in names
                ):
                    found.append((path.relative_to(REPO), node))
    return found


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_every_torch_load_uses_weights_only():
    calls = _calls("torch.load")
    assert calls, "the scan found no torch.load at all"
    bad = [f"{p}:{c.lineno}" for p, c in calls if _keyword(c, "weights_only") is not True]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_pickles_load_only_in_the_verified_loader():
    calls = _calls("joblib.load", "pickle.load", "pickle.loads", "torch.load")
    places = {(str(p), c.lineno) for p, c in calls}
    allowed = {str(Path("artifacts") / "io.py")}
    assert {p for p, _ in places} == allowed, places
    # np.load refuses pickles by default: it must never be told otherwise.
    numpy = _calls("np.load", "numpy.load")
    assert numpy
    for path, call in numpy:
        told = [k for k in call.keywords if k.arg == "allow_pickle" or k.arg is None]
        assert all(_keyword(call, "allow_pickle") is False for _ in told), f"{path}:{call.lineno}"


def test_torch_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2), "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(ArtifactError, match="weights.pt"):
        torch_load(path)
    torch.save({"weight": torch.ones(2)}, path)
    assert torch.equal(torch_load(path)["weight"], torch.ones(2))


class _Poison:
    """Unpickling this creates a marker file: proof that the pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_loads_only_after_its_manifest_verifies(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    joblib.dump({"threshold": 0.5}, folder / "fusion.joblib")
    write_manifest(folder)
    assert load_joblib_verified(folder / "fusion.joblib", folder) == {"threshold": 0.5}

    marker = tmp_path / "unpickled"
    good = (folder / "fusion.joblib").read_bytes()
    joblib.dump(_Poison(marker), folder / "fusion.joblib")  # replaced after the manifest
    with pytest.raises(ArtifactError, match="fusion.joblib.*does not match"):
        load_joblib_verified(folder / "fusion.joblib", folder)
    (folder / "fusion.joblib").write_bytes(good)
    joblib.dump(_Poison(marker), folder / "extra.joblib")  # not listed in the manifest
    with pytest.raises(ArtifactError, match="not listed"):
        load_joblib_verified(folder / "extra.joblib", folder)
    joblib.dump(_Poison(marker), tmp_path / "outside.joblib")
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        load_joblib_verified(tmp_path / "outside.joblib", folder)
    (folder / "manifest.sha256.json").unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        load_joblib_verified(folder / "fusion.joblib", folder)
    assert not marker.exists()


def _tree(folder: Path) -> set[str]:
    skip = {"__pycache__", ".git", ".pytest_cache", ".ruff_cache"}
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if not skip & set(p.relative_to(folder).parts)
    }


def test_nothing_is_written_outside_the_output_folders(tiny_run, tmp_path):
    cwd, home, temp, out = (tmp_path / n for n in ("cwd", "home", "tmp", "out"))
    for folder in (cwd, home, temp):
        folder.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(temp), "XDG_CACHE_HOME": str(home / ".cache")}
    env = {**env, "TORCH_HOME": str(home / ".torch")}
    before = _tree(REPO)
    images = sorted(p for p in (tiny_run["root"] / "cache").rglob("*.png") if "test" in p.parts)
    runs = [
        run_module(
            "pipelines.benchmark",
            *tiny(out, "benchmark.n_examples=1"),
            "--members",
            "patchcore",
            cwd=cwd,
            env=env,
        ),
        run_module(
            "pipelines.predict",
            "--hybrid",
            str(tiny_run["hybrid"]),
            "--out",
            str(out / "predictions"),
            str(images[0]),
            cwd=cwd,
            env=env,
        ),
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
        assert_clean(result.stderr)
    assert list(cwd.iterdir()) == [] and list(temp.iterdir()) == []
    assert sorted(_tree(home)) == []
    assert sorted(_tree(REPO) - before) == []
    assert (out / "predictions" / "predictions.json").is_file()
    assert any(out.glob("benchmark-*/results.json"))
    assert os.listdir(tiny_run["hybrid"])  # the hybrid folder was only read

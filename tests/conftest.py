"""Shared fixtures: the real KolektorSDD folder, when present."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_kolektorsdd() -> Path | None:
    for candidate in (
        os.environ.get("KOLEKTORSDD_DIR"),
        REPO.parent / "shared" / "datasets" / "kolektorsdd",
    ):
        if candidate and (Path(candidate) / "train" / "good").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def kolektorsdd_dir() -> Path:
    """The KolektorSDD category folder (MVTec layout); skips when it is absent."""
    path = find_kolektorsdd()
    if path is None:
        pytest.skip("KolektorSDD not found at ../shared/datasets/kolektorsdd (or $KOLEKTORSDD_DIR)")
    return path


@pytest.fixture(scope="session")
def panels_dir(tmp_path_factory) -> Path:
    """A small synthetic panel dataset (MVTec layout, 128 px): the members' separation tests."""
    from data.synthetic import write_dataset

    return write_dataset(
        tmp_path_factory.mktemp("panels"), n_train=24, n_test=20, size=128, seed=3
    ).parent

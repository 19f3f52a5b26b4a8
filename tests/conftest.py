"""Shared fixtures: the real KolektorSDD folder, when present."""

import os
from pathlib import Path

import pytest

# The suite runs in pytest-xdist workers (pyproject's addopts: ``-n auto --dist loadfile``; a
# test file stays in one worker, so its module fixtures are built once). ``-n 0`` runs it in one
# process. ``--max-worker-restart=0``: a crashed worker fails the run at once, since under
# loadfile a replaced worker can wait forever (pytest-dev/pytest-xdist#784). Each worker gets
# its share of the cores. Without this every worker's torch (and every process it starts) would
# use all cores, and the workers would slow each other far more than they gain. Set before any
# test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    _threads = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_variable] = _threads

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


# A worker's peak resident memory reaches about 4 GiB (measured, 2026-12-07): no more workers
# than cores, nor than 6 GiB of memory each allows.
WORKER_MEMORY = 6 * 2**30


def pytest_xdist_auto_num_workers(config) -> int:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(len(os.sched_getaffinity(0)), memory // WORKER_MEMORY))


# The variable naming the signing key (artifacts.io.KEY_VARIABLE; not imported, so that this
# file imports nothing of the project before the thread counts above are set).
SIGNING_KEY_VARIABLE = "OLED_AD_KEY_FILE"


@pytest.fixture(autouse=True)
def no_signing_key_from_another_test():
    """A pipeline given ``artifacts.key_file`` sets the key for itself and the processes it
    starts (``use_key_file``, in ``os.environ``): one test's key must not sign or refuse the next
    test's folders in the same worker (seen: an offline predict refused an unsigned hybrid)."""
    before = os.environ.get(SIGNING_KEY_VARIABLE)
    yield
    if before is None:
        os.environ.pop(SIGNING_KEY_VARIABLE, None)
    else:
        os.environ[SIGNING_KEY_VARIABLE] = before

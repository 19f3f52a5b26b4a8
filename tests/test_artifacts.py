"""Artifact files: CSV written in one place, columns as asked, atomically; folders swapped in one
step."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.io import _exchange, atomic_folder, atomic_write_csv, csv_text

# Writes a folder of two files holding argv[3] at argv[1]; argv[2] "link": as on a platform
# without renameat2 (the symbolic-link swap).
_WRITER = """
import sys
import artifacts.io as io
if sys.argv[2] == "link":
    io._exchange = lambda a, b: False
with io.atomic_folder(sys.argv[1]) as folder:
    for name in ("first", "second"):
        (folder / name).write_text(sys.argv[3])
"""


def _write_folder(path: Path, swap: str, text: str, kill_at: str | None = None) -> int:
    env = {**os.environ, "OLED_AD_KILL_AT": kill_at or ""}
    return subprocess.run(
        [sys.executable, "-c", _WRITER, str(path), swap, text], env=env
    ).returncode


def _exchange_works(tmp_path: Path) -> bool:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return _exchange(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("swap", ["exchange", "link"])
def test_a_folder_is_the_old_one_or_the_new_one_whenever_the_writer_is_killed(tmp_path, swap):
    if swap == "exchange" and not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    path = tmp_path / "hybrid"
    assert _write_folder(path, swap, "v0") == 0
    version = 0
    for kill_at, after in (
        ("atomic_folder_built", "old"),
        ("atomic_folder_swapped", "new"),
        (None, "new"),
    ):
        code = _write_folder(path, swap, f"v{version + 1}", kill_at)
        assert code == (-9 if kill_at else 0), (kill_at, code)
        version += after == "new"
        # Both files of one complete folder, never a mix, and the folder always there.
        assert [(path / n).read_text() for n in ("first", "second")] == [f"v{version}"] * 2, kill_at
        # Without renameat2 the first replacement makes the path a link, and it stays one.
        assert path.is_symlink() == (swap == "link" and version > 0)
    # The clean run left no temporaries; a link names its one version folder, kept beside it.
    leftovers = {p.name for p in tmp_path.iterdir()} - {"hybrid", "a", "b"}
    left_by_kills = {n for n in leftovers if n.endswith((".tmp", ".old"))}
    assert len(left_by_kills) <= 2  # at most one per killed writer
    if swap == "link":
        assert os.readlink(path) in leftovers


def test_a_failing_block_leaves_the_old_folder(tmp_path):
    path = tmp_path / "weights"
    with atomic_folder(path) as folder:
        (folder / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(path) as folder:
        (folder / "w").write_text("new")
        raise RuntimeError("training failed")
    assert (path / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]


def test_csv_columns_follow_the_rows_or_the_request(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "epoch": 1}]
    # Every key the rows have, first seen first; a missing value is empty.
    assert csv_text(rows).splitlines() == ["step,loss,epoch", "1,0.5,", "2,0.25,1"]
    # Asked columns: that order, others left out, absent ones empty.
    assert csv_text(rows, ["epoch", "step"]).splitlines() == ["epoch,step", ",1", "1,2"]
    path = atomic_write_csv(tmp_path / "out" / "history.csv", rows, ["step", "loss"])
    with path.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [
            {"step": "1", "loss": "0.5"},
            {"step": "2", "loss": "0.25"},
        ]
    assert [p.name for p in path.parent.iterdir()] == ["history.csv"]  # no temporary left
    # A comma inside a value is quoted, not a new column.
    assert csv_text([{"path": "a,b.png"}]).splitlines()[1] == '"a,b.png"'

"""Retraining safety: the run lock, the data manifest, atomic promotion, the history."""

import json
import os
import subprocess
import sys

import pytest

from artifacts.lock import LockHeld, RunLock
from retraining.workspace import (
    append_history,
    current_champion,
    new_files,
    promote,
    read_history,
    scan_files,
)


def test_lock_is_exclusive_while_its_holder_lives(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from artifacts.lock import RunLock; "
            f"RunLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            RunLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Its holder is dead now: the kernel freed the lock, and the holder file it left is reported.
    lock = RunLock(path).acquire()
    assert lock.stale_cleared["pid"] == holder.pid
    assert json.loads(lock.holder_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.holder_path.exists() and path.exists()  # the lock file itself stays


def test_unreadable_holder_file_left_behind_counts_as_stale(tmp_path):
    path = tmp_path / "lock"
    RunLock(path).holder_path.write_text("{half")
    with RunLock(path) as lock:
        assert lock.stale_cleared == {}


def test_manifest_finds_added_and_changed_images(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.png").write_bytes(b"a")
    (tmp_path / "good" / "notes.txt").write_text("not an image")
    first = scan_files([tmp_path / "good", tmp_path / "missing"], tmp_path)
    assert list(first) == ["good/a.png"]
    (tmp_path / "good" / "b.png").write_bytes(b"b")
    (tmp_path / "good" / "a.png").write_bytes(b"changed")
    assert new_files(first, scan_files([tmp_path / "good"], tmp_path)) == [
        "good/a.png",
        "good/b.png",
    ]
    assert (
        new_files(
            scan_files([tmp_path / "good"], tmp_path), scan_files([tmp_path / "good"], tmp_path)
        )
        == []
    )


def test_promotion_switches_the_current_link(tmp_path):
    hybrids = tmp_path / "hybrids"
    for name in ("h1", "h2"):
        (hybrids / name).mkdir(parents=True)
    assert current_champion(tmp_path) is None
    promote(tmp_path, hybrids / "h1")
    assert current_champion(tmp_path) == (hybrids / "h1").resolve()
    promote(tmp_path, hybrids / "h2")
    assert current_champion(tmp_path) == (hybrids / "h2").resolve()
    assert os.readlink(tmp_path / "current") == os.path.join("hybrids", "h2")
    with pytest.raises(ValueError, match="not inside"):
        promote(tmp_path, tmp_path / "elsewhere")


def test_history_keeps_every_run(tmp_path):
    append_history(tmp_path, {"run": 1, "promoted": True})
    append_history(tmp_path, {"run": 2, "promoted": False})
    assert [e["run"] for e in read_history(tmp_path)] == [1, 2]


def test_artifact_manifests_work_with_relative_folders(tmp_path, monkeypatch):
    # Pipelines write below relative folders such as the default output_dir "reports".
    from artifacts.io import atomic_folder, atomic_write_text, verify_manifest
    from artifacts.io import write_manifest as write_artifact_manifest

    monkeypatch.chdir(tmp_path)
    with atomic_folder("reports/run/weights") as folder:
        atomic_write_text(folder / "member.json", "{}")
        atomic_write_text(folder / "sub" / "weights.pt", "x")
        write_artifact_manifest(folder)
    assert set(verify_manifest("reports/run/weights")) == {"member.json", "sub/weights.pt"}

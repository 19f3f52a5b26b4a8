"""Fabric DDP on two CPU processes (gloo): a benchmark job run by two ranks writes one result
set (rank 0 alone), retraining under DDP takes its lock once and promotes once; and a job's
process dies with the process that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.images import write_png
from data.synthetic import PanelGenerator
from fusion.hybrid import Hybrid
from members import create_member, load_member
from retraining.workspace import current_champion, read_history
from tests.helpers import run_module
from tests.robustness.support import assert_clean, sets, tiny

REPO = Path(__file__).resolve().parents[1]
DDP = ("device.strategy=ddp", "device.devices=2", "device.accelerator=cpu")


@pytest.mark.slow
def test_a_ddp_job_on_two_processes_writes_one_result_set(tmp_path):
    args = [*tiny(tmp_path, *DDP), "--members", "patchcore", "--run-name", "run"]
    done = run_module("pipelines.benchmark", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_clean(done.stderr)
    (job_dir,) = (tmp_path / "run" / "jobs").iterdir()
    log = (job_dir / "log.txt").read_text()
    # One rank wrote the log, the weights, the evaluation and the results: each step once.
    assert log.count("fitting patchcore") == 1 and "2 process(es)" in log
    assert log.count("evaluating on") == 1
    results = json.loads((job_dir / "results.json").read_text())
    assert results["status"] == "ok"
    # The memory bank holds the patches of every training image, from both ranks.
    member = create_member("patchcore")
    with torch.no_grad():
        per_image = member.patch_features(torch.rand(1, 3, 64, 64))[0, 0].numel()
    assert results["cost"]["fit_patches"] == results["cost"]["train_images"] * per_image
    bank = load_member(job_dir / "weights").memory_bank
    assert bank.shape[0] == round(0.1 * results["cost"]["fit_patches"])


def _normals(folder: Path, start: int, count: int) -> None:
    generator = PanelGenerator(size=64, seed=7)
    for i in range(start, start + count):
        write_png(folder / f"panel{i:03d}.png", generator.generate_normal(i)["image"], 16)


@pytest.mark.slow
def test_ddp_retraining_takes_the_lock_once_and_promotes_once(tmp_path):
    _normals(tmp_path / "normal", 0, 14)
    args = sets(
        f"retrain.workspace={tmp_path / 'ws'}",
        f"retrain.normal_dirs=[{tmp_path / 'normal'}]",
        "retrain.members=[padim]",
        "retrain.image_size=64",
        "retrain.holdout_injections=2",
        "retrain.injections_per_image=2",
        "data.batch_size=4",
        *DDP,
    )
    first = run_module("pipelines.retrain", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_clean(first.stderr)
    assert first.stdout.count("promoted") == 1  # rank 0 alone reports
    workspace = tmp_path / "ws"
    assert [e["action"] for e in read_history(workspace)] == ["promoted"]
    assert len(list((workspace / "hybrids").iterdir())) == 1
    assert not (workspace / "lock.holder.json").exists()  # released
    Hybrid.load(current_champion(workspace))

    # No new data: rank 0 tells the other rank that nothing is trained, and both end.
    second = run_module("pipelines.retrain", *args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("no new data") == 1
    assert [e["action"] for e in read_history(workspace)] == ["promoted", "none"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_job_process_dies_with_the_process_that_started_it():
    """A lost runner (or Ray worker) leaves no job behind writing into a folder that a retry
    works in."""
    code = (
        "import time; from experiments.process import call_in_fresh_process; "
        "call_in_fresh_process(time.sleep, 120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        child = _wait_for(lambda: _children(parent.pid))[0]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child))
    finally:
        parent.kill()


def test_a_job_process_whose_parent_ended_before_it_started_dies_at_once():
    """The parent may die while the new interpreter starts, before it asks to die with it; it
    then finds another parent and ends itself instead of running the job."""
    from experiments.process import PARENT_VARIABLE

    payload = json.dumps({"module": "time", "name": "sleep", "args": [120], "kwargs": {}})
    started = subprocess.run(
        [sys.executable, "-m", "experiments.process", payload],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), PARENT_VARIABLE: str(os.getpid() + 10**6)},
        timeout=30,
    )
    assert started.returncode == -signal.SIGKILL


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def _wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail("timed out waiting")

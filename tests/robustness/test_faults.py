"""Faults: SIGKILL during member training, during a benchmark run and during retraining (the
next run resumes or redoes the work; nothing half-written is loaded), and a full disk while
results are written (the error is reported, earlier results stay intact).

The kills are real SIGKILLs at named points (``artifacts.io.fault_point``: ``OLED_AD_KILL_AT``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

from data.images import write_png
from data.synthetic import PanelGenerator
from fusion.hybrid import Hybrid
from members.base import load_member
from pipelines import benchmark, predict, retrain
from retraining.workspace import current_champion, read_history
from tests.helpers import run_module
from tests.robustness.support import assert_clean, call, sets, tiny

# Autoencoder at 64 px, 8 training images, batch 4, 2 epochs: 4 optimizer steps, a checkpoint
# after each; the kill comes after step 3.
TRAINING = (
    "members.autoencoder.trainer.max_epochs=2",
    "trainer.checkpoint_every_n_steps=1",
)
KILL = {"OLED_AD_KILL_AT": "train_step_3"}


def _history_steps(job_dir: Path) -> list[int]:
    import csv

    with open(job_dir / "history.csv") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r["scope"] == "step"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_a_job_killed_during_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    args = [*tiny(tmp_path, *TRAINING), "--members", "autoencoder", "--run-name", "run"]
    monkeypatch.setenv("OLED_AD_KILL_AT", KILL["OLED_AD_KILL_AT"])
    code, out, err = call(benchmark.main, args, capsys)
    assert code == 1 and "killed by signal 9" in err
    job_dir = next((tmp_path / "run" / "jobs").iterdir())
    assert (job_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (job_dir / "weights").exists()  # no half-made member to load
    assert json.loads((job_dir / "results.json").read_text())["status"] == "failed"

    monkeypatch.delenv("OLED_AD_KILL_AT")
    code, out, err = call(benchmark.main, args, capsys)
    assert code == 0
    assert "resuming from" in (job_dir / "log.txt").read_text()
    assert _history_steps(job_dir) == [1, 2, 3, 4]  # steps 1-3 kept, step 4 added, none twice
    assert json.loads((job_dir / "results.json").read_text())["status"] == "ok"
    load_member(job_dir / "weights")


def test_a_benchmark_run_killed_mid_job_resumes_and_keeps_finished_jobs(tmp_path):
    args = [*tiny(tmp_path, *TRAINING), "--members", "padim,autoencoder", "--run-name", "run"]
    env = {**KILL, "OLED_AD_KILL_SCOPE": "group"}  # the benchmark and its job process die
    killed = run_module("pipelines.benchmark", *args, env=env, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert not (run / "results.json").exists() and not list(run.rglob("*.tmp"))
    jobs = {p.name.split("-")[2]: p for p in (run / "jobs").iterdir()}
    finished = _snapshot(jobs["padim"])
    assert json.loads((jobs["padim"] / "results.json").read_text())["status"] == "ok"
    assert not (jobs["autoencoder"] / "results.json").exists()

    again = run_module("pipelines.benchmark", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_clean(again.stderr)
    assert "finished earlier, skipped" in again.stderr
    assert _snapshot(jobs["padim"]) == finished  # the finished job was not touched
    assert "resuming from" in (jobs["autoencoder"] / "log.txt").read_text()
    results = json.loads((run / "results.json").read_text())["jobs"]
    assert [r["status"] for r in results] == ["ok", "ok"]


def _normals(folder: Path, count: int, start: int = 0) -> None:
    generator = PanelGenerator(size=64, seed=7)
    for i in range(start, start + count):
        write_png(folder / f"panel{i:03d}.png", generator.generate_normal(i)["image"], 16)


def _retrain_args(root: Path, *extra: str) -> list[str]:
    return sets(
        f"retrain.workspace={root / 'ws'}",
        f"retrain.normal_dirs=[{root / 'normal'}]",
        "retrain.image_size=64",
        "retrain.holdout_injections=2",
        "retrain.injections_per_image=2",
        "data.batch_size=4",
        *extra,
    )


def test_retraining_killed_during_member_training_resumes(tmp_path):
    _normals(tmp_path / "normal", 14)
    args = _retrain_args(tmp_path, "retrain.members=[autoencoder]", *TRAINING)
    killed = run_module("pipelines.retrain", *args, env=KILL)
    assert killed.returncode == -signal.SIGKILL
    workspace = tmp_path / "ws"
    assert current_champion(workspace) is None and not read_history(workspace)
    assert list(workspace.glob("work/*/members/autoencoder/checkpoints/last.ckpt"))

    again = run_module("pipelines.retrain", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_clean(again.stderr)
    assert "resuming from" in (workspace / "log.txt").read_text()
    assert read_history(workspace)[-1]["action"] == "promoted"
    Hybrid.load(current_champion(workspace))


# --- a full disk ------------------------------------------------------------------------------


class _FullDisk:
    """A file object whose writes fail as on a full disk (ENOSPC, no file name: the OS gives
    none)."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def fill_disk_at(monkeypatch, name: str) -> None:
    """Writes through ``artifacts.io``'s atomic writer to a file called ``name`` hit a full disk."""
    import artifacts.io

    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        fh = real(fd, *args, **kwargs)
        return _FullDisk(fh) if target.startswith(f".{name}.") else fh

    monkeypatch.setattr(artifacts.io.os, "fdopen", fdopen)


def test_a_full_disk_during_predict_keeps_the_earlier_results(
    tiny_run, tmp_path, monkeypatch, capsys
):
    images = tiny_run["run"].parent / "cache"
    inputs = sorted(p for p in images.rglob("*.png") if "test" in p.parts)[:2]
    out = tmp_path / "out"
    argv = ["--hybrid", tiny_run["hybrid"], "--out", out, *inputs]
    assert call(predict.main, argv, capsys)[0] == 0
    before = _snapshot(out)
    fill_disk_at(monkeypatch, "predictions.json")
    code, _, err = call(predict.main, argv, capsys)
    assert code == 1
    assert f"No space left on device: {out / 'predictions.json'}" in err
    after = _snapshot(out)
    # Everything of the first run is intact (only the log grew); no temporary file is left.
    assert {k: v for k, v in after.items() if k != "log.txt"} == {
        k: v for k, v in before.items() if k != "log.txt"
    }


def test_a_full_disk_during_a_benchmark_keeps_the_finished_jobs(
    tiny_run, tmp_path, monkeypatch, capsys
):
    shutil.copytree(tiny_run["run"], tmp_path / "bench", ignore=shutil.ignore_patterns("hybrid"))
    before = _snapshot(tmp_path / "bench")
    args = [*tiny(tiny_run["root"], f"output_dir={tmp_path}"), "--members", "patchcore,padim"]
    fill_disk_at(monkeypatch, "results.json")
    code, _, err = call(benchmark.main, [*args, "--run-name", "bench"], capsys)
    assert code == 1
    assert f"No space left on device: {tmp_path / 'bench' / 'results.json'}" in err
    after = _snapshot(tmp_path / "bench")
    assert not [k for k in after if k.endswith(".tmp")]
    for name in ("results.json", *(k for k in before if k.startswith("jobs/"))):
        assert after[name] == before[name], name
    monkeypatch.undo()
    assert call(benchmark.main, [*args, "--run-name", "bench"], capsys)[0] == 0


def test_a_full_disk_during_retraining_keeps_the_champion(tmp_path, monkeypatch, capsys):
    _normals(tmp_path / "normal", 12)
    args = _retrain_args(tmp_path, "retrain.members=[padim]")
    assert call(retrain.main, args, capsys)[0] == 0
    workspace = tmp_path / "ws"
    champion = current_champion(workspace)
    history = (workspace / "history.jsonl").read_bytes()
    _normals(tmp_path / "normal", 3, start=12)
    fill_disk_at(monkeypatch, "fusion.joblib")
    code, _, err = call(retrain.main, args, capsys)
    assert code == 1 and "No space left on device" in err and "fusion.joblib" in err
    assert current_champion(workspace) == champion
    Hybrid.load(champion)
    assert (workspace / "history.jsonl").read_bytes() == history
    assert [p.name for p in (workspace / "hybrids").iterdir()] == [champion.name]

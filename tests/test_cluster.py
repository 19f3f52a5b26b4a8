"""Ray as the cluster engine: a benchmark grid and a predict run on a local Ray instance (2 CPUs)
give what the local executor gives, with its resume, failure recording and exit status; a job
killed mid-run is retried and resumes from its checkpoint; a predict run killed on Ray resumes
under the local executor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data.images import write_png
from data.synthetic import PanelGenerator
from pipelines import benchmark, ensemble, predict
from pipelines.common import PARTIAL_FAILURE
from prediction.results import SHARD_DIR, STREAM_NAME
from tests.robustness.support import call, sets, tiny

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
pytestmark = pytest.mark.slow

ON_RAY = sets("benchmark.executor=ray")
GRID = ["--members", "patchcore,padim", "--run-name", "run"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module; the pipelines use it as they find it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny grid run by the local executor, and a hybrid built from it."""
    root = tmp_path_factory.mktemp("local")
    assert benchmark.main([*tiny(root), *GRID]) == 0
    run = root / "run"
    hybrid_args = ["--from", str(run), "--members", "patchcore,padim", "--name", "hybrid"]
    # A rank-mean hybrid of both members (no supervised member): what these tests exercise
    # is the pipelines around a hybrid, not how its members are chosen.
    hybrid_args += ["--combiner", "rank"]
    assert (
        ensemble.main(
            [*hybrid_args, *sets("ensemble.injections_per_image=2", "ensemble.supervised=never")]
        )
        == 0
    )
    return {"run": run, "hybrid": run / "hybrid" / "hybrid"}


@pytest.fixture(scope="module")
def panels(tmp_path_factory) -> list[Path]:
    """Ten new panels of the tiny run's size (two with defects) and a file that is no image."""
    folder = tmp_path_factory.mktemp("panels")
    generator = PanelGenerator(size=64, seed=11)
    paths = []
    for i in range(10):
        sample = generator.generate_defective(i) if i in (3, 7) else generator.generate_normal(i)
        paths.append(write_png(folder / f"panel{i:02d}.png", sample["image"], 16))
    (folder / "notes.png").write_text("not an image")
    return [*paths, folder / "notes.png"]


def _jobs(run: Path) -> dict[str, dict]:
    return {r["job_id"]: r for r in json.loads((run / "results.json").read_text())["jobs"]}


def _scores(job_dir: Path) -> dict[str, float]:
    with open(job_dir / "scores.csv") as fh:
        return {row["path"].split("/cache/")[-1]: float(row["score"]) for row in csv.DictReader(fh)}


def test_a_grid_on_ray_resumes_records_failures_and_matches_the_local_run(
    local_run, tmp_path, capsys
):
    args = [*tiny(tmp_path), *GRID, *ON_RAY]
    # PaDiM asked for more channels than its layers have: that task fails, the other goes on.
    failing = [*args, *sets("members.padim.n_features=100000")]
    code, out, err = call(benchmark.main, failing, capsys)
    assert code == PARTIAL_FAILURE
    run = tmp_path / "run"
    jobs = {r["member"]: r for r in _jobs(run).values()}
    assert jobs["padim"]["status"] == "failed" and "n_features" in jobs["padim"]["error"]
    assert jobs["patchcore"]["status"] == "ok"
    assert f"failed {jobs['padim']['job_id']}" in out

    # Again without the fault: the finished job is skipped, the failed one runs again.
    finished = run / "jobs" / jobs["patchcore"]["job_id"] / "results.json"
    stamp = finished.stat().st_mtime_ns
    code, out, err = call(benchmark.main, args, capsys)
    assert code == 0
    assert "finished earlier, skipped" in err
    assert finished.stat().st_mtime_ns == stamp

    # The same jobs, figures and ranking as the local executor's (a task's process has as many
    # threads as the task's CPUs, 1 here, so sums differ from the local run's in the last bits).
    on_ray, local = _jobs(run), _jobs(local_run["run"])
    assert on_ray.keys() == local.keys()
    for job_id, result in on_ray.items():
        assert result["status"] == "ok"
        for name, value in local[job_id]["metrics"].items():
            assert result["metrics"][name] == pytest.approx(value, abs=1e-4), (job_id, name)
        ray_scores = _scores(run / "jobs" / job_id)
        local_scores = _scores(local_run["run"] / "jobs" / job_id)
        assert ray_scores.keys() == local_scores.keys()
        for path, score in local_scores.items():
            assert ray_scores[path] == pytest.approx(score, rel=1e-5, abs=1e-6), (job_id, path)
    ray_board, local_board = (
        [row.split(",")[:2] for row in (r / "leaderboard.csv").read_text().splitlines()]
        for r in (run, local_run["run"])
    )
    assert ray_board == local_board
    assert (run / "report.html").is_file()


def test_a_job_killed_on_ray_is_retried_and_resumes_from_its_checkpoint(tmp_path, capsys):
    # Autoencoder: 2 epochs of 2 steps, a checkpoint after each step; the job's process is
    # SIGKILLed after step 3 (the kill is set in the tasks' environment only).
    training = ("members.autoencoder.trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=1")
    kill = sets("ray.env_vars={OLED_AD_KILL_AT: train_step_3}", "ray.max_retries=1")
    args = [*tiny(tmp_path, *training), "--members", "autoencoder", "--run-name", "run"]
    code, out, err = call(benchmark.main, [*args, *ON_RAY, *kill], capsys)
    assert code == 0, err[-2000:]
    job_dir = next((tmp_path / "run" / "jobs").iterdir())
    log = (job_dir / "log.txt").read_text()
    assert log.count("fitting autoencoder") == 2  # the first attempt and its retry
    assert "resuming from" in log
    with open(job_dir / "history.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r["scope"] == "step"]
    assert steps == [1, 2, 3, 4]  # steps 1-3 kept from the killed attempt, none twice
    assert json.loads((job_dir / "results.json").read_text())["status"] == "ok"

    # Without retries the kill is recorded as the job's failure, and the run says so.
    again = [*tiny(tmp_path, *training), "--members", "autoencoder", "--run-name", "again"]
    no_retry = sets("ray.env_vars={OLED_AD_KILL_AT: train_step_3}", "ray.max_retries=0")
    code, out, err = call(benchmark.main, [*again, *ON_RAY, *no_retry], capsys)
    assert code == 1 and "killed by signal 9" in err


def _predictions(out: Path) -> dict[str, dict]:
    return {e["path"]: e for e in json.loads((out / "predictions.json").read_text())["images"]}


def _predict_args(hybrid: Path, out: Path, panels: list[Path], *extra: str) -> list[str]:
    return ["--hybrid", str(hybrid), "--out", str(out), *extra, *map(str, panels)]


def test_predict_on_ray_actors_gives_the_local_results(local_run, panels, tmp_path, capsys):
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    code, _, _ = call(predict.main, _predict_args(local_run["hybrid"], local_out, panels), capsys)
    assert code == PARTIAL_FAILURE  # the file that is no image
    # Three chunks of 4 images over 2 actors.
    on_ray = ["--executor", "ray", *sets("ray.actors=2", "ray.chunk_images=4")]
    code, out, _ = call(
        predict.main, _predict_args(local_run["hybrid"], ray_out, panels, *on_ray), capsys
    )
    assert code == PARTIAL_FAILURE
    assert "10 image(s) predicted, 1 skipped" in out
    assert not list((ray_out / SHARD_DIR).glob("*.jsonl"))  # merged into the stream
    local, on_ray_results = _predictions(local_out), _predictions(ray_out)
    assert on_ray_results.keys() == local.keys() == {str(p) for p in panels}
    for path, entry in local.items():
        got = on_ray_results[path]
        assert got["status"] == entry["status"], path
        if entry["status"] != "ok":
            continue
        assert (got["label"], got["level"], len(got["regions"])) == (
            entry["label"],
            entry["level"],
            len(entry["regions"]),
        ), path
        assert got["score"] == pytest.approx(entry["score"], rel=1e-4, abs=1e-6), path
    assert sum(e["label"] for e in local.values() if e["status"] == "ok") >= 1
    for name in ("predictions.csv", "regions.csv"):
        rows = (ray_out / name).read_text().splitlines()
        assert len(rows) == len((local_out / name).read_text().splitlines()), name
    assert len(list((ray_out / "overlays").glob("*.png"))) == 10

    # Run again on Ray: everything is done already (the bad file too: same bytes, same answer).
    code, out, _ = call(
        predict.main, _predict_args(local_run["hybrid"], ray_out, panels, *on_ray), capsys
    )
    assert "11 image(s) already done" in out and "0 image(s) predicted" in out


def test_a_predict_run_killed_on_ray_resumes_under_the_local_executor(
    local_run, panels, tmp_path, capsys
):
    out = tmp_path / "out"
    # Each actor's process is SIGKILLed after every image it finishes; restarted once, each
    # actor gets two images done, then the run fails and says so.
    kill = sets(
        "ray.env_vars={OLED_AD_KILL_AT: predict_image_done}",
        "ray.max_retries=1",
        "ray.actors=2",
        "ray.chunk_images=4",
    )
    args = _predict_args(local_run["hybrid"], out, panels[:10], "--executor", "ray", *kill)
    code, _, err = call(predict.main, args, capsys)
    assert code == 1 and "predict actor failed" in err
    assert not list((out / SHARD_DIR).glob("*.jsonl"))  # what the actors streamed is merged
    done_on_ray = [json.loads(line) for line in (out / STREAM_NAME).read_text().splitlines()]
    assert 2 <= len(done_on_ray) < 10
    assert all(e["status"] == "ok" for e in done_on_ray)

    code, stdout, _ = call(predict.main, _predict_args(local_run["hybrid"], out, panels), capsys)
    assert code == PARTIAL_FAILURE  # the file that is no image
    assert f"{len(done_on_ray)} image(s) already done" in stdout
    lines = [json.loads(line) for line in (out / STREAM_NAME).read_text().splitlines()]
    images = [e["path"] for e in lines if e["status"] == "ok"]
    assert sorted(images) == sorted(map(str, panels[:10]))  # none twice, none lost
    assert len(_predictions(out)) == len(panels)

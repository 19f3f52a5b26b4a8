"""Run folders, hybrids and retrain workspaces resolve the same from any working directory, and a
copied tree of runs and data finds its data again; data that is missing is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.robustness.support import assert_clean, call, sets

pytestmark = pytest.mark.slow

# The default layout, relative to where a user starts: runs and the synthetic cache below reports/.
RELATIVE = sets(
    "output_dir=reports",
    "synthetic.cache_dir=reports/.cache",
    "synthetic.n_train=10",
    "synthetic.n_test=6",
    "synthetic.size=64",
    "data.image_size=64",
    "data.batch_size=4",
    "benchmark.n_examples=1",
    "trainer.progress=false",
)
HYBRID = sets("ensemble.injections_per_image=2", "ensemble.supervised=never")


def test_a_run_made_here_is_used_from_elsewhere_and_from_a_copy(tmp_path, monkeypatch, capsys):
    from data.sources import make_dataset
    from experiments.selection import select_members
    from pipelines import benchmark, ensemble, predict

    started_in, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started_in)
    argv = [*RELATIVE, "--members", "padim", "--run-name", "bench"]
    code, _, err = call(benchmark.main, argv, capsys)
    assert code == 0, err[-2000:]
    run = started_in / "reports" / "bench"
    job = json.loads(next(run.glob("jobs/*/job.json")).read_text())
    assert Path(job["source"]["data_dir"]).is_absolute()

    # From another working directory: the hybrid is built, and predict runs it.
    monkeypatch.chdir(elsewhere)
    argv = ["--from", run, "--members", "padim", "--name", "hybrid", *HYBRID]
    assert call(ensemble.main, argv, capsys)[0] == 0
    panels = sorted((started_in / "reports" / ".cache").rglob("test/*/*.png"))[:2]
    inputs = elsewhere / "inputs"
    inputs.mkdir()
    for panel in panels:
        shutil.copy(panel, inputs / panel.name)
    argv = ["--hybrid", run / "hybrid" / "hybrid", "inputs", "--out", "predictions"]
    assert call(predict.main, argv, capsys)[0] == 0
    assert len(json.loads((elsewhere / "predictions" / "predictions.json").read_text())) == 2

    # The whole tree, runs and data, copied to another machine's folder, the original gone:
    # the copy finds its data beside it.
    copy = tmp_path / "other-machine" / "reports"
    shutil.copytree(started_in / "reports", copy, symlinks=True)
    shutil.rmtree(started_in)
    selection = select_members(copy / "bench", None, None, ["padim"], 1, "composite")
    assert selection.source.data_dir.resolve().parent == (copy / ".cache").resolve()
    assert make_dataset(selection.source, selection.category, "test", selection.seed, 64)[0]

    # Without its data, the run says which data is missing and where it looked.
    shutil.rmtree(copy / ".cache")
    argv = ["--from", copy / "bench", "--members", "padim", "--name", "again", *HYBRID]
    code, _, err = call(ensemble.main, argv, capsys)
    assert code != 0
    assert "the data this was made on (synthetic, categories panel) is missing" in err
    assert str(copy / ".cache") in err  # beside the run, where the copy had it
    assert_clean(err)


def test_a_retrain_workspace_started_here_is_continued_from_elsewhere(
    tmp_path, monkeypatch, capsys
):
    from data.images import write_png
    from data.synthetic import PanelGenerator
    from pipelines import retrain

    started_in, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    generator = PanelGenerator(size=64, seed=7)
    for i in range(12):
        image = generator.generate_normal(i)["image"]
        write_png(started_in / "normal" / f"panel{i:03d}.png", image, 16)
    elsewhere.mkdir()
    options = sets(
        "retrain.members=[padim]",
        "retrain.image_size=64",
        "retrain.holdout_injections=2",
        "retrain.injections_per_image=2",
    )
    monkeypatch.chdir(started_in)
    relative = sets("retrain.workspace=ws", "retrain.normal_dirs=[normal]")
    assert call(retrain.main, [*relative, *options], capsys)[0] == 0
    # The same workspace and data named from elsewhere: nothing new, the champion kept.
    monkeypatch.chdir(elsewhere)
    absolute = sets(
        f"retrain.workspace={started_in / 'ws'}", f"retrain.normal_dirs=[{started_in / 'normal'}]"
    )
    code, out, _ = call(retrain.main, [*absolute, *options], capsys)
    assert code == 0 and "no new data" in out
    holdout = json.loads((started_in / "ws" / "holdout.json").read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in holdout["normal"])

"""Predict on a plant's volume: results streamed line by line survive a SIGKILL and a re-run
resumes (no image done twice, none lost); Ctrl-C stops cleanly; one run at a time per output
folder; a folder of another hybrid is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.hybrid import Hybrid
from pipelines import predict
from prediction.results import STREAM_NAME, ResultsError, read_stream
from tests.helpers import run_module
from tests.robustness.support import assert_clean, call


@pytest.fixture(scope="module")
def panels(tiny_run) -> list[Path]:
    images = tiny_run["run"].parent / "cache"
    found = sorted(p for p in images.rglob("*.png") if "test" in p.parts and "mask" not in p.name)
    assert len(found) >= 5
    return found[:5]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STREAM_NAME).read_text().splitlines()]


def test_a_killed_run_keeps_its_images_and_the_rerun_does_each_once(tiny_run, panels, tmp_path):
    out = tmp_path / "out"
    args = ["--hybrid", str(tiny_run["hybrid"]), "--out", str(out), *map(str, panels)]
    killed = run_module("pipelines.predict", *args, env={"OLED_AD_KILL_AT": "predict_image_done"})
    assert killed.returncode == -signal.SIGKILL
    assert [e["path"] for e in _lines(out)] == [str(panels[0])]  # the first image survived

    resumed = run_module("pipelines.predict", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_clean(resumed.stderr)
    assert "1 image(s) already done" in resumed.stdout
    lines = _lines(out)
    assert sorted(e["path"] for e in lines) == sorted(map(str, panels))  # none twice, none lost
    report = json.loads((out / "predictions.json").read_text())
    assert [e["path"] for e in report["images"]] == [e["path"] for e in lines]
    assert len((out / "predictions.csv").read_text().splitlines()) == len(panels) + 1

    again = run_module("pipelines.predict", *args)
    assert again.returncode == 0 and f"{len(panels)} image(s) already done" in again.stdout
    assert len(_lines(out)) == len(panels)


def test_a_changed_file_is_predicted_again(tiny_run, panels, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    copies = [folder / p.name for p in panels[:2]]
    for source, copy in zip(panels, copies):
        copy.write_bytes(source.read_bytes())
    out = tmp_path / "out"
    argv = ["--hybrid", tiny_run["hybrid"], "--out", out, folder]
    assert predict.main([str(a) for a in argv]) == 0
    copies[0].write_bytes(panels[3].read_bytes())  # same path, new content
    assert predict.main([str(a) for a in argv]) == 0
    assert [e["path"] for e in _lines(out)] == [str(copies[0]), str(copies[1]), str(copies[0])]
    report = json.loads((out / "predictions.json").read_text())["images"]
    assert len(report) == 2  # the latest result per image
    assert {e["sha256"] for e in report if e["path"] == str(copies[0])} == {
        _lines(out)[-1]["sha256"]
    }


# Interrupts the second image it is asked for, from inside predict's own process.
INTERRUPTING = """
import os
import signal

from fusion.hybrid import Hybrid

_original, _seen = Hybrid.predict, []


def _predict_and_interrupt(self, image, *args, **kwargs):
    _seen.append(1)
    if len(_seen) == 2:
        for _ in range({signals}):
            os.kill(os.getpid(), signal.SIGINT)
    return _original(self, image, *args, **kwargs)


Hybrid.predict = _predict_and_interrupt
"""


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_ctrl_c_keeps_what_is_done_and_says_how_to_resume(
    tiny_run, panels, tmp_path, capsys, signals
):
    """Ctrl-C during the second image: once finishes it, twice drops it; exit 130, no
    traceback, every finished image kept, the same command resumes. Run in its own interpreter,
    as a user's would be: the signal reaches that process only, not the test process (whose
    other tests may have left signal handlers behind, Ray's among them)."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(INTERRUPTING.format(signals=signals))
    out = tmp_path / "out"
    argv = ["--hybrid", tiny_run["hybrid"], "--out", out, *panels]
    interrupted = run_module("pipelines.predict", *argv, pythonpath=(patch,))
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Run the same command again to resume" in interrupted.stdout
    assert "Traceback" not in interrupted.stderr
    kept = [e["path"] for e in _lines(out)]
    assert kept == [str(p) for p in panels[: 3 - signals]]
    assert json.loads((out / "predictions.json").read_text())["images"][-1]["path"] == kept[-1]
    code, stdout, _ = call(predict.main, argv, capsys)
    assert code == 0 and f"{len(kept)} image(s) already done" in stdout
    assert sorted(e["path"] for e in _lines(out)) == sorted(map(str, panels))


def test_one_run_at_a_time_per_output_folder(tiny_run, panels, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from artifacts.lock import RunLock; "
            f"RunLock({str(out / '.lock')!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["--hybrid", tiny_run["hybrid"], "--out", out, panels[0]]
        code, _, err = call(predict.main, argv, capsys)
        assert code == 1
        assert f"held by pid {holder.pid}" in err and "choose another --out" in err
        assert not (out / STREAM_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead: its lock is stale and the next run takes it.
    assert call(predict.main, argv, capsys)[0] == 0


def test_results_of_another_hybrid_are_refused(tiny_run, panels, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / STREAM_NAME).write_text(
        json.dumps({"path": str(panels[0]), "hybrid_id": "0" * 64, "status": "ok"}) + "\n"
    )
    argv = ["--hybrid", tiny_run["hybrid"], "--out", out, panels[0]]
    code, _, err = call(predict.main, argv, capsys)
    assert code == 1 and "results of another hybrid or runtime" in err
    assert "choose a new --out" in err


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / STREAM_NAME
    path.write_text('{"path": "a"}\n{"path": "b"}\n{"path": "c", "sco')
    assert [e["path"] for e in read_stream(path)] == ["a", "b"]
    assert path.read_text() == '{"path": "a"}\n{"path": "b"}\n'  # appending goes on cleanly
    path.write_text('{"path": "a"}\nnot json\n{"path": "b"}\n')
    with pytest.raises(ResultsError, match=f"{path}, line 2"):
        read_stream(path)


def test_predict_on_a_device_that_is_absent_runs_on_the_cpu_and_says_so(
    tiny_run, panels, tmp_path, monkeypatch, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = ["--hybrid", tiny_run["hybrid"], "--out", out, "--device", "cuda", panels[0]]
    assert call(predict.main, argv, capsys)[0] == 0
    assert "no CUDA device is available" in (out / "log.txt").read_text()
    assert json.loads((out / "predictions.json").read_text())["images"][0]["status"] == "ok"


def test_batches_through_the_members_give_the_results_of_one_image_at_a_time(
    tiny_run, panels, tmp_path, capsys
):
    results = {}
    for size in (1, 4):
        out = tmp_path / f"batch{size}"
        argv = ["--hybrid", tiny_run["hybrid"], "--out", out, *panels]
        argv += ["--set", f"predict.batch_size={size}"]
        assert call(predict.main, argv, capsys)[0] == 0
        results[size] = json.loads((out / "predictions.json").read_text())["images"]
    threshold = Hybrid.load(tiny_run["hybrid"]).image_threshold_
    decided_alike = 0
    for one, batched in zip(results[1], results[4]):
        assert one["path"] == batched["path"]
        # A batched convolution rounds differently from a single one: member scores move by
        # ~1e-6 relative (measured), which the fitted image fusion, steep on this tiny run,
        # turns into up to ~5e-4 of fused score.
        assert batched["score"] == pytest.approx(one["score"], abs=2e-3)
        if one["label"] != batched["label"]:
            # Only a score within that rounding of the image threshold may land on either side
            # (seen with one thread per process: a level 2 in batches, 0 alone).
            assert one["score"] == pytest.approx(threshold, abs=2e-3), (one, threshold)
            continue
        decided_alike += 1
        assert one["level"] == batched["level"]
        assert [r["bbox"] for r in batched["regions"]] == [r["bbox"] for r in one["regions"]]
    assert decided_alike >= len(results[1]) - 1


def test_the_throughput_measurement_reports_each_figure_per_batch_size(tiny_run, panels):
    from data.images import read_image
    from prediction.throughput import measure_throughput

    hybrid = Hybrid.load(tiny_run["hybrid"])
    figures = measure_throughput(hybrid, [read_image(p) for p in panels[:3]], (1, 2))
    shared = len(hybrid.member_set.extractors) > 0
    expected = {"member_pass", "hybrid"} | ({"backbone_ceiling"} if shared else set())
    assert set(figures) == {f"{name}_batch{b}" for name in expected for b in (1, 2)}
    assert all(rate > 0 for rate in figures.values())

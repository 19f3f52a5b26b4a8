"""The offline guarantee: the default benchmark (all eight members, made tiny) and a predict run
pass with the network blocked for the whole process tree, and nothing even tried to connect."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_module
from tests.robustness.support import OFFLINE_DIR, assert_clean, tiny

TRAINED = ("stfpm", "fastflow", "efficientad", "draem", "autoencoder", "vae")
FAST = (
    "members.efficientad.input_size=64",
    *(f"members.{m}.trainer.max_epochs=1" for m in TRAINED),
)


def offline(tmp_path, module: str, *args: str):
    log = tmp_path / "network.log"
    result = run_module(
        module, *args, env={"OLED_AD_NETWORK_LOG": str(log)}, pythonpath=(OFFLINE_DIR,)
    )
    attempts = log.read_text() if log.exists() else ""
    return result, attempts


def test_the_blocker_blocks(tmp_path):
    # The check below can fail: a connection attempt under the blocker fails and is logged.
    code = "import socket; socket.create_connection(('pypi.org', 443), timeout=1)"
    import subprocess

    log = tmp_path / "network.log"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(OFFLINE_DIR), "OLED_AD_NETWORK_LOG": str(log)},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "blocked by the offline test" in result.stderr
    assert "pypi.org" in log.read_text()


@pytest.mark.slow  # eight jobs: about a minute on one core
def test_the_default_benchmark_runs_offline(tmp_path):
    # No --members: every member of the default grid, on tiny panels.
    result, attempts = offline(
        tmp_path, "pipelines.benchmark", *tiny(tmp_path, *FAST), "--run-name", "run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean(result.stderr)
    assert attempts == ""
    jobs = json.loads((tmp_path / "run" / "results.json").read_text())["jobs"]
    assert len(jobs) == 8 and all(j["status"] == "ok" for j in jobs), jobs


def test_predict_runs_offline(tiny_run, tmp_path):
    images = sorted(p for p in (tiny_run["root"] / "cache").rglob("*.png") if "test" in p.parts)
    out = tmp_path / "out"
    result, attempts = offline(
        tmp_path,
        "pipelines.predict",
        "--hybrid",
        str(tiny_run["hybrid"]),
        "--out",
        str(out),
        *map(str, images[:3]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean(result.stderr)
    assert attempts == ""
    report = json.loads((out / "predictions.json").read_text())
    assert [p["status"] for p in report["images"]] == ["ok"] * 3

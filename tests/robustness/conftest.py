"""Fixtures of the robustness suite: one tiny benchmark run and its hybrid, shared by the tests
that need a fitted model (predict, tampering, disk full)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.robustness.support import sets, tiny


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A benchmark run of PatchCore and PaDiM on 64 px panels and the hybrid built from it."""
    from pipelines import benchmark, ensemble

    root = tmp_path_factory.mktemp("tiny-run")
    args = [*tiny(root), "--members", "patchcore,padim", "--run-name", "bench"]
    assert benchmark.main(args) == 0
    run = root / "bench"
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
    return {"root": root, "run": run, "hybrid": run / "hybrid" / "hybrid"}

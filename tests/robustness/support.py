"""What the robustness tests share: tiny run settings and calling an entry point the way a user
does (exit status, stdout, stderr), with the check that no traceback reaches the user."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

OFFLINE_DIR = Path(__file__).resolve().parent / "offline"  # holds the socket-blocking sitecustomize


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def tiny(root: Path, *extra: str, size: int = 64) -> list[str]:
    """Benchmark settings for a run of a few seconds per member: tiny synthetic panels, 1 epoch."""
    return sets(
        f"output_dir={root}",
        f"synthetic.cache_dir={root / 'cache'}",
        "synthetic.n_train=10",
        "synthetic.n_test=6",
        f"synthetic.size={size}",
        f"data.image_size={size}",
        "data.batch_size=4",
        "benchmark.n_examples=1",
        "trainer.progress=false",
        *extra,
    )


def assert_clean(stderr: str) -> None:
    """What the user sees holds no Python traceback."""
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]


def call(
    main: Callable[[list[str] | None], int], argv: list[str], capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """Run an entry point in this process; (exit status, stdout, stderr), stderr traceback-free."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert_clean(err)
    return code, out, err

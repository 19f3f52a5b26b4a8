"""What every run shares, entry point or job process: its log (to stderr and a file; under DDP,
the file is rank 0's) and its errors told in one line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Packages whose exceptions read as plain messages: their type names add nothing for the user.
OWN_ERRORS = {
    "configs",
    "data",
    "deploy",
    "experiments",
    "graphs",
    "members",
    "pipelines",
    "prediction",
    "retraining",
    "tiling",
}


def describe_error(exc: BaseException) -> str:
    """``Type: message`` with the type left out for the project's own error kinds."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    text = str(exc) if str(exc) else type(exc).__name__
    if type(exc).__module__.split(".")[0] in OWN_ERRORS:
        return text
    return f"{type(exc).__name__}: {text}"


def setup_logging(log_file: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Log to stderr (INFO, or DEBUG with ``verbose``) and, if given, to ``log_file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)
    for noisy in ("lightning_fabric", "lightning.fabric", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_rank_logging(log_file: str | os.PathLike) -> bool:
    """Logging for a command that may run as one of several DDP ranks: rank 0 (or a process on
    its own) as ``setup_logging(log_file)``; another rank logs warnings to stderr only and
    leaves the file to rank 0. Returns whether this process is rank 0."""
    from members.trainer import launched_as_rank_zero

    zero = launched_as_rank_zero()
    setup_logging(log_file if zero else None)
    if not zero:
        logging.getLogger().setLevel(logging.WARNING)
    return zero

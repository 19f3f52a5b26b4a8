"""What every entry point shares: clean failure reporting and logging."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from configs import Flag

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


# The exit status of a run that did part of its work: some inputs skipped, some jobs failed.
PARTIAL_FAILURE = 3


class PipelineError(RuntimeError):
    """A failure to report to the user in one line, without a traceback."""


def main_guard(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap an entry point so errors reach the user as one clear line and an exit status:
    2 for bad configuration or arguments, 1 for any other failure, 130 when interrupted (and
    ``PARTIAL_FAILURE``, 3, returned by the entry point itself when part of the work failed).
    Set ``OLED_AD_DEBUG=1`` to see the traceback."""

    def guarded(argv: list[str] | None = None) -> int:
        from configs import ConfigError

        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if os.environ.get("OLED_AD_DEBUG"):
                raise
            status = 2 if isinstance(exc, ConfigError) else 1
            print(f"error: {describe_error(exc)}", file=sys.stderr)
            return status

    return guarded


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


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the members run (``device.accelerator``); fusion and grading stay on
    the CPU."""
    parser.add_argument(
        "--device",
        help="cpu | cuda | gpu | mps | auto (device.accelerator; absent: the CPU, with a warning)",
    )


def device_flags(args: argparse.Namespace) -> list[Flag]:
    return [Flag("device.accelerator", args.device, "--device")] if args.device else []


@contextlib.contextmanager
def ray_session(ray_cfg: Mapping[str, Any]) -> Iterator[None]:
    """Connected to Ray for the run: the cluster at ``ray.address``, or (null or ``local``) a
    local instance of ``ray.num_cpus`` CPUs started for the run and stopped after it. A
    connection made before (``ray.init`` in the calling program) is used as it is."""
    try:
        import ray
    except ImportError:
        raise PipelineError(
            'the ray executor needs Ray: pip install -e ".[cluster]" (or ray>=2.9)'
        ) from None
    if ray.is_initialized():
        yield
        return
    address = ray_cfg["address"]
    if address in (None, "local"):
        ray.init(address="local", num_cpus=ray_cfg["num_cpus"], include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            raise PipelineError(f"ray.address {address!r}: no Ray cluster there ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()

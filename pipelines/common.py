"""What every entry point shares: clean failure reporting and logging."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from configs import Flag
from experiments.logs import describe_error

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

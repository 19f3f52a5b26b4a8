"""python -m pipelines.retrain — the scheduled retraining job (see ``retraining.run``).

    python -m pipelines.retrain --config configs/retrain.yaml
    python -m pipelines.retrain --config my.yaml --every 24h   # loop mode, without cron

Safe to start from cron or a systemd timer: a second run while one is working stops with a
clear message; a run killed at any point leaves the champion (``<workspace>/current``) intact.
With ``device.strategy=ddp`` and several devices, Fabric starts the other ranks (or start them
with ``torchrun``); they train with rank 0, which alone takes the lock and writes.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from artifacts.io import use_key_file
from artifacts.lock import LockHeld
from configs import add_config_arguments, load_config
from experiments.logs import describe_error, setup_rank_logging
from pipelines.common import PipelineError, main_guard

log = logging.getLogger("pipelines.retrain")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``24h``, ``7d`` (or a plain number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise PipelineError(
            f"--every: expected a positive interval like 30m, 24h or 7d, got {text!r}"
        )
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--every", help="run again after this interval (e.g. 24h), forever")
    return parser.parse_args(argv)


def report(entry: dict) -> str:
    if entry["action"] == "none":
        return f"no new data ({entry['reason']}); the champion stays"
    metric = next(k for k in entry["challenger"] if k not in ("hybrid", "metrics"))
    line = f"{entry['action']}: challenger {entry['challenger']['hybrid']} {metric}="
    line += f"{entry['challenger'][metric]:.4f}"
    if "champion" in entry:
        line += f", champion {entry['champion']['hybrid']} {metric}={entry['champion'][metric]:.4f}"
    line = f"{line} ({entry['reason']})"
    supervised = entry.get("supervised") or {}
    if "skipped" in supervised:
        line += f"\nsupervised member skipped: {supervised['skipped']}"
    elif supervised:
        line += (
            f"\nsupervised member trained on {supervised['labeled_defects']} labeled defects "
            f"({supervised['with_masks']} with masks); members kept: "
            f"{', '.join(supervised['kept_members'])}"
        )
    return line


@main_guard
def main(argv: list[str] | None = None) -> int:
    from retraining.run import run_once

    args = parse_args(argv)
    cfg = load_config("retrain", args.config, args.overrides)
    use_key_file(cfg["artifacts"]["key_file"])
    interval = parse_interval(args.every) if args.every else None
    workspace = Path(cfg["retrain"]["workspace"])
    workspace.mkdir(parents=True, exist_ok=True)
    setup_rank_logging(workspace / "log.txt")
    while True:
        try:
            entry = run_once(cfg)
            if entry is not None:
                print(report(entry), flush=True)
        except LockHeld as exc:
            if interval is None:
                raise PipelineError(str(exc)) from exc
            log.warning("%s; trying again at the next interval", exc)
        except Exception as exc:
            if interval is None:
                raise
            # Loop mode keeps going: the next interval may have the data or the disk back.
            log.error("this run failed: %s", describe_error(exc))
        if interval is None:
            return 0
        log.info("next run in %s", args.every)
        time.sleep(interval)


if __name__ == "__main__":
    raise SystemExit(main())

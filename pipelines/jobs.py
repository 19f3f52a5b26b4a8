"""python -m pipelines.jobs JOB_DIR — run one benchmark job in this process.

``experiments.runner.run_jobs`` starts it in a fresh process for every job of a run (see
``experiments.job``); on failure it records the error in ``JOB_DIR/results.json`` and exits 1.
Under DDP the other ranks run it too; they log warnings to stderr only and leave the job's
folder to rank 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from artifacts.io import atomic_write_json
from experiments.job import run_job
from experiments.job_folder import RESULTS_FILE
from pipelines.common import describe_error, setup_rank_logging

log = logging.getLogger("pipelines.jobs")


def main(argv: list[str] | None = None) -> int:
    """Run one job in this process; on failure record it in ``results.json`` and return 1."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs", description=__doc__)
    parser.add_argument("job_dir", type=Path)
    args = parser.parse_args(argv)
    writer = setup_rank_logging(args.job_dir / "log.txt")
    try:
        run_job(args.job_dir)
    except Exception as exc:
        log.error("job failed:\n%s", traceback.format_exc())
        if writer:
            atomic_write_json(
                args.job_dir / RESULTS_FILE,
                {"status": "failed", "job_id": args.job_dir.name, "error": describe_error(exc)},
            )
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

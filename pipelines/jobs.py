"""python -m pipelines.jobs JOB_DIR — run one benchmark job in this process.

``experiments.runner.run_jobs`` starts ``experiments.job.run_job_process`` in a fresh process for
every job of a run (see ``experiments.job``); on failure it records the error in
``JOB_DIR/results.json`` and exits 1. Under DDP the other ranks run it too; they log warnings to
stderr only and leave the job's folder to rank 0. This command runs the same, from a shell.
"""

from __future__ import annotations

import argparse
import sys

from experiments.job import run_job_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs", description=__doc__)
    parser.add_argument("job_dir")
    return run_job_process(parser.parse_args(argv).job_dir)


if __name__ == "__main__":
    sys.exit(main())

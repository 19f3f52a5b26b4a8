"""python -m pipelines.benchmark — train and evaluate members on a grid and rank them.

With no arguments it runs every member on the embedded default (synthetic OLED panels,
efficientnet_lite0 backbone) at small sizes on the CPU. Any MVTec-layout folder can be
benchmarked without editing files:

    python -m pipelines.benchmark --data-dir /data/mvtec --categories bottle,screw \\
        --members patchcore,padim --set data.image_size=224

Re-running the same command resumes: finished jobs are skipped, interrupted or failed ones are
run again. ``--set benchmark.executor=ray`` runs the jobs as tasks on a Ray cluster (the ``ray``
section). The run folder holds config.yaml, jobs/<job>/ (config, weights, log, history.csv,
results.json), leaderboard.csv, results.json and report.html.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from artifacts.io import atomic_write_json, use_key_file
from configs import Flag, add_config_arguments, load_config, split_names, write_config
from experiments.grid import config_hash, plan_jobs
from experiments.job_folder import read_scores
from experiments.logs import setup_logging
from experiments.ranking import format_table, leaderboard, write_leaderboard_csv
from experiments.runner import run_jobs
from pipelines.common import PARTIAL_FAILURE, PipelineError, main_guard, ray_session
from reporting.benchmark_report import write_html_report

log = logging.getLogger("pipelines.benchmark")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--data-dir", help="an MVTec-layout folder (sets data.dataset=mvtec)")
    parser.add_argument("--dataset", help="reader for --data-dir: mvtec (default), btad or visa")
    parser.add_argument("--categories", help="comma-separated categories (default: all found)")
    parser.add_argument("--members", help="comma-separated members (default: all)")
    parser.add_argument("--run-name", help="run folder name under output_dir")
    parser.add_argument(
        "--init-from", help="start members from a run's weights: RUN/jobs/JOB/weights"
    )
    parser.add_argument("--list", action="store_true", help="print the planned jobs and exit")
    return parser.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[Flag]:
    """The shorthand flags as overrides (applied after --set, so they win); names stay text."""
    flags = []
    if args.data_dir:
        flags += [
            Flag("data.data_dir", args.data_dir, "--data-dir"),
            Flag("data.dataset", args.dataset or "mvtec", "--dataset"),
        ]
        if not args.categories:
            flags.append(Flag("data.categories", [], "--data-dir"))
    elif args.dataset:
        flags.append(Flag("data.dataset", args.dataset, "--dataset"))
    if args.categories:
        flags.append(Flag("data.categories", split_names(args.categories), "--categories"))
    if args.members:
        flags.append(Flag("benchmark.members", split_names(args.members), "--members"))
    if args.run_name:
        flags.append(Flag("benchmark.run_name", args.run_name, "--run-name"))
    if args.init_from:
        flags.append(Flag("benchmark.init_from", args.init_from, "--init-from"))
    return flags


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config("benchmark", args.config, [*args.overrides, *overrides_from_flags(args)])
    use_key_file(cfg["artifacts"]["key_file"])
    setup_logging()
    jobs = plan_jobs(cfg)
    if args.list:
        for job in jobs:
            print(job.job_id)
        return 0
    run_dir = Path(cfg["output_dir"]) / (
        cfg["benchmark"]["run_name"] or f"benchmark-{config_hash(cfg)}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "log.txt")
    write_config(cfg, run_dir / "config.yaml")
    log.info("run folder: %s (%d jobs)", run_dir, len(jobs))
    timeout_s = cfg["benchmark"]["job_timeout_s"]
    if cfg["benchmark"]["executor"] == "ray":
        from experiments.ray_runner import run_jobs_on_ray

        with ray_session(cfg["ray"]):
            results = run_jobs_on_ray(jobs, run_dir, cfg["ray"], timeout_s)
    else:
        results = run_jobs(jobs, run_dir, timeout_s)
    board = leaderboard(results)
    write_leaderboard_csv(board, run_dir / "leaderboard.csv")
    atomic_write_json(run_dir / "results.json", {"jobs": results, "overall": board["overall"]})
    scores = {r["job_id"]: read_scores(run_dir / "jobs" / r["job_id"]) for r in results}
    report = write_html_report(
        board,
        results,
        run_dir,
        "Benchmark report",
        scores,
        {
            "run": run_dir.name,
            "jobs": len(jobs),
            "failed": sum(r["status"] != "ok" for r in results),
        },
    )
    print(format_table(board))
    print(f"\nleaderboard: {run_dir / 'leaderboard.csv'}\nreport: {report}")
    failed = [r for r in results if r.get("status") != "ok"]
    if len(failed) == len(results):
        raise PipelineError(f"every job failed; first error: {failed[0].get('error')}")
    for job in failed:
        print(f"failed {job['job_id']}: {job.get('error')}")
    return PARTIAL_FAILURE if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m pipelines.tiling_benchmark — how tiled inference scales to high-resolution panels.

Fits a member (PatchCore by default) on random tiles of defect-free synthetic panels, then runs
it tile by tile over defective synthetic panels of each configured size (up to 9344 x 7000),
each in a fresh process reading the panel as a memory map, and reports seconds per megapixel,
peak resident memory against ``estimate_memory``'s prediction, and pixel AUROC. It also merges
random maps back from their tiles for every reduction and reports the largest error.

    python -m pipelines.tiling_benchmark
    python -m pipelines.tiling_benchmark --set tiling.stride=256 \\
        --set "tiling_benchmark.sizes=[[2048, 2048]]"

Writes <output_dir>/<run_name>/{results.json, speed_memory.csv, merge_errors.csv, member/}.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from artifacts.io import atomic_write_csv, atomic_write_json, csv_text, use_key_file
from configs import add_config_arguments, load_config, write_config
from experiments.logs import setup_logging
from experiments.process import call_in_fresh_process
from experiments.tiling_measurements import (
    fit_member_on_tiles,
    measure_panel,
    merge_errors,
    write_panel,
)
from pipelines.common import main_guard
from tiling import infer_tiled_options

log = logging.getLogger("pipelines.tiling_benchmark")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tiling_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config("tiling_benchmark", args.config, args.overrides)
    use_key_file(cfg["artifacts"]["key_file"])
    bench, tiling = cfg["tiling_benchmark"], cfg["tiling"]
    run_dir = Path(cfg["output_dir"]).resolve() / bench["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "log.txt")
    write_config(cfg, run_dir / "config.yaml")

    log.info("merging random maps back from their tiles")
    merges = merge_errors(
        [tuple(s) for s in bench["merge_sizes"]], tiling["tile_size"], bench["merge_strides"]
    )
    atomic_write_csv(run_dir / "merge_errors.csv", merges)

    log.info("fitting %s on %d-px tiles", bench["member"], tiling["tile_size"])
    member_dir = fit_member_on_tiles(cfg, run_dir / "member")
    options = infer_tiled_options(tiling)
    rows = []
    for height, width in bench["sizes"]:
        panel_dir = run_dir / "panels" / f"{height}x{width}"
        truth = call_in_fresh_process(write_panel, panel_dir, height, width, seed=cfg["seed"])
        row = call_in_fresh_process(measure_panel, member_dir, panel_dir, **options)
        rows.append({**row, **truth})
        log.info("%dx%d: %s", height, width, row)
        shutil.rmtree(panel_dir)  # hundreds of MB per panel
    (run_dir / "panels").rmdir()
    atomic_write_csv(run_dir / "speed_memory.csv", rows)
    summary = {
        "member": bench["member"],
        "tiling": options,
        "panels": rows,
        "merge_max_abs_error": max(r["max_abs_error"] for r in merges),
        "merge_errors": merges,
    }
    atomic_write_json(run_dir / "results.json", summary)
    print(csv_text([{k: r[k] for k in list(r)[:12]} for r in rows]))
    print(f"largest merge error over {len(merges)} cases: {summary['merge_max_abs_error']:.2e}")
    print(f"results: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

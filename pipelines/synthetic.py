"""python -m pipelines.synthetic — the embedded default's synthetic OLED panels as files.

    python -m pipelines.synthetic --out DIR [--seed K] [--set synthetic.gain_pct=0 ...]

Writes ``DIR/<category>/`` in the MVTec layout (``train/good``, ``test/<type>``,
``ground_truth``) with ``truth.jsonl`` (every test defect's type, level, area, contrast and SEMU)
and ``meta.json`` (the generator's parameters): the panels a benchmark generates from the same
configuration and seed, the ``synthetic`` section (counts, size, level mix, panel gain and
variation, background mura) and ``data.pixel_pitch_mm``, changed with ``--set`` or ``--config``
like any pipeline's. Exit status: 0 written, 1 a failure, 2 bad configuration.
"""

from __future__ import annotations

import argparse

from configs import Flag, add_config_arguments, load_config
from pipelines.common import main_guard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.synthetic", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (the category goes inside)")
    parser.add_argument("--seed", type=int, help="the generator's seed (seed)")
    parser.add_argument("--category", default="panel", help="the category folder's name")
    parser.add_argument("--rgb", action="store_true", help="8-bit RGB instead of 16-bit gray")
    parser.add_argument(
        "--subpixel-grid", action="store_true", help="an RGB stripe subpixel structure"
    )
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> int:
    from data.sources import synthetic_parameters
    from data.synthetic import write_dataset

    args = parse_args(argv)
    flags = [Flag("seed", args.seed, "--seed")] if args.seed is not None else []
    cfg = load_config(None, args.config, [*args.overrides, *flags])
    folder = write_dataset(
        args.out,
        **synthetic_parameters(cfg["data"], cfg["synthetic"]),
        seed=cfg["seed"],
        category=args.category,
        rgb=args.rgb,
        subpixel_grid=args.subpixel_grid,
    )
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

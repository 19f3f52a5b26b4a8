"""python -m pipelines.export — a hybrid's members as graphs beside it, for a plant's runtime.

    python -m pipelines.export --hybrid reports/RUN/hybrid-rank-top3/hybrid --format onnx

Writes ``<hybrid>/export/<format>/``: one graph per shared backbone and one per member (ONNX, or
OpenVINO IR with ``--format openvino`` where the openvino package is installed), fixed to the
members' input size with a free batch axis, ``export.json`` (graphs, inputs and outputs, input
size, opset, library versions, the hybrid's identity, the parity with PyTorch measured on a
probe batch) and a SHA-256 manifest. ``python -m pipelines.predict --runtime onnx`` runs them.
A hybrid whose members cannot all be exported is refused with the reason, and nothing is
written. Exit status: 0 exported, 1 a failure, 2 bad configuration.
"""

from __future__ import annotations

import argparse

from artifacts.io import use_key_file
from configs import Flag, add_config_arguments, load_config
from pipelines.common import PipelineError, main_guard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--hybrid", help="the hybrid folder")
    parser.add_argument("--format", help="onnx | openvino (export.format)")
    return parser.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[Flag]:
    flags = [Flag("export.hybrid", args.hybrid, "--hybrid")] if args.hybrid else []
    return flags + ([Flag("export.format", args.format, "--format")] if args.format else [])


@main_guard
def main(argv: list[str] | None = None) -> int:
    from deploy.export import export_hybrid

    args = parse_args(argv)
    cfg = load_config("export", args.config, [*args.overrides, *overrides_from_flags(args)])
    use_key_file(cfg["artifacts"]["key_file"])
    opts = cfg["export"]
    if not opts["hybrid"]:
        raise PipelineError("no hybrid given: pass --hybrid DIR (or export.hybrid)")
    folder, description = export_hybrid(opts["hybrid"], opts["format"], opts["opset"])
    height, width = description["input_size"]
    print(
        f"exported {', '.join(description['members'])} ({description['format']}, opset "
        f"{description['opset']}, input [batch, 3, {height}, {width}]) to {folder}:"
    )
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        print(f"  {path.name}  {path.stat().st_size / 1e6:.1f} MB")
    print(
        "largest difference from PyTorch on a probe batch (relative to the map's spread, the "
        f"score's magnitude; tolerance {description['tolerance']:.0e}):"
    )
    for name, parity in description["parity"].items():
        print(f"  {name}: map {parity['map']:.1e}, score {parity['score']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

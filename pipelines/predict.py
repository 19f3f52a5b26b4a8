"""python -m pipelines.predict — apply a hybrid to images or folders of any size.

    python -m pipelines.predict --hybrid reports/RUN/hybrid-rank-top3/hybrid panels/ one.png

Writes, in ``--out``: ``predictions.jsonl`` (one line per image, appended as soon as the image is
done), and rebuilt from it at the end: ``predictions.json`` (per image: score, label, level, its
regions with type, level, bbox, area, contrast, SEMU, score, and the panel's uniformity figures
from ``metrics.quality.panel_quality``), ``predictions.csv`` (one row per image),
``regions.csv`` (one row per region), ``report.html`` (counts, levels, quality distributions, a
gallery of the flagged panels by level); ``overlays/`` (heatmap overlay PNGs at the original
resolution) and ``skipped`` entries for files that could not be read: a bad file is reported and
skipped, the others are still processed.

Re-running the same command with the same ``--out`` resumes: images done before (same path and
SHA-256, same hybrid) are skipped. Ctrl-C finishes the current image and stops (a second Ctrl-C
stops at once); everything done is kept. ``--executor ray`` shards the images over Ray actors
that each hold the hybrid (the ``ray`` section); a run resumes under either executor. Exit
status: 0 every image predicted, 3 some skipped, 1 none predicted or a failure, 2 bad
configuration, 130 interrupted.

``--runtime onnx`` (or ``openvino``) runs the members' exported graphs (``python -m
pipelines.export [--format openvino]``) under ONNX Runtime (OpenVINO Runtime) on the CPU; fusion
and grading are unchanged.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from artifacts.io import use_key_file
from configs import Flag, add_config_arguments, load_config
from experiments.logs import setup_logging
from pipelines.common import (
    PARTIAL_FAILURE,
    PipelineError,
    add_device_argument,
    device_flags,
    main_guard,
    ray_session,
)

log = logging.getLogger("pipelines.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.predict", description=__doc__)
    add_config_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--hybrid", help="the hybrid folder")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--executor", help="local (this process) or ray (predict.executor)")
    parser.add_argument(
        "--runtime",
        help="torch | onnx | openvino: the members' exported graphs under ONNX Runtime or "
        "OpenVINO Runtime (predict.runtime)",
    )
    parser.add_argument("paths", nargs="+", help="image files and folders")
    return parser.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[Flag]:
    """--hybrid and --out as overrides (applied after --set, so they win); paths stay text."""
    flags = [Flag("predict.hybrid", args.hybrid, "--hybrid")] if args.hybrid else []
    flags += [Flag("predict.out", args.out, "--out")] if args.out else []
    flags += [Flag("predict.executor", args.executor, "--executor")] if args.executor else []
    flags += [Flag("predict.runtime", args.runtime, "--runtime")] if args.runtime else []
    return flags + device_flags(args)


@main_guard
def main(argv: list[str] | None = None) -> int:
    from artifacts.lock import LockHeld, RunLock
    from fusion.hybrid import Hybrid
    from members.device import resolve_device
    from prediction.inputs import expand_inputs
    from prediction.results import (
        STREAM_NAME,
        ResultStream,
        finished,
        latest_per_image,
        merge_shards,
        read_stream,
        write_reports,
    )
    from prediction.run import StopRequest, predict_files, predict_options

    args = parse_args(argv)
    cfg = load_config("predict", args.config, [*args.overrides, *overrides_from_flags(args)])
    use_key_file(cfg["artifacts"]["key_file"])
    opts = cfg["predict"]
    if not opts["hybrid"]:
        raise PipelineError("no hybrid given: pass --hybrid DIR (or predict.hybrid)")
    out = Path(opts["out"] or f"predictions-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "log.txt")
    try:
        lock = RunLock(out / ".lock").acquire()
    except LockHeld as exc:
        raise PipelineError(f"{exc}: wait for it, or choose another --out") from None
    try:
        accelerator = cfg["device"]["accelerator"]
        if opts["runtime"] == "torch":
            device = resolve_device(accelerator)
        else:
            device = "cpu"
            if accelerator != "cpu":
                log.warning(
                    "predict.runtime %s runs the members' graphs on the CPU; "
                    "device.accelerator %s is not used",
                    opts["runtime"],
                    accelerator,
                )
        hybrid = Hybrid.load(opts["hybrid"], device, opts["runtime"])
        merge_shards(out)  # what a killed Ray run's actors streamed, whichever executor resumes
        done = finished(read_stream(out / STREAM_NAME), hybrid.model_id_)
        log.info("intensity window: %s", hybrid.intensity_window.describe())
        files, missing = expand_inputs(args.paths)
        interrupted = False
        with ResultStream(out / STREAM_NAME) as stream, StopRequest() as stop:
            try:
                if opts["executor"] == "ray":
                    from prediction.ray_executor import predict_on_ray

                    with ray_session(cfg["ray"]):
                        counts = predict_on_ray(
                            opts["hybrid"],
                            files,
                            missing,
                            out,
                            stream,
                            hybrid_ref=hybrid.model_id_,
                            done=done,
                            accelerator=cfg["device"]["accelerator"],
                            options=opts,
                            ray_cfg=cfg["ray"],
                            stop=stop,
                        )
                else:
                    counts = predict_files(
                        hybrid,
                        files,
                        missing,
                        out,
                        stream,
                        done=done,
                        stop=stop,
                        **predict_options(opts),
                    )
            except KeyboardInterrupt:  # the second Ctrl-C: the current image is dropped
                counts, interrupted = None, True
            interrupted = interrupted or stop.requested
        entries = latest_per_image(read_stream(out / STREAM_NAME))
        write_reports(out, str(opts["hybrid"]), entries)
    finally:
        lock.release()
    if interrupted:
        print(
            f"stopped; every finished image is kept in {out / STREAM_NAME}. "
            "Run the same command again to resume."
        )
        return 130
    if counts.already_done:
        print(f"{counts.already_done} image(s) already done in {out} (same file, same hybrid)")
    print(
        f"{counts.predicted} image(s) predicted, {counts.skipped} skipped; "
        f"{counts.defective} defective\nresults: {out / 'predictions.json'}\n"
        f"report: {out / 'report.html'}"
    )
    for path, reason in counts.skipped_paths:
        print(f"skipped {path}: {reason}")
    shrunk = [e for e in entries if e.get("warning")]
    if shrunk:
        print(f"warning: {len(shrunk)} image(s), e.g. {shrunk[0]['path']}: {shrunk[0]['warning']}")
    if not any(e["status"] == "ok" for e in entries):
        raise PipelineError("no image could be predicted")
    return PARTIAL_FAILURE if counts.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())

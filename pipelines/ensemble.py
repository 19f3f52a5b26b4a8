"""python -m pipelines.ensemble — build the hybrid from a benchmark run's best members.

    python -m pipelines.ensemble --from reports/benchmark-XXXX --top-k 3 --combiner rank

Picks members from the run (the ``top_k`` by the leaderboard's composite, or ``--members``),
fits fusion and grading on labeled validation data (the run's held-out normal images, copies
of them with injected synthetic defects and, where the test split has labeled defects, those
too, under k-fold cross-validation so no test image is scored by a hybrid fitted on it),
evaluates the hybrid against each member on the test split, and writes ``<run>/<name>/``:
``hybrid/`` (the self-contained model with its SHA-256 manifest), ``results.json``,
``scores.csv``, ``config.yaml`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artifacts.io import atomic_write_csv, atomic_write_json
from configs import Flag, add_config_arguments, load_config, split_names, write_config
from pipelines.common import (
    PipelineError,
    add_device_argument,
    device_flags,
    main_guard,
    setup_logging,
)

log = logging.getLogger("pipelines.ensemble")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ensemble", description=__doc__)
    add_config_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--from", dest="from_run", help="the benchmark run folder")
    parser.add_argument("--top-k", type=int, help="number of best members to combine")
    parser.add_argument("--members", help="comma-separated members instead of the top k")
    parser.add_argument(
        "--combiner",
        help="image scores: auto | rank_or_member | mean | max | rank | weighted | learned",
    )
    parser.add_argument("--pixel-combiner", help="pixel maps: the same choices")
    parser.add_argument("--name", help="output folder name under the run")
    return parser.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[Flag]:
    """The shorthand flags as overrides (applied after --set, so they win); names stay text."""
    flags = []
    for attr, key, flag in (
        ("from_run", "ensemble.from_run", "--from"),
        ("top_k", "ensemble.top_k", "--top-k"),
        ("combiner", "hybrid.combiner", "--combiner"),
        ("pixel_combiner", "hybrid.pixel_combiner", "--pixel-combiner"),
    ):
        if getattr(args, attr) is not None:
            flags.append(Flag(key, getattr(args, attr), flag))
    if args.members:
        flags.append(Flag("ensemble.members", split_names(args.members), "--members"))
    if args.name:
        flags.append(Flag("ensemble.name", args.name, "--name"))
    return flags + device_flags(args)


@main_guard
def main(argv: list[str] | None = None) -> int:
    from data.sources import make_dataset
    from data.validation import injected_validation_samples
    from evaluation import evaluate_on_unseen_panels, shared_work_cost
    from evaluation.protocol import fit_and_evaluate_hybrid
    from experiments.selection import select_members
    from fusion.build import build_hybrid
    from fusion.hybrid import Hybrid
    from members.base import load_member
    from members.device import resolve_device
    from reporting.hybrid_report import difference_rows, interval_caption, write_hybrid_report

    args = parse_args(argv)
    cfg = load_config("ensemble", args.config, [*args.overrides, *overrides_from_flags(args)])
    opts = cfg["ensemble"]
    setup_logging()
    if not opts["from_run"]:
        raise PipelineError("no benchmark run given: pass --from RUN (or ensemble.from_run)")
    run_dir = Path(opts["from_run"])
    selection = select_members(
        run_dir,
        opts["dataset"],
        opts["category"],
        opts["members"],
        opts["top_k"],
        opts["criterion"],
    )
    names = [job["member"] for job in selection.jobs]
    out_dir = run_dir / (opts["name"] or f"hybrid-{cfg['hybrid']['combiner']}-top{len(names)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "log.txt")
    write_config(cfg, out_dir / "config.yaml")
    log.info("members (by validation %s): %s", opts["criterion"], ", ".join(names))

    source, category = selection.source, selection.category
    if not source.val_fraction:
        raise PipelineError(
            "the benchmark run held out no validation images (data.val_fraction = 0); "
            "fusion and grading need them"
        )
    # Images at their own size, as predict reads them: the hybrid resizes them for its members,
    # so regions are measured (and grading is fitted) in the panel's own pixels.
    val_set = make_dataset(source, category, "val", selection.seed, None)
    test_set = make_dataset(source, category, "test", selection.seed, None)
    samples = injected_validation_samples(
        (val_set[i]["image"] for i in range(len(val_set))),
        injections_per_image=opts["injections_per_image"],
        max_injected=opts["max_injected_images"],
        pixel_pitch_mm=source.pixel_pitch_mm,
        seed=cfg["seed"],
    )
    log.info(
        "validation: %d held-out normal images, %d samples with injected defects",
        len(val_set),
        len(samples) - len(val_set),
    )
    device = resolve_device(cfg["device"]["accelerator"])
    members = {name: load_member(path, device) for name, path in selection.weights(run_dir).items()}

    def make_hybrid() -> Hybrid:
        return build_hybrid(
            members,
            selection.image_size,
            selection.tiling,
            hybrid_cfg=cfg["hybrid"],
            grading_cfg=cfg["grading"],
            pixel_pitch_mm=source.pixel_pitch_mm,
            intensity=val_set.intensity.to_dict(),
            seed=cfg["seed"],
        )

    hybrid, evaluation, provenance = fit_and_evaluate_hybrid(
        make_hybrid,
        samples,
        len(val_set),
        test_set,
        opts["labeled_defects"],
        opts["folds"],
        cfg["seed"],
        opts["batch_size"],
        opts["fit_workers"],
    )
    hybrid.save(out_dir / "hybrid")
    log.info("hybrid written to %s", out_dir / "hybrid")
    unseen = evaluate_on_unseen_panels(
        hybrid,
        source.data_dir / category,
        cfg["seed"] + 1,
        opts["unseen_panels"],
        source.channels,
        progress=True,
    )

    cost_images = [test_set[i]["image"] for i in range(min(8, len(test_set)))]
    cost = shared_work_cost(hybrid, cost_images)
    cost["hybrid_ms_per_image"] = 1000 * evaluation["seconds"] / len(test_set)
    cost["members_benchmark_latency_ms_sum"] = sum(
        job["cost"]["latency_ms"] for job in selection.jobs
    )
    results = {
        "run": str(run_dir),
        "dataset": selection.dataset,
        "category": category,
        "members": names,
        "selection": [
            {
                "member": j["member"],
                "job_id": j["job_id"],
                "split": "val",
                opts["criterion"]: j["criterion_value"],
            }
            for j in selection.jobs
        ],
        "fusion": {
            k: cfg["hybrid"][k] for k in ("combiner", "pixel_combiner", "normalizer", "learner")
        },
        # Where every figure comes from: members calibrate on the `calibration` half of the
        # held-out share, are chosen and fused on the `val` half, and are scored on test.
        "splits": {
            "member_calibration": "calibration",
            "selection": "val",
            "fusion_and_grading_fit": provenance["fitted_on"],
            "metrics": provenance["scored_on"],
            "grading": provenance["scored_on"],
        },
        "validation": hybrid.validation_,
        "grader": hybrid.grader_report_,
        "metrics": evaluation["metrics"],
        "intervals": evaluation["intervals"]
        and {**evaluation["intervals"], "split": provenance["scored_on"]},
        "grading": evaluation["grading"],
        # The image threshold's rule (fitted on the fusion data) and what it did on test.
        "operating_point": {
            "operating_point": cfg["grading"]["operating_point"],
            "false_alarm_rate_budget": cfg["grading"]["false_alarm_rate"],
            **evaluation["operating_point"],
            "split": provenance["scored_on"],
        },
        "cost": cost,
        "cross_validation": evaluation.get("cross_validation"),
        "unseen_panels": unseen,
        "notes": [provenance["note"]],
    }
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_csv(out_dir / "scores.csv", evaluation["records"])
    report = write_hybrid_report(results, evaluation["records"], out_dir / "report.html")
    print(f"\n{'detector':<16}{'image AUROC':>13}{'pixel AUROC':>13}{'AUPRO':>9}")
    for name, values in evaluation["metrics"].items():
        print(
            f"{name:<16}{values.get('image_auroc', float('nan')):>13.4f}"
            f"{values.get('pixel_auroc', float('nan')):>13.4f}"
            f"{values.get('aupro', float('nan')):>9.4f}"
        )
    if evaluation["intervals"]:
        print(f"\nhybrid minus each member, {interval_caption(evaluation['intervals'])}:")
        for name, row in difference_rows(evaluation["intervals"]).items():
            for metric, text in row.items():
                print(f"  {name:<14}{metric:<13}{text}")
    grading = evaluation["grading"]["stage_on_true_regions"]
    print(
        f"grading on true regions: level accuracy {grading['level_accuracy']:.3f}, "
        f"within one {grading['level_within_one']:.3f}, type macro-F1 "
        f"{grading['type_macro_f1']:.3f} ({grading['n']} defects)"
    )
    point = results["operating_point"]
    print(
        f"operating point ({point['operating_point']}): {point['false_alarm_rate']:.1%} of "
        f"{point['normal_images']} defect-free test images flagged, {point['miss_rate']:.1%} "
        f"of {point['defective_images']} defective ones missed"
    )
    if unseen is not None:
        figures = unseen["grading"]
        print(
            f"unseen panels ({unseen['split']}): image AUROC "
            f"{unseen['metrics'].get('image_auroc', float('nan')):.3f}, graded defects found "
            f"{figures['detection_recall_level_2_and_above']:.3f}, level accuracy "
            f"{figures['end_to_end']['level_accuracy']:.3f} (within one "
            f"{figures['end_to_end']['level_within_one']:.3f}), type macro-F1 "
            f"{figures['end_to_end']['type_macro_f1']:.3f}"
        )
    print(f"\nhybrid: {out_dir / 'hybrid'}\nreport: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m pipelines.ensemble — build the hybrid from a benchmark run's best members.

    python -m pipelines.ensemble --from reports/benchmark-XXXX --top-k 3 --combiner rank

Picks members from the run (the ``top_k`` by the leaderboard's composite, or ``--members``),
fits fusion and grading on labeled validation data (the run's held-out normal images, copies
of them with injected synthetic defects and, where the test split has labeled defects, those
too, under k-fold cross-validation so no test image is scored by a hybrid fitted on it),
evaluates the hybrid against each member on the test split, and writes ``<run>/<name>/``:
``hybrid/`` (the self-contained model with its SHA-256 manifest), ``results.json``,
``scores.csv`` (with each test image's panel quality), ``config.yaml``, ``report.html`` and
``review/`` (the overlays of the worst misses and the false alarms the report shows).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.io import atomic_write_csv, atomic_write_json, use_key_file
from configs import Flag, add_config_arguments, load_config, split_names, write_config
from experiments.logs import setup_logging
from pipelines.common import PipelineError, add_device_argument, device_flags, main_guard

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


def supervised_folds(cfg: Mapping[str, Any], members: Mapping[str, Any], probe: Any, device: Any):
    """The supervised member's cross-fitting the configuration asks for, or None
    (``ensemble.supervised: never``, or a tiled hybrid, said in the log)."""
    from evaluation.supervision import build_supervised

    if cfg["ensemble"]["supervised"] == "never":
        return None
    if probe.tiling_options or probe.image_size is None:
        log.info(
            "supervised member skipped: it is trained on images resized to one input size "
            "(data.image_size), not tiled or at their native sizes"
        )
        return None
    return build_supervised(
        members,
        cfg["members"]["supervised"],
        cfg["trainer"],
        cfg["device"],
        probe.member_inputs,
        cfg["ensemble"]["supervised_injections"],
        probe.pixel_pitch_mm,
        cfg["seed"],
        device,
        workers=cfg["ensemble"]["fit_workers"],
    )


def supervised_skipped(cfg: Mapping[str, Any], provenance: Mapping[str, str]) -> str:
    """Why the supervised member took no part (results.json says so)."""
    if cfg["ensemble"]["supervised"] == "never":
        return "ensemble.supervised is never"
    if "out of fold" not in provenance["scored_on"]:
        return (
            "no labeled defects take part (it learns from them; they take part under "
            f"cross-validation: ensemble.labeled_defects={cfg['ensemble']['labeled_defects']})"
        )
    return (
        "it is trained on images resized to one input size (data.image_size), and this hybrid "
        "is tiled or takes images at their native sizes"
    )


def print_summary(results: Mapping[str, Any]) -> None:
    """The plant's figures on the console: miss rates at the false-alarm budgets, regions
    found, which members the hybrid kept and what each adds, the supervised member."""
    from metrics.detection import FALSE_ALARM_BUDGETS, miss_rate_key

    hybrid = results["metrics"].get("hybrid", {})
    budgets = [b for b in FALSE_ALARM_BUDGETS if miss_rate_key(b) in hybrid]
    if budgets:
        intervals = (results.get("intervals") or {}).get("intervals", {}).get("hybrid", {})
        parts = []
        for budget in budgets:
            key = miss_rate_key(budget)
            low_high = intervals.get(key)
            span = f" [{low_high[0]:.1%}, {low_high[1]:.1%}]" if low_high else ""
            parts.append(f"{hybrid[key]:.1%}{span} at {budget:.0%}")
        print(f"defective images missed at a false-alarm rate on test: {', '.join(parts)}")
    grading = results["grading"]
    if grading.get("defects"):
        print(
            f"true defect regions found end to end: {grading['defects_detected']} of "
            f"{grading['defects']} ({grading['regions_found_end_to_end']:.1%}); type macro-F1 "
            f"end to end {grading['end_to_end']['type_macro_f1']:.3f}, on true regions "
            f"{grading['stage_on_true_regions']['type_macro_f1']:.3f}"
        )
    print(f"members kept: {', '.join(results['kept_members'])}")
    for name, entry in results["contributions"].items():
        if name == "split":
            continue
        differences = entry["hybrid_minus_without"] or {}
        text = ", ".join(
            f"{metric} {d.get('difference', float('nan')):+.4f} [{d['interval'][0]:+.4f}, "
            f"{d['interval'][1]:+.4f}] {d['verdict']}"
            for metric, d in differences.items()
            if metric in ("image_auroc", "aupro")
        )
        print(f"  what {name} adds: {text}")
    supervised = results["supervised"]
    if "metrics" in supervised:
        mine, theirs = (supervised["metrics"][k] for k in ("supervised", "logistic_pooled"))
        lead = supervised["intervals"]["differences"]["logistic_pooled"]["image_auroc"]
        print(
            f"supervised member image AUROC {mine['image_auroc']:.4f} against a logistic "
            f"regression on the same pooled features {theirs['image_auroc']:.4f} "
            f"(lead [{lead['interval'][0]:+.4f}, {lead['interval'][1]:+.4f}] {lead['verdict']})"
        )
    else:
        print(f"supervised member skipped: {supervised['skipped']}")


@dataclasses.dataclass
class FusionData:
    """The images a hybrid is fitted and scored on: the run's source (its parts as this command
    names them) and category, the held-out normal images, the test split, and the fusion
    samples (the held-out images and copies of them with injected defects)."""

    source: Any
    category: str
    val_set: Any
    test_set: Any
    samples: list[dict[str, Any]]


@main_guard
def main(argv: list[str] | None = None) -> int:
    from evaluation.phases import PhaseClock
    from evaluation.review import REVIEW_FOLDER
    from fusion.hybrid import Hybrid
    from members.base import load_member
    from members.device import resolve_device

    started = time.perf_counter()
    args = parse_args(argv)
    clock = PhaseClock()
    cfg = load_config("ensemble", args.config, [*args.overrides, *overrides_from_flags(args)])
    use_key_file(cfg["artifacts"]["key_file"])
    setup_logging()
    selection, out_dir = choose_candidates(cfg)
    data = read_fusion_data(cfg, selection, clock)
    device = resolve_device(cfg["device"]["accelerator"])
    with clock("members loaded"):
        weights = selection.weights(Path(cfg["ensemble"]["from_run"]))
        members = {name: load_member(path, device) for name, path in weights.items()}
    hybrid, evaluation, provenance = fit_hybrid(
        cfg, selection, data, members, device, clock, out_dir / REVIEW_FOLDER
    )
    hybrid.save(out_dir / "hybrid")
    log.info("hybrid written to %s", out_dir / "hybrid")
    # What follows measures the saved hybrid: its kept members only.
    hybrid = Hybrid.load(out_dir / "hybrid", device)
    unseen, cost = measure_saved_hybrid(hybrid, cfg, selection, data, evaluation, clock)
    results = ensemble_results(cfg, selection, hybrid, evaluation, provenance, unseen, cost)
    results["wall_seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 2)}
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_csv(out_dir / "scores.csv", evaluation["records"])
    from reporting.hybrid_report import write_hybrid_report

    report = write_hybrid_report(results, evaluation["records"], out_dir / "report.html")
    print_results(results, evaluation)
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.seconds.items())
    print(f"wall time {results['wall_seconds']['total']:.0f} s: {phases}")
    print(f"\nhybrid: {out_dir / 'hybrid'}\nreport: {report}")
    return 0


def choose_candidates(cfg: Mapping[str, Any]) -> tuple[Any, Path]:
    """The candidate members' jobs (``experiments.selection.select_members``) and the output
    folder, made, with its log and configuration."""
    from experiments.selection import select_members

    opts = cfg["ensemble"]
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
    log.info("candidate members (by validation %s): %s", opts["criterion"], ", ".join(names))
    return selection, out_dir


def read_fusion_data(cfg: Mapping[str, Any], selection: Any, clock: Any) -> FusionData:
    """The run's held-out and test images, at their own size as predict reads them (the hybrid
    resizes them for its members, so regions are measured, and grading is fitted, in the
    panel's own pixels), and the fusion samples with injected defects."""
    from data.sources import make_dataset
    from data.validation import injected_validation_samples

    opts = cfg["ensemble"]
    source, category = selection.source, selection.category
    if cfg["data"]["group_pattern"]:  # the parts, as this command names them
        source = dataclasses.replace(source, group_pattern=cfg["data"]["group_pattern"])
    if not source.val_fraction:
        raise PipelineError(
            "the benchmark run held out no validation images (data.val_fraction = 0); "
            "fusion and grading need them"
        )
    with clock("validation images and injected defects"):
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
    return FusionData(source, category, val_set, test_set, samples)


def fit_hybrid(
    cfg: Mapping[str, Any],
    selection: Any,
    data: FusionData,
    members: Mapping[str, Any],
    device: Any,
    clock: Any,
    review_folder: Path,
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The hybrid fitted (under cross-validation where labeled defects take part, with the
    supervised member inside each fold), its evaluation on test and the figures' provenance
    (``evaluation.protocol.fit_and_evaluate_hybrid``); the overlays of the test images to
    review go to ``review_folder``."""
    from data.sources import make_dataset
    from evaluation.protocol import fit_and_evaluate_hybrid
    from fusion.build import build_hybrid

    opts = cfg["ensemble"]

    def make_hybrid(extra_members: Mapping[str, Any] | None = None) -> Any:
        return build_hybrid(
            {**members, **(extra_members or {})},
            selection.image_size,
            selection.tiling,
            hybrid_cfg=cfg["hybrid"],
            grading_cfg=cfg["grading"],
            pixel_pitch_mm=data.source.pixel_pitch_mm,
            intensity=data.val_set.intensity.to_dict(),
            seed=cfg["seed"],
        )

    supervised = supervised_folds(cfg, members, make_hybrid(), device)
    train_set = make_dataset(data.source, data.category, "train", selection.seed, None)
    return fit_and_evaluate_hybrid(
        make_hybrid,
        data.samples,
        len(data.val_set),
        data.test_set,
        opts["labeled_defects"],
        opts["folds"],
        cfg["seed"],
        opts["batch_size"],
        opts["fit_workers"],
        supervised=supervised,
        normal_images=lambda: (train_set[i]["image"] for i in range(len(train_set))),
        clock=clock,
        review_folder=review_folder,
    )


def measure_saved_hybrid(
    hybrid: Any,
    cfg: Mapping[str, Any],
    selection: Any,
    data: FusionData,
    evaluation: Mapping[str, Any],
    clock: Any,
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The saved hybrid on freshly generated panels (None where the data is not the
    generator's) and what its members cost together against apart."""
    from evaluation import evaluate_on_unseen_panels, shared_work_cost

    with clock("unseen panels"):
        unseen = evaluate_on_unseen_panels(
            hybrid,
            data.source.data_dir / data.category,
            cfg["seed"] + 1,
            cfg["ensemble"]["unseen_panels"],
            data.source.channels,
            progress=True,
        )
    with clock("shared-work cost"):
        test_set = data.test_set
        cost = shared_work_cost(
            hybrid, [test_set[i]["image"] for i in range(min(8, len(test_set)))]
        )
    cost["hybrid_ms_per_image"] = 1000 * evaluation["seconds"] / len(test_set)
    cost["members_benchmark_latency_ms_sum"] = sum(
        job["cost"]["latency_ms"] for job in selection.jobs
    )
    return unseen, cost


def ensemble_results(
    cfg: Mapping[str, Any],
    selection: Any,
    hybrid: Any,
    evaluation: Mapping[str, Any],
    provenance: Mapping[str, str],
    unseen: Mapping[str, Any] | None,
    cost: Mapping[str, float],
) -> dict[str, Any]:
    """``results.json`` (but its ``wall_seconds``): every figure with the split it is on."""
    opts = cfg["ensemble"]
    return {
        "run": str(Path(opts["from_run"])),
        "dataset": selection.dataset,
        "category": selection.category,
        "members": [job["member"] for job in selection.jobs],
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
        # The members the saved hybrid kept, their weights and each selection step, and
        # what each kept member adds on test (the hybrid minus the hybrid without it).
        "kept_members": hybrid.fused_names,
        "member_selection": hybrid.validation_.get("member_selection"),
        "contributions": {"split": provenance["scored_on"], **evaluation["contributions"]},
        "supervised": evaluation.get("supervised")
        or {"skipped": supervised_skipped(cfg, provenance)},
        "grading": evaluation["grading"],
        # The image threshold's rule (fitted on the fusion data) and what it did on test.
        "operating_point": {
            "operating_point": cfg["grading"]["operating_point"],
            "false_alarm_rate_budget": cfg["grading"]["false_alarm_rate"],
            **evaluation["operating_point"],
            "split": provenance["scored_on"],
        },
        "cost": cost,
        # Each test image's panel quality is in scores.csv; which members gave reconstruction
        # figures, and why LPIPS is missing where it is.
        "quality": {**evaluation["quality"], "split": provenance["scored_on"]},
        # The worst misses and the false alarms at the operating point, with their overlays.
        "review": {**evaluation["review"], "split": provenance["scored_on"]},
        "cross_validation": evaluation.get("cross_validation"),
        "unseen_panels": unseen,
        "notes": [provenance["note"]],
    }


def print_results(results: Mapping[str, Any], evaluation: Mapping[str, Any]) -> None:
    """The figures on the console: each detector, the hybrid's lead over each member, grading,
    the operating point, the plant's summary and the unseen panels."""
    from reporting.hybrid_report import difference_rows, interval_caption

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
    interval = point.get("miss_rate_interval")
    print(
        f"operating point ({point['operating_point']}): {point['false_alarm_rate']:.1%} of "
        f"{point['normal_images']} defect-free test images flagged, {point['miss_rate']:.1%} "
        f"of {point['defective_images']} defective ones missed"
        + (" [{:.1%}, {:.1%}]".format(*interval) if interval else "")
    )
    print_summary(results)
    unseen = results["unseen_panels"]
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


if __name__ == "__main__":
    raise SystemExit(main())

"""Training a challenger, and one scheduled retraining run step by step (``pipelines.retrain``
is its command line).

1. Take the workspace lock (a lock left by a dead process is cleared and reported).
2. Hash every file under the data folders; compare with the manifest of the last completed run.
   Nothing new: record that and stop.
3. Fix the holdout once (a seeded share of the first run's normal images, plus every confirmed
   defect, plus injected defects with a fixed seed); it never changes afterwards, so champion
   and challenger are always compared on the same images and nothing in it is ever trained on.
   The intensity window (``data.intensity``) is fitted once too, on the first run's training
   images (``intensity.json``), and saved with every hybrid.
4. Train the challenger's members on the other normal images (checkpoints in a work folder keyed
   by the data, so a killed run resumes), fit fusion and grading on a validation share of them
   at their own size (as ``predict`` reads images; the members get them resized), and save the
   hybrid into ``hybrids/<id>`` (atomically). Where ``retrain.labeled_dirs`` hold labeled
   defects, the supervised member learns from them too (cross-fitted, so fusion chooses
   members on answers from heads that never saw the image); without them it is skipped, and
   the history entry says why.
5. Score challenger and champion on the holdout, with the challenger's image-level lead and its
   paired bootstrap interval; promote (one atomic switch of ``current``) when there is no
   champion, or (``promote_on``) the challenger is not worse by more than ``margin``, or its
   paired verdict is "higher".
6. Write the manifest (the data is consumed) and append the run to ``history.jsonl``.

Under DDP (``device.strategy: ddp`` with several devices or nodes) the other ranks start before
step 1 and take no lock: rank 0 alone does steps 1-3, tells them what to train on (or that
nothing is trained this time), the ranks train the members together (step 4), and rank 0
alone does the rest.

Killing the process at any point leaves ``current`` on a complete champion (or absent before the
first promotion), and the next run redoes or resumes what was left. ``OLED_AD_KILL_AT=<step>``
makes the process kill itself at a named step: the crash tests use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts.io import fault_point
from artifacts.lock import RunLock
from data.datasets import ImageFiles, collate_samples
from data.images import IntensityWindow
from retraining.holdout import (
    METRICS,
    choose_holdout,
    compare_on_holdout,
    holdout_dataset,
    holdout_score,
    promotion,
)
from retraining.workspace import (
    append_history,
    current_champion,
    new_files,
    promote,
    read_manifest,
    scan_files,
    workspace_intensity,
    write_manifest,
)

log = logging.getLogger(__name__)


def _files_below(manifest: Mapping[str, str], folders: list[str]) -> list[str]:
    """The files of ``manifest`` below any of ``folders``."""
    roots = [Path(d).resolve() for d in folders]
    return sorted(p for p in manifest if any(r in Path(p).resolve().parents for r in roots))


def split_files(cfg: Mapping[str, Any], files: list[str]) -> tuple[list[Path], list[Path]]:
    """``files`` cut (seeded) into the members' training images and the validation share."""
    order = np.random.default_rng(cfg["seed"]).permutation(len(files))
    n_val = max(1, int(round(len(files) * cfg["retrain"]["val_fraction"])))
    val_files = [Path(files[i]) for i in sorted(order[:n_val])]
    train_files = [Path(files[i]) for i in sorted(order[n_val:])]
    if len(train_files) < 2:
        raise ValueError(f"too few normal images to train on: {len(train_files)}")
    return train_files, val_files


def fit_members(
    cfg: Mapping[str, Any],
    train_files: list[Path],
    work: Path,
    champion: Path | None,
    window: IntensityWindow,
) -> dict[str, Any]:
    """The challenger's members fitted on ``train_files`` (checkpoints under ``work``; warm
    started from the champion's with ``retrain.warm_start``). Under DDP every rank calls it."""
    from members.build import build_member, build_trainer, member_options, trainer_options

    opts = cfg["retrain"]
    train_set = ImageFiles(train_files, opts["image_size"], window)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg["data"]["batch_size"], shuffle=True, collate_fn=collate_samples
    )
    members = {}
    for name in opts["members"]:
        warm = champion / "members" / name if champion is not None else None
        member = build_member(
            name,
            member_options(cfg["members"], name),
            warm if opts["warm_start"] and warm is not None and warm.is_dir() else None,
        )
        trainer = build_trainer(
            cfg["device"],
            trainer_options(cfg["trainer"], cfg["members"], name),
            seed=cfg["seed"],
            out_dir=work / "members" / name,
            progress=False,
        )
        log.info("training %s on %d images", name, len(train_set))
        member.fit(loader, None, trainer)
        members[name] = member
    return members


def train_challenger(
    cfg: Mapping[str, Any],
    files: list[str],
    work: Path,
    champion: Path | None,
    window: IntensityWindow,
) -> tuple[Any, dict[str, Any]]:
    """Members fitted on ``files`` (minus a validation share), then fusion and grading (on the
    validation share at its own size, as predict sees images; and on the labeled defects of
    ``retrain.labeled_dirs``, which the supervised member learns from). Returns the hybrid and
    what became of the supervised member."""
    from data.validation import injected_validation_samples
    from fusion.build import build_hybrid

    opts = cfg["retrain"]
    train_files, val_files = split_files(cfg, files)
    members = fit_members(cfg, train_files, work, champion, window)
    fault_point("after_training")
    val_set = ImageFiles(val_files, None, window)
    samples = injected_validation_samples(
        (val_set[i]["image"] for i in range(len(val_set))),
        opts["injections_per_image"],
        pixel_pitch_mm=cfg["data"]["pixel_pitch_mm"],
        seed=cfg["seed"],
        max_injected=opts["max_injected_images"],
    )

    def make_hybrid(extra: Mapping[str, Any] | None = None):
        return build_hybrid(
            {**members, **(extra or {})},
            opts["image_size"],
            hybrid_cfg=cfg["hybrid"],
            grading_cfg=cfg["grading"],
            pixel_pitch_mm=cfg["data"]["pixel_pitch_mm"],
            intensity=window.to_dict(),
            seed=cfg["seed"],
        )

    refusal = supervised_refusal(opts)
    if refusal is not None:
        log.info("supervised member skipped: %s", refusal)
        return make_hybrid().fit(samples), {"skipped": refusal}
    return fit_with_labeled(cfg, make_hybrid, members, samples, train_files, window)


def supervised_refusal(opts: Mapping[str, Any]) -> str | None:
    """Why this run trains no supervised member (None: it does)."""
    if opts["supervised"] == "never":
        return "retrain.supervised is never"
    if not opts["labeled_dirs"]:
        return "retrain.labeled_dirs is empty: it learns from labeled defects"
    return None


def fit_with_labeled(
    cfg: Mapping[str, Any],
    make_hybrid: Any,
    members: Mapping[str, Any],
    samples: list[dict[str, Any]],
    train_files: list[Path],
    window: IntensityWindow,
) -> tuple[Any, dict[str, Any]]:
    """The challenger's hybrid with the supervised member: trained on the members' training
    images (and injected copies) and the labeled defects of ``retrain.labeled_dirs``; fusion
    fitted on the validation samples and those labeled images, each answered by a head that
    never saw it (cross-fitted in ``retrain.folds`` folds, a part's images together), so it
    chooses members on real labeled defects. The hybrid keeps the head trained on them all."""
    from sklearn.model_selection import GroupKFold

    from data.datasets import LabeledFolder
    from data.validation import labeled_defect_sample
    from evaluation.supervision import build_supervised, with_heads
    from members.device import resolve_device

    opts = cfg["retrain"]
    folder = LabeledFolder(opts["labeled_dirs"], window, cfg["data"]["group_pattern"])
    labeled = [labeled_defect_sample(folder[i]) for i in range(len(folder))]
    folds = min(opts["folds"], len(set(folder.groups)))
    if folds < 2 or not any(folder.labels):
        reason = (
            f"{', '.join(map(str, opts['labeled_dirs']))}: {sum(folder.labels)} labeled defects "
            f"of {len(set(folder.groups))} part(s); cross-fitting needs defects and 2 parts"
        )
        log.info("supervised member skipped: %s", reason)
        return make_hybrid().fit(samples), {"skipped": reason}
    fold_of = np.empty(len(labeled), dtype=int)
    for fold, (_, held) in enumerate(GroupKFold(folds).split(labeled, groups=folder.groups)):
        fold_of[held] = fold
    probe = make_hybrid()
    supervised = build_supervised(
        members,
        cfg["members"]["supervised"],
        cfg["trainer"],
        cfg["device"],
        probe.member_inputs,
        opts["supervised_injections"],
        cfg["data"]["pixel_pitch_mm"],
        cfg["seed"],
        # The members' device: heads on a GPU train one after another, on the CPU side by side.
        resolve_device(cfg["device"]["accelerator"]),
        workers=None,
    )
    train_set = ImageFiles(train_files, None, window)
    supervised.fit(
        (train_set[i]["image"] for i in range(len(train_set))),
        labeled,
        fold_of,
        samples,
        nested=False,
    )
    fitting = with_heads(
        supervised,
        samples,
        probe.member_outputs_many(s["image"] for s in samples),
        "validation",
        lambda i: frozenset(),
    ) + with_heads(
        supervised,
        labeled,
        probe.member_outputs_many(s["image"] for s in labeled),
        "labeled",
        lambda i: frozenset({int(fold_of[i])}),
    )
    hybrid = make_hybrid({"supervised": supervised.heads[frozenset()]}).fit(fitting)
    return hybrid, {
        "labeled_images": len(labeled),
        "labeled_defects": int(sum(folder.labels)),
        "with_masks": int(sum(s["mask"] is not None and s["label"] for s in labeled)),
        "folds": folds,
        "kept_members": hybrid.fused_names,
    }


def run_once(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """One retraining run (see the module docstring); returns its history entry (None on a
    DDP rank other than 0)."""
    from members.build import build_trainer

    opts = cfg["retrain"]
    if opts["metric"] not in METRICS:
        raise ValueError(f"retrain.metric must be one of {METRICS}, got {opts['metric']!r}")
    if not opts["normal_dirs"]:
        raise ValueError("retrain.normal_dirs is empty: name the folders of defect-free images")
    for folder in [*opts["normal_dirs"], *opts["defect_dirs"], *opts["labeled_dirs"]]:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"data folder does not exist: {folder}")
    learned = {Path(d).resolve() for d in opts["labeled_dirs"]}
    for folder in [*opts["normal_dirs"], *opts["defect_dirs"]]:
        resolved = Path(folder).resolve()
        if any(resolved == d or d in resolved.parents or resolved in d.parents for d in learned):
            raise ValueError(
                f"{folder} overlaps retrain.labeled_dirs: labeled defects are trained on, so "
                "they cannot also be normal images or holdout defects"
            )
    # Under DDP the other ranks start here, each running this command, before any lock.
    ranks = build_trainer(cfg["device"], {}, seed=cfg["seed"], progress=False)
    ranks.launch()
    if not ranks.is_global_zero:
        plan = ranks.fabric.broadcast(None)
        if plan is not None:  # rank 0 trains a challenger: fit its members together
            window = IntensityWindow.from_dict(plan["window"])
            champion = Path(plan["champion"]) if plan["champion"] else None
            train_files, _ = split_files(cfg, plan["files"])
            fit_members(cfg, train_files, Path(plan["work"]), champion, window)
        return None
    told = []

    def tell_ranks(plan: dict[str, Any] | None) -> None:
        """What the other ranks train on (None: nothing this time), sent once."""
        ranks.fabric.broadcast(plan)
        told.append(plan)

    try:
        return _run_on_rank_zero(cfg, tell_ranks)
    finally:
        if not told:  # stopped before training (nothing new, the lock held, an error)
            tell_ranks(None)


def _run_on_rank_zero(cfg: Mapping[str, Any], tell_ranks: Any) -> dict[str, Any]:
    """The run's steps on rank 0 (or a single process); ``tell_ranks(plan)`` before training."""
    from fusion.hybrid import Hybrid

    opts = cfg["retrain"]
    workspace = Path(opts["workspace"])
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with RunLock(workspace / "lock") as lock:
        if lock.stale_cleared is not None:
            log.warning("cleared a stale lock left by %s", lock.stale_cleared)
        for leftover in workspace.glob("hybrids/.*"):  # temporary folders of killed runs
            shutil.rmtree(leftover, ignore_errors=True)
        folders = [
            Path(d).resolve()
            for d in [*opts["normal_dirs"], *opts["defect_dirs"], *opts["labeled_dirs"]]
        ]
        files = scan_files(folders, "/")
        files = {f"/{k}": v for k, v in files.items()}
        added = new_files(read_manifest(workspace), files)
        champion = current_champion(workspace)
        entry: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "new_files": len(added),
        }
        if len(added) < opts["min_new_images"] and champion is not None:
            entry.update(action="none", reason=f"{len(added)} new file(s); nothing to do")
            append_history(workspace, entry)
            return entry
        normals = _files_below(files, opts["normal_dirs"])
        learned = _files_below(files, opts["labeled_dirs"])  # under labeled_dirs
        defects = sorted(set(files) - set(normals) - set(learned))
        holdout = choose_holdout(workspace, normals, defects, opts)
        training = sorted(set(normals) - set(holdout["normal"]))
        data_key = hashlib.sha256(
            json.dumps(
                [files[p] for p in [*training, *learned]] + [opts, cfg["members"]],
                default=str,
                sort_keys=True,
            ).encode()
        ).hexdigest()[:12]
        work = workspace / "work" / data_key
        window = workspace_intensity(workspace, training, cfg["data"])
        tell_ranks(
            {
                "files": training,
                "work": str(work),
                "champion": str(champion) if champion is not None else None,
                "window": window.to_dict(),
            }
        )
        challenger, supervised = train_challenger(cfg, training, work, champion, window)
        entry["supervised"] = supervised
        hybrid_dir = workspace / "hybrids" / f"{time.strftime('%Y%m%d-%H%M%S')}-{data_key}"
        challenger.save(hybrid_dir)
        fault_point("after_save")
        evaluation = holdout_dataset(holdout, opts, window)
        score, metrics, records = holdout_score(challenger, evaluation, opts["metric"])
        entry.update(
            train_images=len(training),
            holdout_images=len(evaluation),
            challenger={"hybrid": hybrid_dir.name, opts["metric"]: score, "metrics": metrics},
        )
        if champion is not None:
            champion_score, champion_metrics, champion_records = holdout_score(
                Hybrid.load(champion), evaluation, opts["metric"]
            )
            entry["champion"] = {
                "hybrid": champion.name,
                opts["metric"]: champion_score,
                "metrics": champion_metrics,
            }
            comparison = compare_on_holdout(
                records, champion_records, {"challenger": metrics, "champion": champion_metrics}
            )
            entry["comparison"] = comparison
            promoted, reason = promotion(
                score, champion_score, comparison, opts["promote_on"], opts["margin"]
            )
        else:
            promoted, reason = True, "no champion yet"
        if promoted:
            promote(workspace, hybrid_dir)
            fault_point("after_promote")
        else:
            shutil.rmtree(hybrid_dir, ignore_errors=True)
        write_manifest(workspace, files)
        shutil.rmtree(work, ignore_errors=True)
        entry.update(
            action="promoted" if promoted else "rejected",
            reason=reason,
            seconds=round(time.time() - started, 1),
        )
        append_history(workspace, entry)
        return entry

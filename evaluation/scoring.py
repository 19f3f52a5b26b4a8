"""Scoring a detector on a labeled split: streaming detection metrics and per-image records.

Used by the benchmark (each member), the ensemble (the hybrid against each member) and the
retraining job (champion against challenger). A detector is anything that maps a batch of
images to scores and maps: a member, a member behind tiled inference, or a hybrid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.images import size_pair, to_array, to_tensor
from data.validation import labeled_defect_sample
from evaluation.phases import PhaseClock
from members.device import wait_for
from metrics import get_metric
from metrics.bootstrap import PairedBootstrap
from metrics.detection import miss_rates

# (scores [B], maps [B, 1, H, W]) for a batch of samples.
PredictFn = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Bootstrap intervals of ``metrics`` (``PairedBootstrap.compute``'s, one detector's
    # ``intervals`` by metric); None without both labels.
    intervals: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _scalar(value: Any) -> float:
    if isinstance(value, dict):
        for key in ("f1", "value", "score"):
            if key in value:
                return float(value[key])
    if hasattr(value, "f1"):
        return float(value.f1)
    return float(value)


def evaluate(
    predict: PredictFn,
    batches: Iterable[dict[str, Any]],
    pixel_metrics: bool = True,
    intervals: bool = True,
) -> Evaluation:
    """Run ``predict`` over ``batches`` and compute image metrics and, when ``pixel_metrics``
    and the split has defective pixels, pixel metrics; with ``intervals``, their bootstrap
    intervals too. Maps stream into the metrics batch by batch; only per-image scores (and a
    pixel sample for the intervals) are kept."""
    image_metrics = {name: get_metric(name) for name in IMAGE_METRICS}
    pixel = {name: get_metric(name) for name in PIXEL_METRICS} if pixel_metrics else {}
    bootstrap = PairedBootstrap() if intervals else None
    records: list[dict[str, Any]] = []
    seconds = 0.0
    any_defect_pixels = False
    for batch in batches:
        started = time.perf_counter()
        scores, maps = predict(batch)
        wait_for((scores, maps))
        seconds += time.perf_counter() - started
        scores = scores.detach().float().cpu()
        labels = torch.as_tensor(batch["label"]).long().cpu()
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"non-finite scores for {batch['path']}")
        for metric in image_metrics.values():
            metric.update(scores, labels)
        if pixel:
            masks = batch["mask"].float().cpu()
            maps = maps.detach().float().cpu()
            if maps.shape[-2:] != masks.shape[-2:]:
                maps = torch.nn.functional.interpolate(maps, size=masks.shape[-2:], mode="bilinear")
            any_defect_pixels |= bool(masks.any())
            for metric in pixel.values():
                metric.update(maps, masks)
        for i, path in enumerate(batch["path"]):
            if bootstrap:
                pixels = ({"member": maps[i]}, masks[i]) if pixel else (None, None)
                bootstrap.update(int(labels[i]), {"member": float(scores[i])}, *pixels)
            records.append(
                {
                    "path": path,
                    "label": int(labels[i]),
                    "defect_type": batch["defect_type"][i],
                    "score": float(scores[i]),
                }
            )
    if not records:
        raise ValueError("nothing to evaluate: the test split is empty")
    values: dict[str, float] = {}
    notes: list[str] = []
    labels_seen = {r["label"] for r in records}
    if labels_seen == {0, 1}:
        values.update({name: _scalar(m.compute()) for name, m in image_metrics.items()})
        values.update(
            miss_rates(
                np.array([r["score"] for r in records]), np.array([r["label"] for r in records])
            )
        )
    else:
        notes.append("image metrics skipped: the test split lacks normal or defective images")
    if pixel and any_defect_pixels:
        values.update({name: _scalar(m.compute()) for name, m in pixel.items()})
    elif pixel_metrics:
        notes.append("pixel metrics skipped: no ground-truth masks with defective pixels")
    # One detector: its intervals and sample figures by metric, without its name.
    summary = bootstrap and bootstrap.compute()
    member_intervals = summary and {
        **summary,
        "intervals": summary["intervals"]["member"],
        "figures_from_sample": summary["figures_from_sample"]["member"],
    }
    return Evaluation(values, records, len(records), seconds, notes, member_intervals)


def evaluate_hybrid(
    hybrid,
    dataset,
    progress: bool = False,
    member_outputs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    hybrid_for: Callable[[int], Any] | None = None,
    intervals: bool = True,
    contributions: Sequence[str] = (),
    review_folder: Path | None = None,
    quality: bool = False,
) -> dict[str, Any]:
    """The hybrid and each of its members on a labeled split, from one pass over the images.

    Returns ``metrics`` per detector (``hybrid`` and each member: image AUROC/AP/F1-max, and
    pixel AUROC/AUPRO where masks exist), ``intervals`` (``metrics.bootstrap.PairedBootstrap``:
    each detector's intervals, and the hybrid minus each member), ``grading`` (the grading
    stage on the true defect regions, and end to end on the detected regions matched to
    truth; image level accuracy), ``records`` (per image) and ``seconds`` (hybrid inference
    time).

    ``member_outputs[i]``: image ``i``'s member scores and maps, already computed (the time
    is then fusion and grading only). ``hybrid_for(i)``: the hybrid that scores image ``i``
    (cross-validation: each image by the hybrid fitted without its fold). ``intervals``:
    False skips the bootstrap (``intervals`` is then None). ``contributions``: members whose
    contribution is measured: the detector ``without <name>`` is the hybrid with that member's
    weight set to 0 (``Hybrid.without``; the hybrid itself where it does not weigh the member,
    or weighs it alone), so the hybrid minus it, with its paired interval, is what the member
    adds.

    ``quality``: each record also holds the image's panel quality
    (``metrics.quality.panel_quality``, on the image as the split gives it) and, for each
    member that reconstructs images, ``<member> <figure>`` of
    ``metrics.quality.reconstruction_figures`` (on the image as the members take it);
    ``quality`` then says which members, and why figures are missing where they are.
    ``review_folder``: where the overlays of the worst misses and the false alarms go
    (``evaluation.review.ReviewCases``; ``review`` lists them).
    """
    from tqdm.auto import tqdm

    from evaluation.review import ReviewCases
    from grading.evaluation import grading_figures, grading_scores
    from grading.matching import match_regions
    from metrics.quality import lpips_or_reason, panel_quality, reconstruction_figures

    ablations = [f"without {name}" for name in contributions]
    detectors = ["hybrid", *hybrid.names, *ablations]
    image_metrics = {d: {n: get_metric(n) for n in IMAGE_METRICS} for d in detectors}
    # Exact pixel figures for the hybrid and its members; a contribution's pixel figures come
    # from the bootstrap's pixel sample (its fused map is made image by image, but streaming
    # each into exact pixel metrics would double the cost of scoring).
    pixel_metrics = {
        d: {n: get_metric(n) for n in ("pixel_auroc", "aupro")}
        for d in detectors[: -len(ablations) or None]
    }
    bootstrap = PairedBootstrap() if intervals else None
    has_masks = bool(getattr(dataset, "has_masks", True))
    records, stage_pairs, detected_pairs, levels = [], [], [], []
    seconds = 0.0
    review = ReviewCases(review_folder) if review_folder else None
    quality_notes: dict[str, Any] | None = None
    reconstructing = {}
    if quality:
        reconstructing = {
            name: member
            for name, member in hybrid.members.items()
            if getattr(member, "reconstructs", False)
        }
        quality_notes = {"reconstructing_members": list(reconstructing)}
        if reconstructing and hybrid.tiling_options:
            quality_notes["reconstruction_unavailable"] = (
                "a tiled hybrid's members reconstruct tiles: each benchmark job gives their "
                "figures per tile (reconstruction_quality)"
            )
            reconstructing = {}
    lpips, lpips_missing = lpips_or_reason() if reconstructing else (None, None)
    if lpips_missing:
        quality_notes["lpips_unavailable"] = lpips_missing
    for index in tqdm(range(len(dataset)), desc="test", disable=not progress):
        sample = dataset[index]
        model = hybrid_for(index) if hybrid_for else hybrid
        started = time.perf_counter()
        given = member_outputs[index] if member_outputs else None
        out = model.predict(sample["image"], given() if callable(given) else given)
        seconds += time.perf_counter() - started
        label = torch.tensor([int(sample["label"])])
        scores = {"hybrid": out.score, **out.member_scores}
        maps = {"hybrid": out.anomaly_map, **dict(zip(hybrid.names, out.member_maps))}
        outputs = (np.array(list(out.member_scores.values())), out.member_maps)
        for name, ablation in zip(contributions, ablations):
            answer = model.without(name, outputs, tuple(out.anomaly_map.shape))
            scores[ablation], maps[ablation] = answer or (out.score, out.anomaly_map)
        for name in detectors:
            for metric in image_metrics[name].values():
                metric.update(torch.tensor([scores[name]]), label)
            if has_masks and name in pixel_metrics:
                for metric in pixel_metrics[name].values():
                    metric.update(torch.as_tensor(maps[name])[None, None], sample["mask"][None])
        if bootstrap:
            bootstrap.update(
                int(sample["label"]), scores, maps if has_masks else None, sample.get("mask")
            )
        if "level" in sample:
            levels.append((out.level, int(sample["level"])))
        if sample["label"] and "mask" in sample:
            # Real datasets: each mask component is a defect of the folder's type, no level.
            labeled = labeled_defect_sample(sample)
            instances, defects = labeled["instances"], labeled["defects"]
        else:
            instances, defects = None, []
        if defects:
            stage_pairs += model.grade_truth(sample["image"], instances, defects, out.anomaly_map)
            detected_pairs += [
                (region, truth)
                for region, truth in match_regions(out.regions, instances, defects)
                if truth is not None
            ]
        if review:
            review.offer(index, sample, out)
        figures = panel_quality(to_array(sample["image"])) if quality else {}
        if reconstructing:
            (seen,) = hybrid.member_inputs([sample["image"]])  # their input size, RGB
        for name, member in reconstructing.items():
            with torch.no_grad():
                rebuilt = member.reconstruct_images(seen.to(hybrid.member_set.device)).cpu()
            (rebuilt_figures,) = reconstruction_figures(seen, rebuilt, lpips)
            figures.update({f"{name} {key}": value for key, value in rebuilt_figures.items()})
        records.append(
            {
                "path": sample["path"],
                "label": int(sample["label"]),
                "defect_type": sample["defect_type"],
                "score": out.score,
                "flagged": out.label,
                "level": out.level,
                "true_level": sample.get("level"),
                "regions": len(out.regions),
                **{f"score_{name}": scores[name] for name in detectors[1:]},
                **figures,
            }
        )
    labels_seen = {r["label"] for r in records}
    metrics: dict[str, dict[str, float]] = {}
    labels = np.array([r["label"] for r in records])
    for name in detectors:
        values = {}
        if labels_seen == {0, 1}:
            values.update({k: _scalar(m.compute()) for k, m in image_metrics[name].items()})
            key = "score" if name == "hybrid" else f"score_{name}"
            values.update(miss_rates(np.array([r[key] for r in records]), labels))
        if has_masks and 1 in labels_seen:
            values.update({k: _scalar(m.compute()) for k, m in pixel_metrics.get(name, {}).items()})
        metrics[name] = values
    grading: dict[str, Any] = {
        "stage_on_true_regions": grading_scores(stage_pairs),
        "end_to_end": grading_scores(detected_pairs),
        **grading_figures(stage_pairs, detected_pairs, levels),
    }
    if levels:
        predicted, truth = (torch.tensor(v) for v in zip(*levels))
        grading["image_level_accuracy"] = float((predicted == truth).float().mean())
        grading["image_level_within_one"] = float(((predicted - truth).abs() <= 1).float().mean())
    if bootstrap and ablations and has_masks and bootstrap.has_pixel_figures:
        # The hybrid's exact figure moved by what the pixel sample says removing the member
        # does: the contribution is then the sample's own difference.
        sampled = bootstrap.figures()
        reference = bootstrap.names.index("hybrid")
        for d, name in enumerate(bootstrap.names):
            if name in ablations:
                metrics[name].update(
                    {
                        k: metrics["hybrid"][k] + float(sampled[k][d, 0] - sampled[k][reference, 0])
                        for k in ("pixel_auroc", "aupro")
                    }
                )
    summary = bootstrap and bootstrap.compute("hybrid", metrics)
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in ablations},
        # How far each figure, and the hybrid's lead over each member, could move on another
        # draw of images (None without both labels).
        "intervals": summary and _without(summary, ablations),
        # What each member adds: the hybrid minus the hybrid without it, with its interval.
        "contributions": {
            name: {
                "metrics": metrics[ablation],
                "hybrid_minus_without": (summary or {}).get("differences", {}).get(ablation),
            }
            for name, ablation in zip(contributions, ablations)
        },
        "grading": grading,
        "operating_point": operating_point_figures(records),
        "records": records,
        "seconds": seconds,
        "quality": quality_notes,
        "review": review and review.summary(),
    }


def _without(summary: dict[str, Any], detectors: Sequence[str]) -> dict[str, Any]:
    """A ``PairedBootstrap.compute`` summary without ``detectors`` (given apart)."""
    out = dict(summary)
    for key in ("intervals", "figures_from_sample", "differences"):
        if key in out:
            out[key] = {k: v for k, v in out[key].items() if k not in detectors}
    return out


def evaluate_on_unseen_panels(
    hybrid,
    category_dir,
    seed: int,
    count: int,
    channels: int = 3,
    progress: bool = False,
) -> dict[str, Any] | None:
    """A fitted hybrid on ``count`` new panels of the generator that wrote a synthetic dataset
    (``category_dir``), with a ``seed`` nothing was fitted or chosen on; every defect's type and
    level is known. None for a dataset the generator did not write, or ``count`` 0."""
    from data.synthetic import PanelSet, generator_of_dataset

    generator = generator_of_dataset(category_dir, seed)
    if generator is None or not count:
        return None
    panels = PanelSet(generator, count, channels=channels)
    evaluation = evaluate_hybrid(hybrid, panels, progress=progress)
    return {
        "split": f"unseen panels (generator seed {seed})",
        "images": len(panels),
        "metrics": evaluation["metrics"]["hybrid"],
        "intervals": evaluation["intervals"] and evaluation["intervals"]["intervals"]["hybrid"],
        "grading": evaluation["grading"],
        "operating_point": evaluation["operating_point"],
    }


def rate_interval(
    events: Sequence[bool], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[float] | None:
    """The bootstrap percentile interval of the share of ``events`` that are true (the images
    resampled with replacement, as ``PairedBootstrap`` resamples within a label)."""
    events = np.asarray(events, dtype=float)
    if not events.size:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(events), np.full(len(events), 1 / len(events)), resamples)
    shares = draws @ events / len(events)
    tail = 100 * (1 - confidence) / 2
    return [float(v) for v in np.percentile(shares, [tail, 100 - tail])]


def operating_point_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the hybrid's image threshold does on a split: the share of defect-free images it
    flags and the share of defective ones it passes, each with its bootstrap interval, and
    the levels defect-free images get."""
    normal = [bool(r["flagged"]) for r in records if not r["label"]]
    missed = [not r["flagged"] for r in records if r["label"]]
    levels: dict[str, int] = {}
    for record in records:
        if not record["label"]:
            levels[str(record["level"])] = levels.get(str(record["level"]), 0) + 1
    return {
        "false_alarm_rate": float(np.mean(normal)) if normal else float("nan"),
        "false_alarm_rate_interval": rate_interval(normal),
        "miss_rate": float(np.mean(missed)) if missed else float("nan"),
        "miss_rate_interval": rate_interval(missed),
        "normal_images": len(normal),
        "defective_images": len(missed),
        "levels_of_normal_images": dict(sorted(levels.items())),
    }


def grouped_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Each image's fold, ``folds`` folds stratified by label, the images of one group (one
    physical part or panel: ``data.group_pattern``) always in one fold. Fewer folds where
    there are fewer groups of a label; a fold left without a defective or a defect-free image
    is refused with a message naming it."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray([str(g) for g in groups])
    per_label = {c: len(np.unique(groups[labels == c])) for c in (0, 1)}
    k = min(folds, per_label[0], per_label[1])
    if k < 2:
        raise ValueError(
            f"cross-validation needs at least 2 defective and 2 normal test images in 2 groups "
            f"each, got {int(labels.sum())} defective ({per_label[1]} groups) and "
            f"{int((labels == 0).sum())} normal ({per_label[0]} groups); see data.group_pattern"
        )
    fold_of = np.empty(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold_of[held_out] = fold
    for fold in range(k):
        for label, name in ((1, "defective"), (0, "defect-free")):
            if not ((fold_of == fold) & (labels == label)).any():
                raise ValueError(
                    f"fold {fold + 1} of {k} holds no {name} image: the groups "
                    f"(data.group_pattern) are too few or too uneven for {k} folds; lower "
                    "ensemble.folds"
                )
    return fold_of


def cross_validate_hybrid(
    make_hybrid: Callable[..., Any],
    validation: list[dict[str, Any]],
    dataset,
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 4,
    fit_workers: int | None = 1,
    supervised: Any = None,
    normal_images: Callable[[], Iterable[Any]] | None = None,
    clock: PhaseClock | None = None,
    review_folder: Path | None = None,
    quality: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Fit on the dataset's own labeled defects without ever scoring an image with a hybrid
    that saw it.

    The test split is cut into ``folds`` folds, stratified by label, the images of one part
    together (``grouped_folds``). Each fold is scored by a hybrid fitted on ``validation``
    (held-out normals and injected defects) plus the other folds' images (real defects with
    their masks and type names); the metrics pool these out-of-fold answers. Member outputs
    are computed once per image and reused by every fold. ``batch_size``: images per batch
    through the members. ``fit_workers``: processes fitting the folds' hybrids and the final
    one side by side (``fusion.fitting.fit_hybrids``).

    ``supervised``: a ``evaluation.supervision.SupervisedFolds`` (or None): the supervised
    member is then trained inside each fold, on ``normal_images()`` (the members' training
    images) and that fold's training part only, and joins every hybrid's candidates
    (``make_hybrid(extra_members)``), answering each image with a head that never saw it.

    Returns ``(evaluation, hybrid)``: ``evaluate_hybrid``'s result with a ``cross_validation``
    entry (and ``supervised``: the member against a logistic regression on the same pooled
    features, out of fold), and the hybrid to keep, fitted on ``validation`` and the whole
    split. ``clock``: a ``PhaseClock`` that times each phase (members, supervised heads, fits,
    scoring). ``review_folder``, ``quality``: as ``evaluate_hybrid``'s.
    """
    from evaluation.supervision import heads_for_fit, with_heads
    from fusion.fitting import fit_hybrids

    if supervised is not None and normal_images is None:
        raise ValueError("a supervised member needs the members' training images (normal_images)")
    clock = clock or PhaseClock()
    probe = make_hybrid()
    started = time.perf_counter()
    with clock("test images through the members"):
        # Where the dataset has masks, each image's own (None: known); without, none is known.
        known = None if getattr(dataset, "has_masks", True) else False
        samples = [labeled_defect_sample(dataset[i], known) for i in range(len(dataset))]
        outputs = probe.member_outputs_many(
            (to_tensor(s["image"]) for s in samples), batch_size, progress, "test members"
        )
    member_seconds = time.perf_counter() - started
    with clock("validation images through the members"):
        validation_outputs = probe.member_outputs_many(
            (to_tensor(s["image"]) for s in validation), batch_size, progress, "validation members"
        )
    labels = np.array([s["label"] for s in samples])
    groups = [s.get("group", str(i)) for i, s in enumerate(samples)]
    fold_of = grouped_folds(labels, groups, folds, seed)
    k = int(fold_of.max()) + 1
    heads: dict[frozenset, Any] = {}
    if supervised is not None:
        with clock("supervised heads"):
            supervised.fit(normal_images(), samples, fold_of, validation, progress=progress)
        heads = supervised.heads

    def sample_set(fold: int | None) -> list[dict[str, Any]]:
        outer, labeled_heads = heads_for_fit(fold_of, fold)
        others = [i for i, _ in labeled_heads]
        return with_heads(
            supervised, validation, validation_outputs, "validation", lambda i: outer
        ) + with_heads(
            supervised,
            [samples[i] for i in others],
            [outputs[i] for i in others],
            "labeled",
            dict(labeled_heads).__getitem__,
            others,
        )

    def extra(excluded: frozenset) -> dict[str, Any]:
        return {"supervised": heads[excluded]} if heads else {}

    # The k folds' hybrids, then the one to keep, fitted on everything.
    hybrids = [make_hybrid(extra(frozenset({fold}))) for fold in range(k)]
    final = make_hybrid(extra(frozenset()))
    with clock(f"fusion and grading fits ({k} folds and the final one)"):
        fit_hybrids(
            [*hybrids, final],
            [*(sample_set(fold) for fold in range(k)), sample_set(None)],
            fit_workers,
            progress,
            "fits",
        )
    scored = [
        s["member_outputs"]
        for s in with_heads(
            supervised, samples, outputs, "labeled", lambda i: frozenset({int(fold_of[i])})
        )
    ]
    with clock("test images scored out of fold"):
        evaluation = evaluate_hybrid(
            hybrids[0],
            dataset,
            progress,
            scored,
            lambda index: hybrids[fold_of[index]],
            contributions=weighed_members(final),
            review_folder=review_folder,
            quality=quality,
        )
    evaluation["seconds"] += member_seconds
    evaluation["cross_validation"] = {
        "folds": k,
        "defective_images": int(labels.sum()),
        "normal_images": int((labels == 0).sum()),
        "groups": len(set(groups)),
        "types": sorted({d["type"] for s in samples for d in s["defects"]}),
        # What each fold's choosing combiners (auto, rank_or_member) chose (None: a fixed
        # combiner): folds that choose differently pool their answers less well than one rule.
        "fold_choices": [
            {
                level: choice and choice["chosen"]
                for level, choice in hybrid.validation_["fusion_choice"].items()
            }
            for hybrid in hybrids
        ],
        # The members each fold's hybrid kept (forward selection), and their weights.
        "fold_members": [hybrid.fused_names for hybrid in hybrids],
    }
    if supervised is not None:
        evaluation["supervised"] = supervised_against_logistic(
            evaluation["records"], supervised.logistic_baseline(), labels
        )
    return evaluation, final


def weighed_members(hybrid) -> list[str]:
    """The members whose contribution ``evaluate_hybrid`` can measure: those a ``forward``
    fusion weighs, where it weighs more than one."""
    fusions = (hybrid.image_fusion_, hybrid.pixel_fusion_)
    if len(hybrid.fused_names) < 2 or not any(f.combiner == "forward" for f in fusions):
        return []
    return list(hybrid.fused_names)


def supervised_against_logistic(
    records: Sequence[Mapping[str, Any]], logistic: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """The supervised member's out-of-fold image figures beside a logistic regression's on the
    same features pooled per image, under the same folds, with paired intervals."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    head = np.array([r["score_supervised"] for r in records])
    bootstrap = PairedBootstrap()
    for label, mine, theirs in zip(labels, head, logistic):
        bootstrap.update(int(label), {"supervised": mine, "logistic_pooled": theirs})
    figures = {
        name: {
            "image_auroc": float(roc_auc_score(labels, values)),
            "image_ap": float(average_precision_score(labels, values)),
        }
        for name, values in (("supervised", head), ("logistic_pooled", logistic))
    }
    return {
        "split": "test, out of fold (the same folds as the hybrid)",
        "baseline": "logistic regression (balanced, standardized) on the same backbone "
        "features pooled per image (per-channel mean and max), trained on what each fold's "
        "head learned from",
        "metrics": figures,
        "intervals": bootstrap.compute("supervised", figures),
    }


def shared_work_cost(hybrid, images: list[torch.Tensor]) -> dict[str, float]:
    """Milliseconds per image of the hybrid's members run together (shared backbones run once
    per batch; with tiling, every tile batch goes through all members) against the sum of each
    member run on its own, on the same images."""
    from members.member_set import MemberSet
    from tiling import infer_tiled, infer_tiled_options

    tiling, size = hybrid.tiling_options, size_pair(hybrid.image_size)
    if tiling:
        options = infer_tiled_options(tiling)

        def run(member_set: MemberSet, count: int) -> None:
            for image in images[:count]:  # maps come back on the CPU: nothing to wait for
                infer_tiled(member_set, image, **options)
    elif size is not None:
        # Each image resized to the members' input first: test images may differ in size.
        batch = torch.cat(
            [
                torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")
                for image in images
            ]
        )

        def run(member_set: MemberSet, count: int) -> None:
            wait_for(member_set(batch[:count]))
    else:

        def run(member_set: MemberSet, count: int) -> None:
            for image in images[:count]:  # native sizes, which may differ: one at a time
                wait_for(member_set(image[None]))

    shared = hybrid.member_set
    timings = {}
    with torch.no_grad():
        run(shared, 1)  # warm-up
        started = time.perf_counter()
        run(shared, len(images))
        timings["members_together_ms"] = (time.perf_counter() - started) * 1000 / len(images)
        total = 0.0
        for name in shared.names:
            alone = MemberSet({name: shared.members[name]}, share_backbones=False)
            started = time.perf_counter()
            run(alone, len(images))
            elapsed = (time.perf_counter() - started) * 1000 / len(images)
            timings[f"{name}_alone_ms"] = elapsed
            total += elapsed
    timings["members_sum_ms"] = total
    timings["saving"] = 1 - timings["members_together_ms"] / total if total > 0 else float("nan")
    return timings

"""The hybrid: fitted members, their fusion, and the grading, as one model in one folder.

``Hybrid.fit`` takes labeled validation samples (held-out normal images and defects the
synthetic injector put into copies of them, or real labeled defects) and fits, in order: the
image- and pixel-level ``ScoreFusion``, the image threshold (``operating_point``: at most
``false_alarm_rate`` of the normal validation images flagged, or F1-optimal), the pixel
threshold (``ThresholdCalibrator``), and, from the validation regions matched to their truth,
the ``TypeClassifier`` and the grader (``OrdinalGrader`` when labeled levels exist and it beats
the rules in cross-validation, ``RuleGrader`` otherwise).

``Hybrid.predict(image)`` takes one image of any size (float ``[H, W]`` or ``[H, W, C]`` in
[0, 1]): the members run on the image resized to their input size (backbones they share run
once, through ``MemberSet``) or tile by tile at full resolution; the fused map is brought to the
image's resolution, and regions are found and measured on the original image.

A saved hybrid (``save``/``load``) is a folder: ``hybrid.json``, ``members/<name>/``,
``fusion.joblib``, ``grading.joblib`` and a SHA-256 manifest of all of them, checked before
anything is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.base import clone
from sklearn.model_selection import StratifiedGroupKFold

from artifacts.io import (
    ArtifactError,
    atomic_folder,
    atomic_joblib_dump,
    atomic_write_json,
    load_joblib_verified,
    verify_manifest,
)
from data.images import size_pair
from fusion.combiners import ScoreFusion
from grading.graders import (
    UNKNOWN,
    OrdinalGrader,
    RuleGrader,
    ThresholdCalibrator,
    TypeClassifier,
)
from grading.regions import Region, find_regions, luminance, measure_region
from members.backbones import load_backbone
from members.base import Member, load_member
from members.member_set import MemberSet
from metrics.detection import ImageF1MaxMetric
from metrics.severity import DEFECT_TYPES

FORMAT_VERSION = 1
HYBRID_FILE = "hybrid.json"
FUSION_FILE = "fusion.joblib"
GRADING_FILE = "grading.joblib"
OPERATING_POINTS = ("false_alarm", "f1")
GRADERS = ("auto", "rules", "ordinal")


def image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float tensor from an array ``[H, W]`` or ``[H, W, C]`` (as images are read)
    or a tensor ``[C, H, W]`` (as datasets give them). The layout follows the type, not the
    shape, so a one- or three-row colour image keeps its rows."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if tensor.ndim == 3:
            tensor = tensor[..., :3].permute(2, 0, 1)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {tuple(tensor.shape)}")
    return tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor


class RegionDescriber:
    """Descriptors for the type classifier: a region's measurements and shape, plus the pooled
    features of a frozen pretrained backbone on the region's crop (its texture)."""

    MEASUREMENTS = (
        "log_area",
        "log_detection_area",
        "contrast_pct",
        "log_abs_contrast",
        "peak_pct",
        "log_semu",
        "aspect",
        "fill",
        "elongation",
        "span",
        "thickness",
    )

    def __init__(
        self,
        backbone: str | None = "efficientnet_lite0",
        layers: tuple[int, ...] = (1, 2),
        weights_dir: str = "backbones",
        crop_size: int = 64,
    ) -> None:
        self.crop_size = crop_size
        self.extractor = (
            load_backbone(backbone, layers, True, weights_dir) if backbone is not None else None
        )

    def __call__(self, image: torch.Tensor, regions: Sequence[Region]) -> np.ndarray:
        rows = np.asarray(
            [[r.features[k] for k in self.MEASUREMENTS] for r in regions], dtype=np.float64
        )
        if self.extractor is None:
            return rows
        crops = []
        height, width = image.shape[-2:]
        for r in regions:
            x0, y0, x1, y1 = r.bbox
            margin = max(8, (x1 - x0) // 4, (y1 - y0) // 4)
            crop = image[
                :,
                max(0, y0 - margin) : min(height, y1 + margin),
                max(0, x0 - margin) : min(width, x1 + margin),
            ]
            crops.append(F.interpolate(crop[None], size=(self.crop_size,) * 2, mode="bilinear"))
        with torch.no_grad():
            maps = self.extractor(torch.cat(crops))
        pooled = torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1).numpy()
        return np.concatenate([rows, pooled], axis=1)


class Hybrid:
    """See the module docstring.

    Fitted state (after ``fit`` or ``load``): ``image_fusion_`` and ``pixel_fusion_``
    (``ScoreFusion``), ``image_threshold_``, ``calibrator_`` (its ``threshold_`` is the pixel
    threshold), ``type_classifier_`` (None with fewer than two types), ``grader_``,
    ``grader_report_`` (the grader choice) and ``validation_`` (what it was fitted on).

    Args:
        members: fitted members by name.
        image_size: side (square) or [height, width] the members take (images are resized
            to it), or None with tiling.
        tiling: the tiling section (``enabled``, ``tile_size``, ``stride``, ...) or None.
        combiner, normalizer, learner: image- and pixel-level ``ScoreFusion`` options.
        grader: ``auto``, ``rules`` or ``ordinal``.
        level_rules, semu_edges: the rule grader's configuration.
        type_confidence: below this the type is ``unknown``.
        pixel_pitch_mm: for areas in mm² and SEMU.
        describer_backbone: backbone of the type descriptors (None: measurements only).
        pixel_samples: pixels per validation image used to fit the pixel fusion.
        intensity: the members' intensity window (``IntensityWindow.to_dict``).
        operating_point, false_alarm_rate: the image threshold's rule (see ``image_threshold``).
        pixel_threshold: the pixel threshold's rule, ``region``, ``f1`` or ``quantile`` (see
            ``ThresholdCalibrator``).
    """

    def __init__(
        self,
        members: Mapping[str, Member],
        image_size: int | Sequence[int] | None,
        tiling: Mapping[str, Any] | None = None,
        combiner: str = "rank",
        normalizer: str = "rank",
        learner: str = "logistic",
        grader: str = "auto",
        level_rules: Mapping[str, Any] | None = None,
        semu_edges: Sequence[float] = (1.0, 2.0, 3.0, 5.0),
        type_confidence: float = 0.4,
        pixel_pitch_mm: float = 0.1,
        describer_backbone: str | None = "efficientnet_lite0",
        weights_dir: str = "backbones",
        pixel_samples: int = 4096,
        intensity: Mapping[str, Any] | None = None,
        operating_point: str = "false_alarm",
        false_alarm_rate: float = 0.01,
        pixel_threshold: str = "region",
        seed: int = 0,
    ) -> None:
        if grader not in GRADERS:
            raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
        if operating_point not in OPERATING_POINTS:
            raise ValueError(
                f"operating_point must be one of {OPERATING_POINTS}, got {operating_point!r}"
            )
        if not 0 <= false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate!r}")
        if not members:
            raise ValueError("a hybrid needs at least one member")
        self.member_set = MemberSet(dict(members))
        self.options = {
            "image_size": image_size,
            "tiling": dict(tiling) if tiling and tiling.get("enabled") else None,
            "combiner": combiner,
            "normalizer": normalizer,
            "learner": learner,
            "grader": grader,
            "level_rules": level_rules,
            "semu_edges": list(semu_edges),
            "type_confidence": type_confidence,
            "pixel_pitch_mm": pixel_pitch_mm,
            "describer_backbone": describer_backbone,
            "weights_dir": weights_dir,
            "pixel_samples": pixel_samples,
            # The members' intensity window (data.images.IntensityWindow.to_dict), fitted on
            # their training images; predict applies it to every image it reads.
            "intensity": dict(intensity) if intensity else None,
            "operating_point": operating_point,
            "false_alarm_rate": false_alarm_rate,
            "pixel_threshold": pixel_threshold,
            "seed": seed,
        }
        self.describer = RegionDescriber(describer_backbone, weights_dir=weights_dir)

    @property
    def names(self) -> list[str]:
        return self.member_set.names

    # --- members ----------------------------------------------------------------------------

    def member_outputs(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Member scores ``[M]`` and maps ``[M, H, W]`` at the image's resolution."""
        height, width = image.shape[-2:]
        tiling = self.options["tiling"]
        if tiling:
            from tiling import infer_tiled

            # Every member sees each tile batch; shared backbones run once per batch.
            out = infer_tiled(
                self.member_set,
                image,
                tile_size=tiling["tile_size"],
                stride=tiling["stride"],
                batch_size=tiling["batch_size"],
                reduction=tiling["reduction"],
                pad_mode=tiling.get("pad_mode"),
            )
            return np.atleast_1d(out["pred_score"]).astype(np.float64), out["anomaly_map"]
        size = size_pair(self.options["image_size"])
        batch = image[None]
        if size is not None and (height, width) != size:
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True)
        scores, maps = self.member_set(batch)
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps, size=(height, width), mode="bilinear")
        return scores[0].double().numpy(), maps[0].double().numpy()

    # --- fusion -----------------------------------------------------------------------------

    def fuse_map(self, maps: np.ndarray, rows_per_chunk: int = 256) -> np.ndarray:
        """Fused ``[H, W]`` map of member maps ``[M, H, W]``, in row chunks (bounded memory)."""
        fusion: ScoreFusion = self.pixel_fusion_
        m, height, width = maps.shape
        out = np.empty((height, width), np.float32)
        for start in range(0, height, rows_per_chunk):
            block = maps[:, start : start + rows_per_chunk].reshape(m, -1).T
            out[start : start + rows_per_chunk] = fusion.transform(block).reshape(-1, width)
        return out

    def fit(self, samples: Iterable[Mapping[str, Any]], progress: bool = False) -> Hybrid:
        """Fit fusion and grading on validation samples: dicts with ``image`` (``[H, W]`` or
        ``[H, W, C]`` float array or ``[C, H, W]`` tensor), ``mask`` ``[H, W]`` (or None for a
        normal image), ``label``, and for defective images ``instances`` (``[H, W]`` ids) and
        ``defects`` (truth dicts with ``id``, ``type``, ``level``)."""
        from tqdm.auto import tqdm

        opts = self.options
        rng = np.random.default_rng(opts["seed"])
        cache = []
        for sample in tqdm(list(samples), desc="validation", disable=not progress):
            image = image_tensor(sample["image"])
            scores, maps = sample.get("member_outputs") or self.member_outputs(image)
            mask = sample.get("mask")
            mask = np.zeros(maps.shape[1:], bool) if mask is None else np.asarray(mask, bool)
            cache.append((sample, image, scores, maps, mask.reshape(maps.shape[1:])))
        if not cache:
            raise ValueError("fitting a hybrid needs validation samples")
        labels = np.array([int(s["label"]) for s, *_ in cache])
        scores = np.stack([c[2] for c in cache])
        # Where real labeled defects exist, the auto combiner chooses on real images only
        # (normal ones and those): injected defects can rank members unlike real ones do.
        real = np.array(
            [
                not s.get("defects") or any(d.get("source") == "labeled" for d in s["defects"])
                for s, *_ in cache
            ]
        )
        choose_on = real if real[labels == 1].any() else None

        fusion = ScoreFusion(
            opts["combiner"], opts["normalizer"], None, opts["learner"], opts["seed"]
        )
        self.image_fusion_ = clone(fusion).fit(scores, labels, None, choose_on)
        pixel_rows, pixel_labels, pixel_images = [], [], []
        for index_of_image, (_, _, _, maps, mask) in enumerate(cache):
            flat, flat_mask = maps.reshape(len(self.names), -1).T, mask.ravel()
            for value in (0, 1):
                index = np.flatnonzero(flat_mask == value)
                take = rng.choice(index, min(len(index), opts["pixel_samples"]), replace=False)
                pixel_rows.append(flat[take])
                pixel_labels.append(np.full(len(take), value))
                pixel_images.append(np.full(len(take), index_of_image))
        pixel_images = np.concatenate(pixel_images)
        self.pixel_fusion_ = clone(fusion).fit(
            np.concatenate(pixel_rows),
            np.concatenate(pixel_labels),
            pixel_images,
            None if choose_on is None else choose_on[pixel_images],
        )
        fused_scores = self.image_fusion_.transform(scores)
        self.image_threshold_ = image_threshold(
            fused_scores, labels, opts["operating_point"], opts["false_alarm_rate"]
        )
        fused_maps = [self.fuse_map(maps) for _, _, _, maps, _ in cache]
        calibrator = ThresholdCalibrator(opts["pixel_threshold"]).fit(
            fused_maps, [c[4] for c in cache]
        )
        self.calibrator_ = calibrator

        # Grading learns from two views of every known defect: the region the detector found
        # (what it sees in use) and the region of the true mask (clean, and present even where
        # detection missed it). Levels come from defects that have one. Types: where the
        # dataset's labeled defects have type names of their own, the classifier knows those.
        graded, levels, defect_ids, type_rows = [], [], [], []
        for (sample, image, *_), fused in zip(cache, fused_maps):
            if not sample.get("defects"):
                continue
            instances, defects = sample["instances"], sample["defects"]
            pairs = match_regions(self.regions(image, fused), instances, defects)
            pairs += self.truth_regions(image, fused, instances, defects)
            pairs = [(region, truth) for region, truth in pairs if truth is not None]
            if not pairs:
                continue
            descriptors = self.describer(image, [region for region, _ in pairs])
            for (region, truth), row in zip(pairs, descriptors):
                region.type = truth["type"]
                type_rows.append((row, str(truth["type"]), truth.get("source") == "labeled"))
                if truth.get("level") is not None:
                    graded.append(region)
                    levels.append(int(truth["level"]))
                    defect_ids.append(id(truth))
        labeled_types = {kind for _, kind, labeled in type_rows if labeled}
        if labeled_types - set(DEFECT_TYPES):
            # The dataset names its own types: injected defects count only where they match.
            type_rows = [r for r in type_rows if r[1] in labeled_types]
        types = [kind for _, kind, _ in type_rows]
        self.type_classifier_ = None
        # A dataset with one labeled defect type names every region with it.
        if len(set(types)) >= 2 or (labeled_types and len(types) >= 2):
            X = np.stack([row for row, *_ in type_rows])
            self.type_classifier_ = TypeClassifier(opts["type_confidence"], seed=opts["seed"]).fit(
                X, types
            )
        self.grader_, self.grader_report_ = self._fit_grader(graded, levels, defect_ids)
        self.validation_ = {
            "images": len(cache),
            "defective_images": int(labels.sum()),
            "regions_for_levels": len(graded),
            "regions_for_types": len(type_rows),
            "labeled_defect_images": sum(
                any(d.get("source") == "labeled" for d in s.get("defects") or []) for s, *_ in cache
            ),
            "types": sorted(set(types)),
            "image_threshold": self.image_threshold_,
            "pixel_threshold": calibrator.threshold_,
            "pixel_threshold_method": calibrator.method_,
            "fusion_choice": {
                level: self.fusion_choice(getattr(self, f"{level}_fusion_"), choose_on is not None)
                for level in ("image", "pixel")
            },
        }
        return self

    def fusion_choice(self, fusion: ScoreFusion, on_real: bool) -> dict[str, Any] | None:
        """What the ``auto`` combiner chose, the cross-validated AUROC of every candidate, with
        member names, and on which images (None for a fixed combiner)."""
        if fusion.combiner != "auto":
            return None

        def named(candidate: str) -> str:
            if candidate.startswith("member "):
                return f"{self.names[int(candidate.split()[1])]} alone"
            return candidate

        return {
            "chosen": named(fusion.chosen_),
            "chosen_on": "normal and labeled-defect images" if on_real else "all fusion images",
            "cv_auroc": {named(k): v for k, v in fusion.candidate_auroc_.items()},
        }

    def _fit_grader(self, regions: list[Region], levels: list[int], defects: list[int]):
        opts = self.options
        rules = RuleGrader(opts["semu_edges"], opts["level_rules"]).fit()
        report: dict[str, Any] = {"chosen": "rules", "regions": len(regions)}
        if opts["grader"] == "rules" or len(regions) < 10 or len(set(levels)) < 2:
            if opts["grader"] == "ordinal":
                raise ValueError(
                    f"grader=ordinal needs labeled levels: {len(regions)} matched regions with "
                    f"{len(set(levels))} distinct levels (at least 10 and 2)"
                )
            return rules, report
        y = np.asarray(levels)
        rule_accuracy = float((rules.predict(regions) == y).mean())
        # Cross-validated accuracy of the learned grader against the rules' (which learn
        # nothing): it replaces them only where it is better on defects it was not fitted on.
        # A defect's two views (detected and true region) stay in one fold, or the learner
        # would be scored on the twin of a region it learned.
        groups = np.asarray(defects)
        smallest = min(len(np.unique(groups[y == level])) for level in np.unique(y))
        ordinal_accuracy = float("nan")
        if smallest >= 2:
            splitter = StratifiedGroupKFold(
                min(5, smallest), shuffle=True, random_state=opts["seed"]
            )
            cv_predictions = np.zeros(len(y), dtype=int)
            for train, test in splitter.split(np.zeros(len(y)), y, groups):
                model = OrdinalGrader((), opts["semu_edges"], opts["level_rules"]).fit(
                    [regions[i] for i in train], y[train]
                )
                cv_predictions[test] = model.predict([regions[i] for i in test])
            ordinal_accuracy = float((cv_predictions == y).mean())
        report.update(rules_accuracy=rule_accuracy, ordinal_cv_accuracy=ordinal_accuracy)
        if opts["grader"] == "ordinal" or ordinal_accuracy > rule_accuracy:
            report["chosen"] = "ordinal"
            ordinal = OrdinalGrader((), opts["semu_edges"], opts["level_rules"])
            return ordinal.fit(regions, y), report
        return rules, report

    # --- inference --------------------------------------------------------------------------

    def regions(self, image: torch.Tensor, fused: np.ndarray) -> list[Region]:
        return find_regions(
            image.numpy(),
            fused,
            self.calibrator_.threshold_,
            self.options["pixel_pitch_mm"],
        )

    def truth_regions(
        self,
        image: torch.Tensor,
        fused: np.ndarray,
        instances: np.ndarray,
        defects: Sequence[Mapping[str, Any]],
    ) -> list[tuple[Region, Mapping[str, Any]]]:
        """Each true defect measured as a region: its mask, grown by two pixels as a detection
        would be, measured on the image like any detected region."""
        lum = luminance(image.numpy())
        instances = np.asarray(instances).reshape(fused.shape)
        out = []
        for defect in defects:
            mask = instances == int(defect["id"])
            if mask.any():
                detection = ndimage.binary_dilation(mask, iterations=2)
                region = measure_region(lum, detection, fused, self.options["pixel_pitch_mm"])
                out.append((region, defect))
        return out

    def grade_truth(
        self,
        image: np.ndarray | torch.Tensor,
        instances: np.ndarray,
        defects: Sequence[Mapping[str, Any]],
        fused: np.ndarray | None = None,
    ) -> list[tuple[Region, Mapping[str, Any]]]:
        """The grading stage on its own: type and level of each true defect's region
        (``fused``: the image's fused map, if already computed)."""
        tensor = image_tensor(image)
        if fused is None:
            fused = self.fuse_map(self.member_outputs(tensor)[1])
        pairs = self.truth_regions(tensor, fused, instances, defects)
        self.classify(tensor, [region for region, _ in pairs])
        return pairs

    def predict(
        self,
        image: np.ndarray | torch.Tensor,
        member_outputs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """``{"score", "label", "level", "regions": [Region], "anomaly_map": [H, W],
        "member_scores": {name: raw score}, "member_maps": [M, H, W]}`` for one image
        (``member_outputs``: this image's ``member_outputs``, if already computed)."""
        tensor = image_tensor(image)
        scores, maps = member_outputs or self.member_outputs(tensor)
        score = float(self.image_fusion_.transform(scores[None])[0])
        fused = self.fuse_map(maps)
        label = int(score >= self.image_threshold_)
        regions = self.regions(tensor, fused) if label else []
        if label and not regions:
            regions = self._strongest_region(tensor, fused)
        self.classify(tensor, regions)
        return {
            "score": score,
            "label": label,
            "level": max((r.level for r in regions), default=0),
            "regions": regions,
            "anomaly_map": fused,
            "member_scores": dict(zip(self.names, map(float, scores))),
            "member_maps": maps,
        }

    def _strongest_region(self, image: torch.Tensor, fused: np.ndarray) -> list[Region]:
        # The image is defective but no pixel reaches the threshold: report the region around
        # the map's maximum, above halfway between the map's median and its maximum.
        level = 0.5 * (float(np.median(fused)) + float(fused.max()))
        labels, _ = ndimage.label(fused >= level)
        peak = labels[np.unravel_index(np.argmax(fused), fused.shape)]
        found = find_regions(
            image.numpy(),
            np.where(labels == peak, fused, -np.inf),
            level,
            self.options["pixel_pitch_mm"],
        )
        return found[:1]

    def classify(self, image: torch.Tensor, regions: list[Region]) -> None:
        """Set each region's type (and confidence) and level, in place."""
        classifier: TypeClassifier | None = self.type_classifier_
        if regions and classifier is not None:
            X = self.describer(image, regions)
            proba = classifier.predict_proba(X)
            names = classifier.predict(X)
            for region, name, p in zip(regions, names, proba.max(axis=1)):
                region.type, region.type_confidence = str(name), float(p)
        for region in regions:
            region.type = region.type or UNKNOWN
        for region, level in zip(regions, self.grader_.predict(regions)):
            region.level = int(level)

    # --- persistence ------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        from artifacts.io import write_manifest

        if not hasattr(self, "grader_"):
            raise RuntimeError("the hybrid is not fitted; call fit() first")
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            for name in self.names:
                self.member_set.members[name].save(tmp / "members" / name)
            atomic_joblib_dump(
                {k: getattr(self, f"{k}_") for k in ("image_fusion", "pixel_fusion")},
                tmp / FUSION_FILE,
            )
            atomic_joblib_dump(
                {k: getattr(self, f"{k}_") for k in ("calibrator", "type_classifier", "grader")},
                tmp / GRADING_FILE,
            )
            atomic_write_json(
                tmp / HYBRID_FILE,
                {
                    "format_version": FORMAT_VERSION,
                    "members": self.names,
                    "options": self.options,
                    "image_threshold": self.image_threshold_,
                    "validation": self.validation_,
                    "grader_report": self.grader_report_,
                },
            )
            write_manifest(tmp)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Hybrid:
        """Load a saved hybrid; every file is checked against the manifest first."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: no such hybrid folder")
        verify_manifest(folder)
        try:
            meta = json.loads((folder / HYBRID_FILE).read_text())
            names, options = meta["members"], meta["options"]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(
                f"{folder / HYBRID_FILE}: not a hybrid description ({exc})"
            ) from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{folder}: hybrid format {meta.get('format_version')} unsupported")
        members = {name: load_member(folder / "members" / name) for name in names}
        hybrid = cls(members, **options)
        fitted = {
            **load_joblib_verified(folder / FUSION_FILE, folder),
            **load_joblib_verified(folder / GRADING_FILE, folder),
            **{k: meta[k] for k in ("image_threshold", "validation", "grader_report")},
        }
        for name, value in fitted.items():
            setattr(hybrid, f"{name}_", value)
        return hybrid


def image_threshold(
    fused_scores: np.ndarray,
    labels: np.ndarray,
    operating_point: str = "false_alarm",
    false_alarm_rate: float = 0.01,
) -> float:
    """The image threshold (a score at or above it is defective).

    ``false_alarm``: the lowest threshold that flags at most ``false_alarm_rate`` of the normal
    scores (with 15 normal images and a 1 % budget, none: just above the highest). ``f1``: the
    F1-optimal threshold where both classes are present (it trades false alarms for recall at
    the validation data's defect share), else the false-alarm rule."""
    if operating_point == "f1" and len(np.unique(labels)) == 2:
        metric = ImageF1MaxMetric()
        metric.update(fused_scores, labels)
        return float(metric.compute()["threshold"])
    normal = np.sort(np.asarray(fused_scores, np.float64)[np.asarray(labels) == 0])[::-1]
    if normal.size == 0:
        raise ValueError("the false-alarm operating point needs normal validation images")
    allowed = int(np.floor(false_alarm_rate * normal.size + 1e-9))  # normals it may flag
    if allowed >= normal.size:
        return float(normal[-1])
    return float(np.nextafter(normal[allowed], np.inf))


def match_regions(
    regions: Sequence[Region], instances: np.ndarray | None, defects: Sequence[Mapping[str, Any]]
) -> list[tuple[Region, Mapping[str, Any] | None]]:
    """Each region with the truth defect it overlaps most (None: a false detection)."""
    by_id = {int(d["id"]): d for d in defects}
    out = []
    for region in regions:
        truth = None
        if instances is not None:
            ids = np.asarray(instances).reshape(region.mask.shape)[region.mask]
            ids = ids[ids > 0]
            if ids.size:
                truth = by_id.get(int(np.bincount(ids).argmax()))
        out.append((region, truth))
    return out

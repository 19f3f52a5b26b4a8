"""The hybrid: fitted members, their fusion, and the grading, as one model in one folder.

``Hybrid.fit`` takes labeled validation samples (held-out normal images and defects the
synthetic injector put into copies of them, or real labeled defects) and fits, in order: the
image- and pixel-level ``ScoreFusion``, the image threshold (``grading.graders.image_threshold``:
at most ``false_alarm_rate`` of the normal validation images flagged, or F1-optimal), the pixel
threshold (``ThresholdCalibrator``), and, from the validation regions matched to their truth
(``grading.matching``), the ``TypeClassifier`` on ``grading.describer`` descriptors and the
grader (``grading.graders.fit_grader``: ``OrdinalGrader`` when labeled levels exist and it beats
the rules in cross-validation, ``RuleGrader`` otherwise).

``Hybrid.predict(image)`` takes one image of any size (float ``[H, W]`` or ``[H, W, C]`` in
[0, 1]): the members run on the image resized to their input size (backbones they share run
once, through ``MemberSet``) or tile by tile at full resolution; the fused map is brought to the
image's resolution, and regions are found and measured on the original image.

A saved hybrid (``save``/``load``) is a folder: ``hybrid.json``, ``members/<name>/``,
``fusion.joblib``, ``grading.joblib`` and a SHA-256 manifest of all of them, checked before
anything is unpickled (``fusion.persistence``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.base import BaseEstimator, clone

from data.images import IntensityWindow, LazyImage, size_pair, to_tensor
from data.maps import MapOnDisk, band_rows
from fusion.combiners import CHOOSING, ScoreFusion
from fusion.persistence import FITTED_STATE, read_hybrid, save_hybrid
from grading.describer import RegionDescriber
from grading.graders import (
    GRADERS,
    OPERATING_POINTS,
    UNKNOWN,
    ThresholdCalibrator,
    TypeClassifier,
    fit_grader,
    image_threshold,
)
from grading.matching import match_regions, truth_regions
from grading.regions import Region, find_regions
from graphs.runtime import RUNTIMES, export_id, exported_member_set
from graphs.specs import ExportError
from members.base import Member
from members.member_set import MemberSet
from metrics.severity import DEFECT_TYPES
from tiling.visualize import Decision

# A panel shrunk more than this many times to the members' input is said to lose small defects.
SHRINK_WARNING_FACTOR = 4


@dataclass
class Prediction:
    """One image's result (``Hybrid.predict``, ``Hybrid.predict_batch``).

    Attributes:
        score: the fused image score.
        label: 1 where ``score`` reaches the image threshold (defective), else 0.
        level: the highest severity level of its regions (0 without any).
        regions: the defect regions found, each with its type and level.
        anomaly_map: the fused map ``[H, W]`` at the image's resolution (a ``MapOnDisk`` with a
            map folder).
        member_scores: each member's raw image score, by name.
        member_maps: the member maps ``[M, H, W]`` at the image's resolution, or None where
            left out.
        warning: ``Hybrid.shrink_warning`` of the image, or None.
        pixel_threshold: the fused map's threshold the regions were found at.
    """

    score: float
    label: int
    level: int
    regions: list[Region]
    anomaly_map: np.ndarray | MapOnDisk
    member_scores: dict[str, float]
    member_maps: np.ndarray | MemberMaps | None
    warning: str | None
    pixel_threshold: float

    def decision(self, truth: Any = None) -> Decision:
        """What this result's overlay draws (``tiling.Decision``): the pixel threshold's
        contour, each region's box labelled with its type and level, and ``truth`` (the true
        mask, in evaluation) as an outline."""
        boxes = [(region.bbox, region.label) for region in self.regions]
        return Decision(self.pixel_threshold, boxes, truth)


class Hybrid(BaseEstimator):
    """See the module docstring.

    Fitted state (after ``fit`` or ``load``): ``selected_`` (the members the fusion weighs,
    ``fused_names``: a ``forward`` fusion may leave some out, and only these are saved),
    ``image_fusion_`` and ``pixel_fusion_`` (``ScoreFusion`` of the selected members),
    ``image_threshold_``, ``calibrator_`` (its ``threshold_`` is the pixel
    threshold), ``type_classifier_`` (None with fewer than two types), ``grader_``,
    ``grader_report_`` (the grader choice) and ``validation_`` (what it was fitted on).

    Args:
        members: fitted members by name.
        image_size: side (square) or [height, width] the members take (images are resized
            to it), or None with tiling.
        tiling: the tiling section (``enabled``, ``tile_size``, ``stride``, ...) or None.
        combiner, normalizer, learner: image- and pixel-level ``ScoreFusion`` options.
        pixel_combiner: the pixel maps' combiner (None: ``combiner``), e.g. ``auto`` for
            pixels, where there is plenty to choose on, beside ``rank`` for the few images.
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
        pixel_combiner: str | None = None,
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
        # Stored as given (scikit-learn's convention: get_params and clone read them back).
        self.members = members
        self.image_size = image_size
        self.tiling = tiling
        self.combiner = combiner
        self.pixel_combiner = pixel_combiner
        self.normalizer = normalizer
        self.learner = learner
        self.grader = grader
        self.level_rules = level_rules
        self.semu_edges = semu_edges
        self.type_confidence = type_confidence
        self.pixel_pitch_mm = pixel_pitch_mm
        self.describer_backbone = describer_backbone
        self.weights_dir = weights_dir
        self.pixel_samples = pixel_samples
        # The members' intensity window (data.images.IntensityWindow.to_dict), fitted on their
        # training images; predict_batch applies it to every image it is given.
        self.intensity = intensity
        self.operating_point = operating_point
        self.false_alarm_rate = false_alarm_rate
        self.pixel_threshold = pixel_threshold
        self.seed = seed
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
        # What runs the members: a MemberSet (PyTorch, backbones shared) or an exported one.
        self.member_set = MemberSet(dict(members))
        self.describer = RegionDescriber(describer_backbone, weights_dir=weights_dir)

    def set_params(self, **params: Any) -> Hybrid:
        """scikit-learn's ``set_params``, but for ``members`` and the describer's parameters,
        which build the member set and the describer: those only a new Hybrid takes."""
        fixed = {"members", "describer_backbone", "weights_dir"} & set(params)
        if fixed:
            raise ValueError(f"{sorted(fixed)} can only be set by constructing a new Hybrid")
        return super().set_params(**params)

    @property
    def tiling_options(self) -> dict[str, Any] | None:
        """The tiling section where tiling is enabled, else None."""
        return dict(self.tiling) if self.tiling and self.tiling.get("enabled") else None

    @property
    def intensity_window(self) -> IntensityWindow:
        """The intensity window the members were trained with (fitted on their training
        images), never one fitted on the images predicted. Hybrids saved without one: integers
        / their type's maximum."""
        return IntensityWindow.from_dict(self.intensity) if self.intensity else IntensityWindow()

    @property
    def names(self) -> list[str]:
        return self.member_set.names

    # --- members ----------------------------------------------------------------------------

    def member_outputs(
        self,
        image: torch.Tensor | LazyImage,
        at_image_size: bool = True,
        map_folder: str | Path | None = None,
    ) -> tuple[np.ndarray, np.ndarray | MemberMaps]:
        """Member scores ``[M]`` (float64) and maps ``[M, H, W]`` (float32) at the image's
        resolution; with ``at_image_size=False`` the maps of a resizing hybrid stay at the
        members' resolution (``fuse_map`` brings them to the image's band by band: a panel's
        full-size member maps would be gigabytes). A tiled hybrid reads a ``LazyImage`` tile by
        tile and, with ``map_folder``, writes its maps there (``MemberMaps`` of ``MapOnDisk``)."""
        tiling = self.tiling_options
        if tiling:
            from tiling import infer_tiled, infer_tiled_options

            # Every member sees each tile batch; shared backbones run once per batch.
            out = infer_tiled(
                self.member_set,
                image if isinstance(image, LazyImage) else _image_tensor(image),
                **infer_tiled_options(tiling),
                map_folder=map_folder,
            )
            maps = out["anomaly_map"]
            maps = maps if isinstance(maps, np.ndarray) else MemberMaps(maps)
            return np.atleast_1d(out["pred_score"]).astype(np.float64), maps
        return self.member_outputs_batch([image], at_image_size)[0]

    def member_outputs_batch(
        self,
        images: Sequence[np.ndarray | torch.Tensor | LazyImage],
        at_image_size: bool = True,
        map_folder: str | Path | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray | MemberMaps]]:
        """``member_outputs`` of several images, those of one member input size in one batch
        through the members (a shared backbone once per batch). Tiled hybrids run image by
        image (each image's tiles are their batches)."""
        if self.tiling_options:
            return [self.member_outputs(image, at_image_size, map_folder) for image in images]
        tensors = [_image_tensor(image) for image in images]
        inputs = self.member_inputs(tensors)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, batch in enumerate(inputs):
            groups.setdefault(tuple(batch.shape), []).append(k)
        outputs: list = [None] * len(images)
        for indices in groups.values():
            batch = torch.cat([inputs[k] for k in indices]).to(self.member_set.device)
            scores, maps = self.member_set(batch)
            scores, maps = scores.cpu(), maps.float().cpu()
            for row, k in enumerate(indices):
                height, width = tensors[k].shape[-2:]
                image_maps = maps[row : row + 1]
                if at_image_size and image_maps.shape[-2:] != (height, width):
                    image_maps = F.interpolate(image_maps, size=(height, width), mode="bilinear")
                # float32 as the members computed them: a float64 copy of every map doubles what an
                # ensemble holds in memory and adds no precision.
                outputs[k] = (scores[row].double().numpy(), image_maps[0].numpy())
        return outputs

    def member_outputs_many(
        self,
        images: Iterable[np.ndarray | torch.Tensor],
        batch_size: int = 4,
        progress: bool = False,
        desc: str = "members",
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``member_outputs`` of many images (at their own size), ``batch_size`` at a time
        through ``member_outputs_batch``, with a progress bar when ``progress``."""
        from tqdm.auto import tqdm

        images = list(images)
        outputs: list[tuple[np.ndarray, np.ndarray]] = []
        with tqdm(total=len(images), desc=desc, disable=not progress) as bar:
            for start in range(0, len(images), max(1, batch_size)):
                chunk = images[start : start + max(1, batch_size)]
                outputs += self.member_outputs_batch(chunk)
                bar.update(len(chunk))
        return outputs

    def member_inputs(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Each image as the members take it: ``[1, 3, h, w]`` float32 at the members' input
        size (its own where none is set). Images: ``[H, W]`` or ``[H, W, C]`` arrays or
        ``[C, H, W]`` tensors; a grey one is resized once and seen as three channels."""
        size = size_pair(self.image_size)
        inputs = []
        for image in images:
            batch = _image_tensor(image)[None]
            if size is not None and tuple(batch.shape[-2:]) != size:
                source = batch[:, :1] if batch.stride(1) == 0 else batch
                resized = F.interpolate(source, size=size, mode="bilinear", antialias=True)
                batch = resized.expand(-1, 3, -1, -1)
            inputs.append(batch.contiguous())
        return inputs

    def shrink_warning(self, shape: Sequence[int]) -> str | None:
        """What a panel of ``shape`` (height, width, ...) loses to this hybrid, where it is shrunk
        by more than ``SHRINK_WARNING_FACTOR`` to the members' input (a hybrid that neither
        tiles nor keeps native size); None where it is not."""
        size = size_pair(self.image_size)
        if self.tiling_options or size is None:
            return None
        factor = max(shape[0] / size[0], shape[1] / size[1])
        if factor <= SHRINK_WARNING_FACTOR:
            return None
        return (
            f"the panel ({shape[1]} x {shape[0]} px) is shrunk {factor:.1f}x to the members' "
            f"{size[1]} x {size[0]} px input: defects smaller than about {math.ceil(factor)} px "
            "fall below one pixel and can be lost; for panels this size build a tiled hybrid "
            "(pipelines.benchmark and pipelines.ensemble with --config "
            "configs/datasets/highres.yaml)"
        )

    def run_members_with(self, member_set: MemberSet) -> Hybrid:
        """Run the members through ``member_set`` from now on (``deploy``'s ONNX Runtime set, for
        one): the same members in the same order; fusion and grading are unchanged."""
        if list(member_set.names) != self.names:
            raise ValueError(
                f"the member set runs {list(member_set.names)}; this hybrid's members are "
                f"{self.names}"
            )
        self.member_set = member_set
        return self

    # --- fusion -----------------------------------------------------------------------------

    def fuse_map(
        self,
        maps: np.ndarray,
        shape: tuple[int, int] | None = None,
        rows_per_chunk: int | None = None,
        out: np.ndarray | MapOnDisk | None = None,
        fusion: ScoreFusion | None = None,
    ) -> np.ndarray | MapOnDisk:
        """Fused ``[H, W]`` map of member maps ``[M, h, w]``, in row chunks (bounded memory;
        ``rows_per_chunk`` None: ``data.maps.band_rows``, as many pixels per chunk for a
        wide panel as for a narrow image), written into ``out`` (a new array by default; a
        ``MapOnDisk`` keeps it out of memory). Maps of another size than ``shape`` (default:
        their own) are resized bilinearly chunk by chunk, as ``F.interpolate(...,
        mode="bilinear")`` resizes them whole (to float32 rounding). ``fusion``: another pixel
        fusion of the same members (default: ``pixel_fusion_``)."""
        fusion = self.pixel_fusion_ if fusion is None else fusion
        columns = self.fused_columns(maps.shape[0])
        m = len(self.fused_names)
        height, width = shape or maps.shape[-2:]
        rows_per_chunk = rows_per_chunk or band_rows(width)
        resize = (height, width) != tuple(maps.shape[-2:])
        if resize:
            rows = _bilinear_taps(maps.shape[-2], height)
            cols = _bilinear_taps(maps.shape[-1], width)
            maps = np.asarray(maps[columns], dtype=np.float32)
            columns = slice(None)
        out = np.empty((height, width), np.float32) if out is None else out
        if tuple(out.shape) != (height, width):
            raise ValueError(f"fuse_map: out is {tuple(out.shape)}, the map {(height, width)}")
        for start in range(0, height, rows_per_chunk):
            stop = min(start + rows_per_chunk, height)
            if resize:
                block = _resize_rows(maps, rows, cols, start, stop)
            else:  # only this band of the fused members' maps is copied
                block = maps[columns, start:stop]
            out[start:stop] = fusion.transform(block.reshape(m, -1).T).reshape(-1, width)
        return out

    @property
    def fused_names(self) -> list[str]:
        """The members the fitted fusion weighs (``selected_``): all of them, but where a
        ``forward`` fusion left some out; only these are saved."""
        return list(getattr(self, "selected_", None) or self.names)

    def _output_names(self, rows: int) -> list[str]:
        return self.names if rows == len(self.names) else self.fused_names

    def fused_columns(self, rows: int) -> list[int] | slice:
        """Which of ``rows`` member outputs the fusion reads: member outputs come for every
        member of ``names`` (of which it reads ``fused_names``), or for the fused ones only."""
        fused = self.fused_names
        if rows == len(fused):
            return slice(None)
        if rows != len(self.names):
            raise ValueError(
                f"{rows} member outputs for a hybrid of {len(self.names)} members "
                f"({', '.join(self.names)})"
            )
        return [self.names.index(name) for name in fused]

    def fit(self, samples: Iterable[Mapping[str, Any]], progress: bool = False) -> Hybrid:
        """Fit fusion and grading on validation samples: dicts with ``image`` (``[H, W]`` or
        ``[H, W, C]`` float array or ``[C, H, W]`` tensor), ``mask`` ``[H, W]`` (or None for a
        normal image), ``label``, and for defective images ``instances`` (``[H, W]`` ids) and
        ``defects`` (truth dicts with ``id``, ``type``, ``level``). Samples with ``split`` =
        ``"test"`` (a labeled split's images, under cross-validation) train everything but the
        pixel normalizers, which come from the others where at least two of them are normal.
        ``answered_apart``: the members whose answer on a sample comes from another model than
        the one this hybrid scores with (a nested cross-validation's supervised head trained
        without that sample's fold): those answers are not part of that member's normal
        reference for image scores."""
        data = self._validation_data(list(samples), progress)
        fusions = self._fit_fusion(data)
        fused_maps = self._fit_thresholds(data)
        examples = self._grading_examples(data, fused_maps)
        self._fit_grading(examples)
        self.validation_ = self._validation_summary(data, examples, fusions)
        return self

    def _validation_data(self, samples: list[Mapping[str, Any]], progress: bool) -> _Validation:
        """The samples with their member outputs (computed in batches where not given) and
        masks, and what the fits read of them."""
        missing = [s for s in samples if s.get("member_outputs") is None]
        computed = iter(
            self.member_outputs_many(
                (to_tensor(s["image"]) for s in missing), progress=progress, desc="validation"
            )
            if missing
            else ()
        )
        data = _Validation()
        for sample in samples:
            outputs = sample.get("member_outputs")
            outputs = next(computed) if outputs is None else outputs
            scores, maps = outputs() if callable(outputs) else outputs
            mask = sample.get("mask")
            if mask is not None:
                mask = np.asarray(mask, bool).reshape(maps.shape[1:])
            elif not sample["label"]:
                mask = np.zeros(maps.shape[1:], bool)
            # else: a labeled defect whose mask is unknown (None) teaches image scores only.
            data.add(sample, to_tensor(sample["image"]), scores, maps, mask)
        if not data.samples:
            raise ValueError("fitting a hybrid needs validation samples")
        return data.finish(self.names)

    def _fit_fusion(self, data: _Validation) -> dict[str, ScoreFusion]:
        """The image and pixel fusions; members neither weighs are left out of the hybrid
        (``selected_``). Returns both as fitted on every member, for the selection report."""
        fusion = ScoreFusion(self.combiner, self.normalizer, None, self.learner, self.seed)
        self.selected_ = None
        image_fusion = clone(fusion).fit(
            data.scores, data.labels, data.groups, data.choose_on, data.image_reference
        )
        rows, labels, images, regions = sample_pixel_rows(
            ((data.maps[k], data.masks[k]) for k in data.masked),
            self.pixel_samples,
            np.random.default_rng(self.seed),
        )
        images = data.masked[images]
        pixel_fusion = clone(fusion).set_params(combiner=self.pixel_combiner or self.combiner)
        pixel_fusion.fit(
            rows,
            labels,
            data.groups[images],
            None if data.choose_on is None else data.choose_on[images],
            data.held_out[images],
            regions,
        )
        used = np.zeros(len(self.names), bool)
        for fitted in (image_fusion, pixel_fusion):
            used |= getattr(fitted, "used_members_", np.ones(len(self.names), bool))
        columns = np.flatnonzero(used)
        self.image_fusion_ = image_fusion.restricted(columns)
        self.pixel_fusion_ = pixel_fusion.restricted(columns)
        self.selected_ = [self.names[c] for c in columns]
        return {"image": image_fusion, "pixel": pixel_fusion}

    def _fit_thresholds(self, data: _Validation) -> list[np.ndarray]:
        """The image threshold on the fused scores and the pixel threshold on the fused maps of
        the images with a mask; returns every image's fused map."""
        scores = data.scores[:, self.fused_columns(len(self.names))]
        fused_scores = self.image_fusion_.transform(scores)
        self.image_threshold_ = image_threshold(
            fused_scores, data.labels, self.operating_point, self.false_alarm_rate
        )
        fused_maps = [self.fuse_map(maps) for maps in data.maps]
        self.calibrator_ = ThresholdCalibrator(self.pixel_threshold).fit(
            [fused_maps[k] for k in data.masked], [data.masks[k] for k in data.masked]
        )
        return fused_maps

    def _grading_examples(self, data: _Validation, fused_maps: list[np.ndarray]) -> _Examples:
        """Grading learns from two views of every known defect: the region the detector found
        (what it sees in use) and the region of the true mask (clean, and present even where
        detection missed it). Levels come from defects that have one."""
        examples = _Examples()
        for sample, image, fused in zip(data.samples, data.images, fused_maps):
            if not sample.get("defects"):
                continue
            instances, defects = sample["instances"], sample["defects"]
            pairs = match_regions(self.regions(image, fused), instances, defects)
            pairs += truth_regions(image.numpy(), fused, instances, defects, self.pixel_pitch_mm)
            pairs = [(region, truth) for region, truth in pairs if truth is not None]
            if not pairs:
                continue
            descriptors = self.describer(image, [region for region, _ in pairs])
            for (region, truth), row in zip(pairs, descriptors):
                region.type = truth["type"]
                examples.add(region, truth, row)
        return examples.finish()

    def _fit_grading(self, examples: _Examples) -> None:
        """The type classifier (None with fewer than two types, but where the dataset's one
        labeled type names every region) and the grader."""
        self.type_classifier_ = None
        types = examples.types
        if len(set(types)) >= 2 or (examples.labeled_types and len(types) >= 2):
            classifier = TypeClassifier(self.type_confidence, seed=self.seed)
            self.type_classifier_ = classifier.fit(examples.descriptors(), types)
        self.grader_, self.grader_report_ = fit_grader(
            examples.graded,
            examples.levels,
            examples.defect_ids,
            grader=self.grader,
            semu_edges=self.semu_edges,
            rules=self.level_rules,
            seed=self.seed,
        )

    def _validation_summary(
        self, data: _Validation, examples: _Examples, fusions: Mapping[str, ScoreFusion]
    ) -> dict[str, Any]:
        """What the hybrid was fitted on and what it chose (``validation_``)."""
        on_real = data.choose_on is not None
        return {
            "images": len(data.samples),
            "defective_images": int(data.labels.sum()),
            "regions_for_levels": len(examples.graded),
            "regions_for_types": len(examples.type_rows),
            "labeled_defect_images": sum(
                any(d.get("source") == "labeled" for d in s.get("defects") or [])
                for s in data.samples
            ),
            "types": sorted(set(examples.types)),
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.calibrator_.threshold_,
            "pixel_threshold_method": self.calibrator_.method_,
            "fusion_choice": {
                level: self.fusion_choice(getattr(self, f"{level}_fusion_"), on_real)
                for level in ("image", "pixel")
            },
            "member_selection": self.member_selection(fusions, on_real),
        }

    def member_selection(
        self, fusions: Mapping[str, ScoreFusion], on_real: bool
    ) -> dict[str, Any] | None:
        """What ``forward`` selection did at each level, with member names: the members kept
        and their weights, each step (the member that entered, its weight then and the
        cross-validated figure after it), each member's figure alone and the best figure each
        member left out would have given; and on which images (None without ``forward``)."""
        levels = {k: f for k, f in fusions.items() if f.combiner == "forward"}
        if not levels:
            return None
        out: dict[str, Any] = {
            "kept": self.fused_names,
            "chosen_on": "normal and labeled-defect images" if on_real else "all fusion images",
        }
        for level, fusion in levels.items():
            steps = []
            for step in fusion.selection_:
                named = {**step, "member": self.names[step["member"]]}
                for key in ("alone", "not_entered"):
                    if key in step:
                        named[key] = {self.names[m]: v for m, v in step[key].items()}
                steps.append(named)
            shares = fusion.entered_share_
            out[level] = {
                "weights": {
                    name: float(w) for name, w in zip(self.names, fusion.weights_) if w > 0
                },
                "chosen_by": "AUROC" if level == "image" else "mean of pixel AUROC and AUPRO",
                # On every row: the path the draws are bagged around.
                "steps": steps,
                # The share of bootstrap draws each member entered (None: not bagged).
                "entered_share": None
                if shares is None
                else {name: float(v) for name, v in zip(self.names, shares)},
            }
        return out

    def fusion_choice(self, fusion: ScoreFusion, on_real: bool) -> dict[str, Any] | None:
        """What a choosing combiner (``auto``, ``rank_or_member``) chose, the cross-validated
        AUROC (and, for pixels, AUPRO) of every candidate, with member names, and on which
        images (None for a fixed combiner)."""
        if fusion.combiner not in CHOOSING:
            return None

        def named(candidate: str) -> str:
            if candidate.startswith("member "):
                return f"{self.names[int(candidate.split()[1])]} alone"
            return candidate

        return {
            "chosen": named(fusion.chosen_),
            "chosen_on": "normal and labeled-defect images" if on_real else "all fusion images",
            "chosen_by": (
                "mean of AUROC and AUPRO"
                if fusion.candidate_aupro_
                else "AUROC"
                if fusion.candidate_auroc_
                else "nothing to choose on (one class): rank"
            ),
            "cv_auroc": {named(k): v for k, v in fusion.candidate_auroc_.items()},
            "cv_aupro": {named(k): v for k, v in fusion.candidate_aupro_.items()},
        }

    # --- inference --------------------------------------------------------------------------

    def regions(
        self, image: torch.Tensor | LazyImage, fused: np.ndarray | MapOnDisk
    ) -> list[Region]:
        return find_regions(
            _regions_image(image),
            fused,
            self.calibrator_.threshold_,
            self.pixel_pitch_mm,
        )

    def grade_truth(
        self,
        image: np.ndarray | torch.Tensor,
        instances: np.ndarray,
        defects: Sequence[Mapping[str, Any]],
        fused: np.ndarray | None = None,
    ) -> list[tuple[Region, Mapping[str, Any]]]:
        """The grading stage on its own: type and level of each true defect's region
        (``fused``: the image's fused map, if already computed)."""
        tensor = _image_tensor(image)
        if fused is None:
            fused = self.fuse_map(self.member_outputs(tensor)[1])
        pairs = truth_regions(tensor.numpy(), fused, instances, defects, self.pixel_pitch_mm)
        self.classify(tensor, [region for region, _ in pairs])
        return pairs

    def predict(
        self,
        image: np.ndarray | torch.Tensor | LazyImage,
        member_outputs: tuple[np.ndarray, np.ndarray] | None = None,
        member_maps: bool = True,
        map_folder: str | Path | None = None,
    ) -> Prediction:
        """One image's ``Prediction`` (``member_outputs``: this image's ``member_outputs``, if
        already computed). The image is the members' input as it is (float ``[H, W]`` or
        ``[H, W, C]`` in [0, 1], a ``[C, H, W]`` tensor, or a ``LazyImage``, converted window by
        window); ``predict_batch`` takes images as their files hold them.
        ``member_maps=False`` keeps the member maps at the members' resolution and leaves them
        out (``None``): what predict does, so that a full panel's memory stays bounded. With
        ``map_folder``, the fused map is a ``MapOnDisk`` in a temporary file there, written and
        read a band at a time (close it when done), not an array in memory."""
        # A LazyImage stays one: regions and crops convert only the windows they read.
        view = image if isinstance(image, LazyImage) else _image_tensor(image)
        if member_outputs is None:
            member_outputs = self.member_outputs(_image_tensor(view), at_image_size=member_maps)
        scores, maps = member_outputs
        fused_scores = np.asarray(scores)[self.fused_columns(len(scores))]
        score = float(self.image_fusion_.transform(fused_scores[None])[0])
        shape = tuple(view.shape[:2] if isinstance(view, LazyImage) else view.shape[-2:])
        out = None if map_folder is None else MapOnDisk(shape, map_folder)
        fused = self.fuse_map(maps, shape, out=out)
        label = int(score >= self.image_threshold_)
        regions = self.regions(view, fused) if label else []
        if label and not regions:
            regions = self._strongest_region(view, fused)
        self.classify(view, regions)
        return Prediction(
            score=score,
            label=label,
            level=max((r.level for r in regions), default=0),
            regions=regions,
            anomaly_map=fused,
            member_scores=dict(zip(self._output_names(len(scores)), map(float, scores))),
            member_maps=maps if member_maps else None,
            warning=self.shrink_warning(shape),
            pixel_threshold=float(self.calibrator_.threshold_),
        )

    def predict_batch(
        self, images: Sequence[np.ndarray], map_folder: str | Path | None = None
    ) -> Iterator[Prediction | Exception]:
        """Each of ``images``, as their files hold them (``[H, W]`` or ``[H, W, C]``, integers or
        floats), predicted in order and yielded as soon as it is done.

        The hybrid's intensity window (``intensity_window``) is applied window by window, so an
        image stays in its file's dtype; the members see the whole batch at once (a shared
        backbone once per batch; a tiled hybrid tile batch by tile batch, its member maps in
        ``map_folder``), then each image is fused and graded at its own resolution. Member maps
        are left out (see ``predict``); with ``map_folder`` each fused map is a ``MapOnDisk``
        there (close it when done: ``with prediction.anomaly_map: ...``). An image that cannot
        be predicted yields its error (a ``ValueError`` or ``RuntimeError``) in its place, and
        the others go on."""
        window = self.intensity_window
        prepared = [LazyImage(image, window) for image in images]
        outputs = self._member_outputs_apart(prepared, map_folder)
        for image, output in zip(prepared, outputs):
            if not isinstance(output, Exception):
                try:
                    output = self.predict(image, output, member_maps=False, map_folder=map_folder)
                except (ValueError, RuntimeError) as exc:
                    output = exc
            yield output

    def _member_outputs_apart(
        self, images: list[LazyImage], map_folder: str | Path | None
    ) -> list[tuple[np.ndarray, np.ndarray | MemberMaps] | Exception]:
        """Each image's member outputs at the members' resolution, in one batched pass; where
        that fails, image by image, so that one bad image gets its own error and the others go
        on."""
        try:
            return self.member_outputs_batch(images, False, map_folder)
        except (ValueError, RuntimeError):
            found: list = []
            for image in images:
                try:
                    found += self.member_outputs_batch([image], False, map_folder)
                except (ValueError, RuntimeError) as exc:
                    found.append(exc)
            return found

    def without(
        self, name: str, member_outputs: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]
    ) -> tuple[float, np.ndarray] | None:
        """The fused score and map of an image without member ``name`` (its weight 0 in a
        ``forward`` fusion, the others renormalized), from the image's ``member_outputs``:
        what the member adds. None where the fusion does not weigh it, or weighs it alone."""
        if name not in self.fused_names:
            return None
        column = self.fused_names.index(name)
        image_fusion = self.image_fusion_.without(column)
        pixel_fusion = self.pixel_fusion_.without(column)
        if image_fusion is None and pixel_fusion is None:
            return None
        scores, maps = member_outputs
        fused_scores = np.asarray(scores)[self.fused_columns(len(scores))][None]
        score = float((image_fusion or self.image_fusion_).transform(fused_scores)[0])
        return score, self.fuse_map(maps, shape, fusion=pixel_fusion or self.pixel_fusion_)

    def _strongest_region(
        self, image: torch.Tensor | LazyImage, fused: np.ndarray | MapOnDisk
    ) -> list[Region]:
        # The image is defective but no pixel reaches the threshold: report the region around
        # the map's maximum, above halfway between the map's median and its maximum (a map on
        # disk is read whole for it: the median needs every value).
        fused = np.asarray(fused)
        level = 0.5 * (float(np.median(fused)) + float(fused.max()))
        labels, _ = ndimage.label(fused >= level)
        peak = labels[np.unravel_index(np.argmax(fused), fused.shape)]
        found = find_regions(
            _regions_image(image),
            np.where(labels == peak, fused, -np.inf),
            level,
            self.pixel_pitch_mm,
        )
        return found[:1]

    def classify(self, image: torch.Tensor | LazyImage, regions: list[Region]) -> None:
        """Set each region's type (and confidence) and level, in place."""
        classifier: TypeClassifier | None = self.type_classifier_
        if regions and classifier is not None:
            X = self.describer(image, regions)
            proba = classifier.predict_proba(X)
            names = classifier.names_from_proba(proba)
            for region, name, p in zip(regions, names, proba.max(axis=1)):
                region.type, region.type_confidence = str(name), float(p)
        for region in regions:
            region.type = region.type or UNKNOWN
        for region, level in zip(regions, self.grader_.predict(regions)):
            region.level = int(level)

    # --- persistence ------------------------------------------------------------------------

    def fitted_state(self) -> dict[str, Any]:
        """What ``fit`` learned, by name without the trailing underscore (``FITTED_STATE``):
        fusion and grading only, never the members."""
        if not hasattr(self, "grader_"):
            raise RuntimeError("the hybrid is not fitted; call fit() first")
        return {name: getattr(self, f"{name}_") for name in FITTED_STATE}

    def set_fitted_state(self, fitted: Mapping[str, Any]) -> Hybrid:
        """Take the fitted state ``fitted_state`` gave (of a hybrid of the same members)."""
        for name, value in fitted.items():
            setattr(self, f"{name}_", value)
        return self

    def save(self, folder: str | Path) -> Path:
        """Save to a hybrid folder (``fusion.persistence``)."""
        members = {name: self.member_set.members[name] for name in self.fused_names}
        options = {k: v for k, v in self.get_params().items() if k != "members"}
        return save_hybrid(folder, members, options, self.fitted_state())

    @classmethod
    def load(
        cls, folder: str | Path, device: str | torch.device = "cpu", runtime: str = "torch"
    ) -> Hybrid:
        """The hybrid saved in ``folder``, the one way to load one. Each file is checked
        against the manifest once, as it is read. ``runtime``: ``torch`` runs the members with
        PyTorch on ``device``; ``onnx`` / ``openvino`` run their export in that format
        (``pipelines.export``) under ONNX Runtime / OpenVINO Runtime on the CPU
        (``graphs.runtime``), refused with the reason where it is missing, changed or another
        hybrid's. Fusion and grading run on the CPU.

        Set on the loaded hybrid: ``folder_``, ``runtime_`` and ``model_id_``, what its results
        record as the model that made them: the hybrid's identity (its manifest's SHA-256) and,
        for an exported runtime, the export's, so results of two runtimes (equal only within
        the export's tolerance) never mix in one output folder."""
        if runtime not in RUNTIMES:
            raise ExportError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
        saved = read_hybrid(folder, device if runtime == "torch" else "cpu")
        hybrid = cls(saved.members, **saved.options).set_fitted_state(saved.fitted)
        hybrid.folder_, hybrid.runtime_, hybrid.model_id_ = Path(folder), runtime, saved.identity
        if runtime != "torch":
            hybrid.run_members_with(exported_member_set(folder, runtime, hybrid.member_set))
            hybrid.model_id_ += f"+{runtime}:{export_id(folder, runtime)}"
        return hybrid


class _Validation:
    """A hybrid fit's validation images: each sample with its image, member outputs and mask
    (None: a labeled defect whose mask is unknown), then (``finish``) what the fits read."""

    def __init__(self) -> None:
        self.samples: list[Mapping[str, Any]] = []
        self.images: list[torch.Tensor] = []
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray | None] = []
        self._scores: list[np.ndarray] = []

    def add(
        self,
        sample: Mapping[str, Any],
        image: torch.Tensor,
        scores: np.ndarray,
        maps: np.ndarray,
        mask: np.ndarray | None,
    ) -> None:
        self.samples.append(sample)
        self.images.append(image)
        self._scores.append(np.asarray(scores))
        self.maps.append(maps)
        self.masks.append(mask)

    def finish(self, names: Sequence[str]) -> _Validation:
        samples = self.samples
        self.labels = np.array([int(s["label"]) for s in samples])
        self.scores = np.stack(self._scores)
        self.masked = np.array([k for k, m in enumerate(self.masks) if m is not None], dtype=int)
        # Cross-validation inside the fit keeps the images of one part (or one held-out image
        # and its injected copies) in one fold.
        self.groups = np.array([str(s.get("group", f"image-{k}")) for k, s in enumerate(samples)])
        # Where real labeled defects exist, choosing combiners choose on real images only
        # (normal ones and those): injected defects can rank members unlike real ones do.
        real = np.array(
            [
                not s.get("defects") or any(d.get("source") == "labeled" for d in s["defects"])
                for s in samples
            ]
        )
        self.choose_on = real if real[self.labels == 1].any() else None
        # Pixel normalizers come from the held-out images (and their injected copies), not from
        # a labeled test split's images: every cross-validation fold's hybrid then maps pixels
        # alike (a member chosen alone ranks pooled out-of-fold pixels as the member does), and
        # a few held-out images give thousands of normal pixels. An image is one row of the
        # image normalizer: there every normal image counts, but for a member's answers from
        # another model than the hybrid's own (a nested head), whose scale its own need not
        # share: each fold's head is then ranked against its own answers on the held-out images.
        self.held_out = np.array([s.get("split") != "test" for s in samples])
        if (self.labels[self.held_out] == 0).sum() < 2:
            self.held_out[:] = True
        apart = [set(s.get("answered_apart") or ()) for s in samples]
        self.image_reference = None
        if any(apart):
            reference = np.array([[name not in a for name in names] for a in apart])
            # A member with fewer than 2 normal images of its own is ranked against them all.
            reference[:, (reference[self.labels == 0].sum(axis=0) < 2)] = True
            self.image_reference = reference
        return self


class _Examples:
    """The grading's examples: each defect region with its truth and descriptor row."""

    def __init__(self) -> None:
        self.graded: list[Region] = []
        self.levels: list[int] = []
        self.defect_ids: list[int] = []
        # (descriptor row, type name, from a labeled defect)
        self.type_rows: list[tuple[np.ndarray, str, bool]] = []

    def add(self, region: Region, truth: Mapping[str, Any], row: np.ndarray) -> None:
        self.type_rows.append((row, str(truth["type"]), truth.get("source") == "labeled"))
        if truth.get("level") is not None:
            self.graded.append(region)
            self.levels.append(int(truth["level"]))
            self.defect_ids.append(id(truth))

    def finish(self) -> _Examples:
        self.labeled_types = {kind for _, kind, labeled in self.type_rows if labeled}
        if self.labeled_types - set(DEFECT_TYPES):
            # The dataset names its own types: injected defects count only where they match.
            self.type_rows = [r for r in self.type_rows if r[1] in self.labeled_types]
        self.types = [kind for _, kind, _ in self.type_rows]
        return self

    def descriptors(self) -> np.ndarray:
        return np.stack([row for row, *_ in self.type_rows])


class MemberMaps:
    """Member maps ``[M, H, W]`` held as one array per member (or one ``MapOnDisk``: a tiled
    panel's), so that a member's map can be added to others without copying them (a panel's
    maps are large). It answers what fusion asks of an array of maps: ``shape``, ``len``,
    iteration, a member's map (``maps[m]``) and a stacked block of some members' rows
    (``maps[members, rows]``)."""

    def __init__(self, maps: Iterable[np.ndarray | MapOnDisk]) -> None:
        self.maps = list(maps)
        shapes = {m.shape for m in self.maps}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"member maps must be [H, W] arrays of one size, got {shapes}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.maps), *self.maps[0].shape)

    def __len__(self) -> int:
        return len(self.maps)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.maps)

    def __getitem__(self, key: Any) -> np.ndarray:
        members, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rest = rest[0] if len(rest) == 1 else rest  # a MapOnDisk takes rows, or rows and columns
        if isinstance(members, (int, np.integer)):
            return self.maps[members][rest]
        if isinstance(members, slice):
            return np.stack([m[rest] for m in self.maps[members]])
        return np.stack([self.maps[m][rest] for m in members])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        stacked = np.stack(self.maps)
        return stacked if dtype is None else stacked.astype(dtype)


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the second one's weight of a bilinear
    resize with half-pixel centres (``align_corners=False``), in float32 as torch computes it."""
    scale = np.float32(size_in / size_out)
    source = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + 0.5) - 0.5, 0)
    first = np.minimum(source.astype(np.int64), size_in - 1)
    second = np.minimum(first + 1, size_in - 1)
    return first, second, (source - first).astype(np.float32)


def _resize_rows(maps: np.ndarray, rows: tuple, cols: tuple, start: int, stop: int) -> np.ndarray:
    """Output rows ``start:stop`` of ``maps [M, h, w]`` resized to ``(len(rows[0]),
    len(cols[0]))``: columns first, then rows, as torch's bilinear kernel weighs them."""
    r0, r1, rw = (a[start:stop] for a in rows)
    c0, c1, cw = cols
    top = maps[:, r0][..., c0] * (1 - cw) + maps[:, r0][..., c1] * cw
    bottom = maps[:, r1][..., c0] * (1 - cw) + maps[:, r1][..., c1] * cw
    return top * (1 - rw)[:, None] + bottom * rw[:, None]


def _image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float32 of an image; a grey one's three channels are its one channel seen
    three times, not three copies (a panel is 65 megapixels)."""
    grey = image.ndim == 2 or (isinstance(image, torch.Tensor) and image.shape[0] == 1)
    return to_tensor(image, channels=1).expand(3, -1, -1) if grey else to_tensor(image)


def sample_pixel_rows(
    maps_and_masks: Iterable[tuple[np.ndarray, np.ndarray]],
    per_image: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``per_image`` normal and as many defective pixels of each image's member maps
    ``[M, H, W]`` (with its mask ``[H, W]``), at random: rows ``[n, M]``, labels, the image's
    index, and each defective pixel's ground-truth region (8-connected, as AUPRO counts them;
    ids unique across images; -1 for normal pixels), so a choosing combiner can weigh regions
    as AUPRO does."""
    rows, labels, images, regions = [], [], [], []
    regions_so_far = 0
    for index_of_image, (maps, mask) in enumerate(maps_and_masks):
        flat_mask = mask.ravel()
        region_of_pixel, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        for value in (0, 1):
            index = np.flatnonzero(flat_mask == value)
            take = rng.choice(index, min(len(index), per_image), replace=False)
            rows.append(np.stack([member.reshape(-1)[take] for member in maps], axis=1))
            labels.append(np.full(len(take), value))
            images.append(np.full(len(take), index_of_image))
            region = region_of_pixel.ravel()[take]
            regions.append(np.where(region > 0, region + regions_so_far, -1))
        regions_so_far += count
    return tuple(np.concatenate(part) for part in (rows, labels, images, regions))


def _regions_image(image: torch.Tensor | LazyImage) -> np.ndarray | LazyImage:
    """What ``find_regions`` measures on: a tensor's array (a view), a ``LazyImage`` as it is."""
    return image if isinstance(image, LazyImage) else image.numpy()

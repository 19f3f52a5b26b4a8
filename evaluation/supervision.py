"""The supervised member under nested cross-validation: trained inside each fold on that fold's
training part only, and scored where a hybrid is fitted or evaluated by a head that never saw
the image.

A hybrid's fusion is fitted on labeled images too (the other folds'), so the supervised
member's answers on those images must come from heads that were not trained on them either:
the hybrid of outer fold ``k`` reads, on an image of fold ``j``, the head trained without folds
``k`` and ``j``; on its held-out and injected validation images (never trained on), and on the
fold it scores, the head trained without fold ``k``. The saved hybrid reads the head trained
without fold ``j`` on fold ``j``'s images and holds the head trained on everything. With ``k``
folds that is ``k (k - 1) / 2 + k + 1`` heads (16 for 5 folds), each a few seconds on cached
features: every image goes through the backbone once.

Every head learns from the same base (the benchmark's training images, defect-free, and one
or more copies of each with injected synthetic defects and their masks) plus the labeled images
of the folds it may see: defective ones with their masks where the dataset has masks (image
labels otherwise: mixed supervision), and defect-free ones.

``SupervisedFolds.logistic_baseline`` scores what a plain logistic regression on the same
features, pooled per image, does under the same folds: the head must beat it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from data.validation import injected_validation_samples
from fusion.fitting import fit_workers, run_forked
from fusion.hybrid import MemberMaps
from members.base import upsample_map
from members.supervised import SupervisedHead, cache_features, head_like, train_head

log = logging.getLogger(__name__)

# Member outputs: scores [M] and maps [M, H, W].
Outputs = tuple[np.ndarray, np.ndarray]


class SupervisedFolds:
    """Heads of the supervised member for every set of left-out folds a nested
    cross-validation needs, and their answers on the labeled and the validation images.

    Args:
        template: an unfitted ``SupervisedHead`` with the options every head takes.
        make_trainer: a ``FabricTrainer`` for one head (called once per head).
        member_inputs: the hybrid's ``member_inputs`` (images as its members take them).
        injections_per_image: injected-defect copies of each training image in the base.
        pixel_pitch_mm, seed: for the injected defects, and the heads' seeds.
        batch_size: images per backbone pass.
        workers: processes training heads side by side on the CPU, one thread each (None:
            one per CPU; heads on another device train one after another).
    """

    def __init__(
        self,
        template: SupervisedHead,
        make_trainer: Callable[[], Any],
        member_inputs: Callable[[Sequence[Any]], list[torch.Tensor]],
        injections_per_image: int = 1,
        pixel_pitch_mm: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        workers: int | None = 1,
    ) -> None:
        self.template = template
        self.make_trainer = make_trainer
        self.member_inputs = member_inputs
        self.injections_per_image = injections_per_image
        self.pixel_pitch_mm = pixel_pitch_mm
        self.seed = seed
        self.batch_size = batch_size
        self.workers = workers
        self.heads: dict[frozenset[int], SupervisedHead] = {}

    # --- features -----------------------------------------------------------------------------

    def _cached(
        self, triples: Iterable[tuple[Any, Any, int]], bar: Any = None
    ) -> list[dict[str, Any]]:
        """``cache_features`` of ``(image at its own size, mask or None, label)`` triples
        (``bar``: a progress bar, one step an image)."""

        def inputs() -> Iterable[tuple[torch.Tensor, Any, int]]:
            for image, mask, label in triples:
                yield self.member_inputs([image])[0], mask, label
                if bar is not None:
                    bar.update()

        return cache_features(self.template, inputs(), self.batch_size)

    def base_samples(self, normal_images: Iterable[Any], bar: Any = None) -> list[dict[str, Any]]:
        """The defect-free training images and ``injections_per_image`` injected copies of
        each, as cached training samples (taken a few images at a time: panels are large)."""
        out: list[dict[str, Any]] = []
        images = iter(normal_images)
        for chunk_index in itertools.count():
            chunk = list(itertools.islice(images, 8))
            if not chunk:
                break
            samples = injected_validation_samples(
                chunk,
                injections_per_image=self.injections_per_image,
                pixel_pitch_mm=self.pixel_pitch_mm,
                # A stream of its own: not the defects the validation copies get from the seed.
                seed=int(np.random.SeedSequence([self.seed, 1, chunk_index]).generate_state(1)[0]),
            )
            # A defect-free image's mask is known: all zeros.
            out += self._cached(
                (
                    (s["image"], s["mask"] if s["label"] else np.zeros((1, 1)), s["label"])
                    for s in samples
                ),
                bar,
            )
        return out

    def fit(
        self,
        normal_images: Iterable[Any],
        labeled: Sequence[Mapping[str, Any]],
        fold_of: np.ndarray,
        validation: Sequence[Mapping[str, Any]],
        nested: bool = True,
        progress: bool = False,
    ) -> SupervisedFolds:
        """Cache features and train the heads. ``labeled``: the labeled images (``image``,
        ``mask``: None where a defect's mask is unknown, ``label``) with their fold in
        ``fold_of``; ``validation``: the held-out and injected images the hybrids' fusion is
        fitted on (never trained on). ``nested``: the heads of a nested cross-validation
        (every pair of folds left out, for outer folds whose fusion is fitted on the other
        folds); otherwise only the head on everything and those without one fold each (one
        hybrid, fitted on every labeled image's out-of-fold answer)."""
        from tqdm.auto import tqdm

        with tqdm(desc="supervised features", unit="image", disable=not progress) as bar:
            self.base_ = self.base_samples(normal_images, bar)
            self.labeled_ = self._cached(
                ((s["image"], s["mask"], int(s["label"])) for s in labeled), bar
            )
            self.validation_ = self._cached(
                ((s["image"], None, int(s["label"])) for s in validation), bar
            )
        self.fold_of_ = np.asarray(fold_of)
        folds = sorted(set(self.fold_of_.tolist()))
        left_out = [frozenset(), *(frozenset({f}) for f in folds)]
        if nested:
            left_out += [frozenset(pair) for pair in itertools.combinations(folds, 2)]
        on_cpu = next(self.template.parameters()).device.type == "cpu"
        workers = fit_workers(self.workers, len(left_out)) if on_cpu else 1
        self.heads = {}
        with tqdm(total=len(left_out), desc="supervised heads", disable=not progress) as bar:
            if workers == 1:
                # One thread, as in the side-by-side workers: the same arithmetic, the same
                # heads whichever way they are trained.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    with threadpool_limits(1):
                        for excluded in left_out:
                            self.heads[excluded] = self._train(excluded)
                            bar.update()
                finally:
                    torch.set_num_threads(threads)
            else:
                states = run_forked(
                    lambda index: _trained_state(self._train(left_out[index])),
                    len(left_out),
                    workers,
                    bar.update,
                )
                for excluded, state in zip(left_out, states):
                    self.heads[excluded] = self._head_of(state)
        # Every answer a hybrid reads, computed here and kept on the CPU: hybrids are fitted in
        # forked processes, which must not start a GPU.
        self.answers_ = {
            (excluded, where): self._answers(excluded, where)
            for excluded in self.heads
            for where in ("labeled", "validation")
        }
        return self

    def _train(self, excluded: frozenset[int]) -> SupervisedHead:
        seen = [s for s, f in zip(self.labeled_, self.fold_of_) if int(f) not in excluded]
        seed = self.seed + sum(1 << int(f) for f in excluded)
        return train_head(self.template, self.base_ + seen, self.make_trainer(), seed=seed)

    def _head_of(self, state: Mapping[str, torch.Tensor]) -> SupervisedHead:
        """A head with a trained head's state (everything but the shared frozen backbone)."""
        head = head_like(self.template)
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("feature_extractor.") for k in missing):
            raise RuntimeError(f"a trained head's state does not fit: {missing}, {unexpected}")
        return head.eval()

    # --- answers -----------------------------------------------------------------------------

    @torch.no_grad()
    def _answers(self, excluded: frozenset[int], where: str) -> list[tuple[float, torch.Tensor]]:
        """The head without ``excluded``'s score and segmentation logits (at the features'
        resolution, on the CPU) on every ``labeled`` or ``validation`` image."""
        head = self.heads[excluded].eval()
        samples = self.labeled_ if where == "labeled" else self.validation_
        answers = []
        device = head.feature_mean.device
        for start in range(0, len(samples), 32):
            chunk = samples[start : start + 32]
            layers = [
                torch.stack([s["features"][k] for s in chunk]).to(device)
                for k in range(len(chunk[0]["features"]))
            ]
            segmentation, decision = head.head(layers)
            answers += list(zip(decision.double().cpu().tolist(), segmentation.cpu()))
        return answers

    def answer(
        self, excluded: frozenset[int], where: str, index: int, image_size: tuple[int, int]
    ) -> tuple[float, np.ndarray]:
        """The head without ``excluded`` on image ``index`` of ``where``: its score and its map
        at ``image_size``, brought there as the hybrid brings a member's map (to the members'
        input size, then to the image's)."""
        score, segmentation = self.answers_[(frozenset(excluded), where)][index]
        samples = self.labeled_ if where == "labeled" else self.validation_
        member_map = upsample_map(segmentation[None].float(), samples[index]["input_size"])
        if tuple(member_map.shape[-2:]) != tuple(image_size):
            member_map = F.interpolate(member_map, size=image_size, mode="bilinear")
        return score, member_map[0, 0].numpy()

    # --- the baseline ------------------------------------------------------------------------

    def logistic_baseline(self) -> np.ndarray:
        """Out-of-fold scores of the labeled images by a logistic regression on each image's
        features pooled (per-channel mean and max), trained, fold by fold, on what the head of
        that fold learned from (the base and the other folds' labeled images)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        def pooled(samples: Sequence[Mapping[str, Any]]) -> np.ndarray:
            return np.stack(
                [
                    torch.cat(
                        [layer.mean((1, 2)) for layer in s["features"]]
                        + [layer.amax((1, 2)) for layer in s["features"]]
                    ).numpy()
                    for s in samples
                ]
            )

        base, labeled = pooled(self.base_), pooled(self.labeled_)
        base_y = np.array([s["label"] for s in self.base_])
        labeled_y = np.array([s["label"] for s in self.labeled_])
        scores = np.empty(len(labeled))
        for fold in sorted(set(self.fold_of_.tolist())):
            train = self.fold_of_ != fold
            model = make_pipeline(
                StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
            )
            model.fit(np.vstack([base, labeled[train]]), np.r_[base_y, labeled_y[train]])
            scores[~train] = model.decision_function(labeled[~train])
        return scores


def _trained_state(head: SupervisedHead) -> dict[str, torch.Tensor]:
    """What a worker sends back of a trained head: everything but the shared backbone."""
    return {k: v for k, v in head.state_dict().items() if not k.startswith("feature_extractor.")}


def heads_for_fit(
    fold_of: np.ndarray, fold: int | None
) -> tuple[frozenset[int], list[tuple[int, frozenset[int]]]]:
    """Which head answers what in the fit of the hybrid of outer ``fold`` (None: the hybrid
    fitted on every fold): the head that answers the validation images (trained without that
    fold), and each labeled image of the other folds with the head that answers it (trained
    without that fold and its own)."""
    outer = frozenset() if fold is None else frozenset({int(fold)})
    return outer, [(i, outer | {int(f)}) for i, f in enumerate(fold_of) if f != fold]


def with_answer(outputs: Outputs, answer: tuple[float, np.ndarray]) -> Outputs:
    """Member outputs with one more member's ``(score, map)`` appended (the other members'
    maps are not copied: ``fusion.hybrid.MemberMaps``)."""
    scores, maps = outputs
    score, member_map = answer
    return np.append(scores, score), MemberMaps([*maps, member_map])


def with_heads(
    supervised: SupervisedFolds | None,
    samples: Sequence[Mapping[str, Any]],
    outputs: Sequence[Outputs],
    where: str,
    excluded: Callable[[int], frozenset[int]],
    indices: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """``samples`` with their ``member_outputs``: the other members' ``outputs`` and, with a
    supervised member, the answer of the head without ``excluded(index)`` on image ``index``
    of ``where`` (``labeled`` or ``validation``; ``indices``: each sample's index there,
    default its position), appended when a fit reads it (each fit needs its own; a panel's
    maps are large).

    A labeled image is answered by a head that never saw it, never the head of the hybrid
    that fits on it (that one learned from every fold but its own): such a sample names the
    member ``answered_apart`` (``Hybrid.fit``), so its answer is not part of the member's
    normal reference."""
    indices = range(len(samples)) if indices is None else indices
    apart = (
        {"answered_apart": ("supervised",)} if supervised is not None and where == "labeled" else {}
    )
    out = []
    for sample, given, index in zip(samples, outputs, indices):
        if supervised is not None:
            given = _with_head(supervised, given, excluded(index), where, index, sample)
        out.append({**sample, "member_outputs": given, **apart})
    return out


def _with_head(
    supervised: SupervisedFolds,
    base: Outputs,
    excluded: frozenset[int],
    where: str,
    index: int,
    sample: Mapping[str, Any],
) -> Callable[[], Outputs]:
    size = tuple(np.asarray(sample["image"]).shape[:2])
    return lambda: with_answer(base, supervised.answer(excluded, where, index, size))


def build_supervised(
    members: Mapping[str, Any],
    member_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    device_cfg: Mapping[str, Any],
    member_inputs: Callable[[Sequence[Any]], list[torch.Tensor]],
    injections_per_image: int,
    pixel_pitch_mm: float,
    seed: int,
    device: Any = "cpu",
    workers: int | None = 1,
) -> SupervisedFolds:
    """``SupervisedFolds`` for a hybrid of ``members`` from configuration sections (the
    member's options ``members.supervised``, whose ``trainer`` overrides ``trainer_cfg``, and
    the ``device`` section). Its backbone is the first member's frozen one where a member has
    one, so the hybrid runs that backbone once for all."""
    from members.base import create_member
    from members.build import build_trainer

    options = {k: v for k, v in member_cfg.items() if k != "trainer"}
    for member in members.values():
        if member.shared_backbone_key() is not None:
            options["backbone"] = member.feature_extractor.name
            break
    template = create_member("supervised", **options).to(device)
    training = {**trainer_cfg, **member_cfg.get("trainer", {})}
    return SupervisedFolds(
        template,
        lambda: build_trainer(device_cfg, training, seed=seed, progress=False),
        member_inputs,
        injections_per_image=injections_per_image,
        pixel_pitch_mm=pixel_pitch_mm,
        seed=seed,
        workers=workers,
    )

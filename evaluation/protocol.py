"""The ensemble's evaluation protocol: how the hybrid is fitted and scored so that no test image
is scored by a hybrid fitted on it, and where each figure comes from."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evaluation.phases import PhaseClock
from evaluation.scoring import cross_validate_hybrid, evaluate_hybrid, weighed_members

log = logging.getLogger(__name__)


def fit_and_evaluate_hybrid(
    make_hybrid: Callable[..., Any],
    samples: Sequence[dict[str, Any]],
    n_val_images: int,
    test_set: Any,
    labeled_defects: str,
    folds: int,
    seed: int,
    batch_size: int = 4,
    fit_workers: int | None = 1,
    supervised: Any = None,
    normal_images: Callable[[], Any] | None = None,
    clock: PhaseClock | None = None,
    review_folder: Path | None = None,
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The saved hybrid, its evaluation on ``test_set`` and the provenance of the figures
    (``fitted_on``, ``scored_on``, ``note``).

    ``samples``: the held-out normal images (the first ``n_val_images``) and their injected
    copies. The test split's labeled defects also train fusion, thresholds and the type
    classifier under k-fold cross-validation where ``labeled_defects`` is ``cross_validate``,
    or ``auto`` with at least two defective and two normal test images; otherwise the hybrid is
    fitted on ``samples`` alone and the test split only scores it. ``batch_size``: images per
    batch through the members; ``fit_workers``: processes fitting the folds' hybrids side by
    side (None: one per CPU). ``supervised`` (a ``evaluation.supervision.SupervisedFolds``)
    and ``normal_images`` (the members' training images): the supervised member, trained
    inside each fold where labeled defects take part, and skipped, with the reason in the log,
    where they do not. ``clock``: a ``PhaseClock`` that times each phase. ``review_folder``:
    where the overlays of the test images to review go (``evaluate_hybrid``, which also gives
    each test image's panel quality here).
    """
    clock = clock or PhaseClock()
    defective = sum(entry.label for entry in test_set.entries)
    injected = f"{len(samples) - n_val_images} injected copies"
    if labeled_defects == "cross_validate" or (
        labeled_defects == "auto" and min(defective, len(test_set) - defective) >= 2
    ):
        log.info("labeled test defects: %d-fold cross-validation", folds)
        evaluation, hybrid = cross_validate_hybrid(
            make_hybrid,
            samples,
            test_set,
            folds,
            seed,
            progress=True,
            batch_size=batch_size,
            fit_workers=fit_workers,
            supervised=supervised,
            normal_images=normal_images,
            clock=clock,
            review_folder=review_folder,
            quality=True,
        )
        done = evaluation["cross_validation"]["folds"]
        return (
            hybrid,
            evaluation,
            {
                "fitted_on": f"val ({n_val_images} held-out normal images, {injected}) and the "
                "test split's labeled defects of the other folds",
                "scored_on": f"test, out of fold ({done} folds)",
                "note": "fusion, thresholds, grader and type classifier are fitted on held-out "
                "normal images, injected synthetic defects and the test split's labeled "
                "defects; every test image is scored by a hybrid fitted without its fold "
                f"({done}-fold cross-validation), and the saved hybrid is fitted on all of them",
            },
        )
    if supervised is not None:
        log.info(
            "supervised member skipped: it learns from labeled defects, and the test split's "
            "take no part here (ensemble.labeled_defects=%s, %d defective and %d defect-free "
            "test images)",
            labeled_defects,
            defective,
            len(test_set) - defective,
        )
    with clock("fusion and grading fit"):
        hybrid = make_hybrid().fit(samples, progress=True)
    with clock("test images scored"):
        evaluation = evaluate_hybrid(
            hybrid,
            test_set,
            progress=True,
            contributions=weighed_members(hybrid),
            review_folder=review_folder,
            quality=True,
        )
    return (
        hybrid,
        evaluation,
        {
            "fitted_on": f"val ({n_val_images} held-out normal images, {injected})",
            "scored_on": "test",
            "note": "fusion, thresholds, grader and type classifier are fitted on held-out normal "
            "images and injected synthetic defects only; the test split is used for evaluation "
            "alone",
        },
    )

"""Scoring detectors on labeled splits: a member, a member behind tiled inference, or a hybrid
(against each of its members, out of fold under cross-validation), and the hybrid's
shared-backbone cost."""

from evaluation.scoring import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    Evaluation,
    cross_validate_hybrid,
    evaluate,
    evaluate_hybrid,
    evaluate_on_unseen_panels,
    operating_point_figures,
    shared_work_cost,
)

__all__ = [
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "Evaluation",
    "cross_validate_hybrid",
    "evaluate",
    "evaluate_hybrid",
    "evaluate_on_unseen_panels",
    "operating_point_figures",
    "shared_work_cost",
]

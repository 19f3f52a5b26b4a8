"""One builder of an unfitted hybrid from configuration sections, for every pipeline that makes
one (``ensemble``, ``retrain``): the ``hybrid`` section holds the ``Hybrid``'s constructor
options (combiner, normalizer, learner, pixel threshold, grader, type confidence, describer
backbone), the ``grading`` section its operating point. It takes plain mappings, so fusion
stays below configs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fusion.hybrid import Hybrid
from members.base import Member


def build_hybrid(
    members: Mapping[str, Member],
    image_size: int | Sequence[int] | None,
    tiling: Mapping[str, Any] | None = None,
    *,
    hybrid_cfg: Mapping[str, Any],
    grading_cfg: Mapping[str, Any],
    pixel_pitch_mm: float,
    intensity: Mapping[str, Any] | None,
    seed: int,
) -> Hybrid:
    """A ``Hybrid`` of ``members`` with every option of ``hybrid_cfg`` (the ``hybrid``
    section) and the operating point of ``grading_cfg`` (the ``grading`` section)."""
    return Hybrid(
        members,
        image_size,
        tiling,
        **hybrid_cfg,
        operating_point=grading_cfg["operating_point"],
        false_alarm_rate=grading_cfg["false_alarm_rate"],
        pixel_pitch_mm=pixel_pitch_mm,
        intensity=intensity,
        seed=seed,
    )

"""Fusion of member outputs: per-member normalizers and combiners, at image and pixel level."""

from fusion.combiners import COMBINERS, ScoreFusion
from fusion.normalizers import (
    NORMALIZERS,
    MinMaxNormalizer,
    RankNormalizer,
    ZScoreNormalizer,
    get_normalizer,
)

__all__ = [
    "COMBINERS",
    "NORMALIZERS",
    "MinMaxNormalizer",
    "RankNormalizer",
    "ScoreFusion",
    "ZScoreNormalizer",
    "get_normalizer",
]

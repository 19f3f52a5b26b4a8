"""Metrics shared by the pipelines: detection (streaming), image quality, and severity.

``get_metric(name, **kw)`` builds any metric of ``available_classes``; each has
``update``/``compute``/``reset``.
"""

from metrics.detection import (
    METRICS,
    AUPROMetric,
    ImageAPMetric,
    ImageAUROCMetric,
    ImageF1MaxMetric,
    Metric,
    PixelAUROCMetric,
    PixelF1MaxMetric,
    aupro_of_pixels,
    binary_auroc,
)
from metrics.quality import (
    QUALITY_METRICS,
    DeltaE2000Metric,
    LPIPSMetric,
    MSSSIMMetric,
    MuraEnergyMetric,
    PSNRMetric,
    SSIMMetric,
)

available_classes: dict[str, type[Metric]] = {**METRICS, **QUALITY_METRICS}


def get_metric(name: str, **kwargs) -> Metric:
    """A fresh metric by name (see ``available_classes``)."""
    if name not in available_classes:
        raise KeyError(f"unknown metric {name!r}; available: {sorted(available_classes)}")
    return available_classes[name](**kwargs)


__all__ = [
    "AUPROMetric",
    "DeltaE2000Metric",
    "LPIPSMetric",
    "MSSSIMMetric",
    "MuraEnergyMetric",
    "PSNRMetric",
    "SSIMMetric",
    "ImageAPMetric",
    "ImageAUROCMetric",
    "ImageF1MaxMetric",
    "Metric",
    "PixelAUROCMetric",
    "PixelF1MaxMetric",
    "available_classes",
    "aupro_of_pixels",
    "binary_auroc",
    "get_metric",
]

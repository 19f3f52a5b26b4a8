"""Metrics shared by the pipelines: detection (streaming) and severity (SEMU, levels).

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
)

available_classes: dict[str, type[Metric]] = dict(METRICS)


def get_metric(name: str, **kwargs) -> Metric:
    """A fresh metric by name (see ``available_classes``)."""
    if name not in available_classes:
        raise KeyError(f"unknown metric {name!r}; available: {sorted(available_classes)}")
    return available_classes[name](**kwargs)


__all__ = [
    "AUPROMetric",
    "ImageAPMetric",
    "ImageAUROCMetric",
    "ImageF1MaxMetric",
    "Metric",
    "PixelAUROCMetric",
    "PixelF1MaxMetric",
    "available_classes",
    "get_metric",
]

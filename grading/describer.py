"""Region descriptors for the type classifier (``grading.graders.TypeClassifier``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.images import LazyImage, to_tensor
from grading.regions import Region
from members.backbones import load_backbone


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

    def __call__(self, image: torch.Tensor | LazyImage, regions: Sequence[Region]) -> np.ndarray:
        """``[n, d]`` descriptors of ``regions`` found on ``image`` (``[3, H, W]`` tensor, or a
        ``LazyImage``, of which only the crops are converted)."""
        rows = np.asarray(
            [[r.features[k] for k in self.MEASUREMENTS] for r in regions], dtype=np.float64
        )
        if self.extractor is None:
            return rows
        crops = []
        lazy = isinstance(image, LazyImage)
        height, width = image.shape[:2] if lazy else image.shape[-2:]
        for r in regions:
            x0, y0, x1, y1 = r.bbox
            margin = max(8, (x1 - x0) // 4, (y1 - y0) // 4)
            ys = slice(max(0, y0 - margin), min(height, y1 + margin))
            xs = slice(max(0, x0 - margin), min(width, x1 + margin))
            crop = to_tensor(image[ys, xs]) if lazy else image[:, ys, xs]
            crops.append(F.interpolate(crop[None], size=(self.crop_size,) * 2, mode="bilinear"))
        with torch.no_grad():
            maps = self.extractor(torch.cat(crops))
        pooled = torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1).numpy()
        return np.concatenate([rows, pooled], axis=1)

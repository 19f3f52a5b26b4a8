"""Defect regions of a fused anomaly map, measured on the input image.

A detection is a connected component of the fused map at or above the calibrated pixel
threshold. The map says *where*; the image says *what and how strong*: the separate defects
under a detection (a coarse map's blob can cover two) are found on the luminance of the input
image, against its local background, and each is a region, measured the same way.

Measurement of one region, in a window around it:

1. Background: the luminance smoothed by a Gaussian normalized convolution that leaves out the
   (dilated) region, so the defect does not pull its own reference; its width follows the
   region's size.
2. Deviation ``d = L / background - 1``; its sign is the sign of the mean deviation inside the
   region (dark or bright defect).
3. Extent: pixels near the region whose signed deviation reaches half its peak (the half-maximum
   contour, the usual extent of a soft mura). Weak, smooth defects are measured on a slightly
   smoothed deviation, because sensor noise would otherwise dominate; strong, sharp ones
   (pixel clusters, lines) on the raw one, which keeps their edges.
4. ``area_px``, ``area_mm2`` (pixel pitch), ``contrast_pct`` = 100 x the mean deviation over the
   extent, ``semu`` (``metrics.severity.semu``), bbox, shape descriptors and the map's score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data.images import LazyImage
from data.maps import MapOnDisk, band_rows
from metrics.severity import semu


@dataclass
class Region:
    """One measured region. ``bbox`` is ``[x0, y0, x1, y1]`` with exclusive ends."""

    bbox: list[int]
    area_px: int
    area_mm2: float
    contrast_pct: float
    semu: float
    score: float
    mean_score: float
    features: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = field(default=None, repr=False)  # its pixels within ``bbox``
    type: str | None = None
    type_confidence: float | None = None
    level: int | None = None

    @property
    def label(self) -> str:
        """Its type and level as an overlay and a report show them: ``"spot_mura L3"``."""
        return f"{self.type or 'untyped'} L{self.level}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("mask", "features")}
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


# A region whose measuring window holds more pixels than this is measured on a coarser grid.
MEASURE_PIXELS = 1 << 22
# At most this many separate defects are measured under one detection.
MAX_DEFECTS_PER_DETECTION = 8
# Parts of a defect this many pixels apart or closer are one defect (a faint line breaks up
# where the noise dips along it).
GAP_PX = 3
# Defects under a detection are told apart on the deviation less its local mean at this scale
# (the defects left out of it): the background of a panel-wide detection is a smooth surface,
# and what it leaves (a panel's background mura) would break a faint line into pieces.
SEPARATION_SCALE_PX = 16.0


def luminance(image: np.ndarray | LazyImage) -> np.ndarray | LazyImage:
    """``[H, W]`` float32 luminance of an ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` image
    (float32, not 64: a full panel is 65 megapixels; measurements upcast their window); of a
    ``LazyImage``, a ``LazyImage`` too (converted window by window as it is measured)."""
    if isinstance(image, LazyImage):
        return image.luminance()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        channel_axis = 0 if image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3) else -1
        if image.strides[channel_axis] == 0:  # a grey image seen as three channels: a view
            return np.moveaxis(image, channel_axis, 0)[0]
        image = image.mean(axis=channel_axis)
    if image.ndim != 2:
        raise ValueError(f"expected an image [H, W] or with channels, got shape {image.shape}")
    return image


def _window(bbox: tuple[int, int, int, int], margin: int, shape: tuple[int, int]):
    y0, x0, y1, x1 = bbox
    return (
        slice(max(0, y0 - margin), min(shape[0], y1 + margin)),
        slice(max(0, x0 - margin), min(shape[1], x1 + margin)),
    )


def _measuring_window(
    crop_shape: tuple[int, int], top: int, left: int, image_shape: tuple[int, int]
) -> tuple[tuple[slice, slice], int]:
    """The window a detection (a crop of ``crop_shape`` at ``top``, ``left``) is measured in,
    and its pixel count: its box with a margin of three background scales. The background
    scale follows the detection's short side (at least 4 px): a band is referenced to the
    pixels beside it, not to the far ends of the panel."""
    sigma = max(4.0, float(min(crop_shape)))
    bbox = (top, left, top + crop_shape[0], left + crop_shape[1])
    window = _window(bbox, int(3 * sigma) + 2, image_shape)
    return window, (window[0].stop - window[0].start) * (window[1].stop - window[1].start)


def _coarse(
    values: Any, step: int, reduce: str, window: tuple[slice, slice] | None = None
) -> np.ndarray:
    """``values[window]`` (``[H, W]``, whole by default; an array, a ``LazyImage`` or a
    ``MapOnDisk``) reduced over ``step x step`` blocks (``"mean"`` or ``"any"``; edge blocks
    over the pixels they hold), read a band of rows at a time (bounded memory)."""
    rows, cols = window or (slice(0, values.shape[0]), slice(0, values.shape[1]))
    if step == 1:  # small regions' backgrounds: no blocks to reduce, and no loop over rows
        return np.asarray(values[rows, cols]).astype(np.float64 if reduce == "mean" else bool)
    width = cols.stop - cols.start
    starts = np.arange(0, width, step)
    widths = np.diff(np.append(starts, width))
    if isinstance(values, np.ndarray):  # in memory: every band at once, summed in the same order
        block = values[rows, cols]
        row_starts = np.arange(0, block.shape[0], step)
        if reduce == "mean":
            sums = np.add.reduceat(block.astype(np.float64), row_starts, axis=0)
            heights = np.diff(np.append(row_starts, block.shape[0]))
            return np.add.reduceat(sums, starts, axis=1) / (widths * heights[:, None])
        return np.logical_or.reduceat(
            np.logical_or.reduceat(block.astype(bool), row_starts, axis=0), starts, axis=1
        )
    out = np.empty(
        (-(-(rows.stop - rows.start) // step), len(starts)),
        np.float64 if reduce == "mean" else bool,
    )
    for row, start in enumerate(range(rows.start, rows.stop, step)):
        band = values[start : min(start + step, rows.stop), cols]
        if reduce == "mean":
            sums = np.add.reduceat(band.sum(axis=0, dtype=np.float64), starts)
            out[row] = sums / (widths * band.shape[0])
        else:
            out[row] = np.logical_or.reduceat(band.any(axis=0), starts)
    return out


def _masked_blur(values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted mean of ``values`` where ``weights`` is 1 (plain blur where no weight is
    near). Wide blurs run on a grid ``step = sigma // 8`` times coarser and are interpolated back:
    the result varies on the scale of ``sigma`` anyway, and the cost falls by ``step**3``."""
    step = max(1, int(sigma // 8))
    shape = values.shape
    if step > 1:
        values = _coarse(values, step, "mean")
        weights = _coarse(weights, step, "mean")
        sigma = sigma / step
    numerator = ndimage.gaussian_filter(values * weights, sigma, mode="nearest")
    denominator = ndimage.gaussian_filter(weights, sigma, mode="nearest")
    blurred = numerator / np.maximum(denominator, 1e-12)
    far = denominator <= 1e-3
    if far.any():  # the plain blur, only where it is needed
        blurred[far] = ndimage.gaussian_filter(values, sigma, mode="nearest")[far]
    if step == 1:
        return blurred
    zoom = (shape[0] / blurred.shape[0], shape[1] / blurred.shape[1])
    return ndimage.zoom(blurred, zoom, order=1, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1]
    ]


def _quadratic_trend(values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """The least-squares quadratic surface through ``values`` where ``weights`` is 1, over the
    whole array (fitted on ``sigma // 8`` blocks, like ``_masked_blur``)."""
    step = max(1, int(sigma // 8))
    coarse_values, coarse_weights = _coarse(values, step, "mean"), _coarse(weights, step, "mean")
    height, width = values.shape
    scale = max(height, width) / 2.0

    def basis(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        y, x = (rows - height / 2) / scale, (cols - width / 2) / scale
        return np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], axis=-1)

    centres = (
        (np.arange(coarse_values.shape[0]) + 0.5) * step,
        (np.arange(coarse_values.shape[1]) + 0.5) * step,
    )
    design = basis(*np.meshgrid(*centres, indexing="ij"))
    use = coarse_weights > 0.5
    if use.sum() < 12:
        return np.full(values.shape, float(np.average(values, weights=weights + 1e-12)))
    coefficients, *_ = np.linalg.lstsq(design[use], coarse_values[use], rcond=None)
    return basis(*np.mgrid[:height, :width].astype(np.float64)) @ coefficients


def local_background(values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """The background under a hole (``weights`` 0) from the pixels around it: a quadratic trend
    through them, plus the Gaussian-weighted mean (scale ``sigma``) of what the trend leaves.
    The mean alone fills a hole with its rim's average, which misreads a region on a curved
    background (vignetting) by the curvature over the hole; the trend carries that."""
    trend = _quadratic_trend(values, weights, sigma)
    return trend + _masked_blur(values - trend, weights, sigma)


def _shape_features(mask: np.ndarray, image_shape: tuple[int, int]) -> dict[str, float]:
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    long_side, short_side = max(height, width), min(height, width)
    if len(ys) > 1:
        eig = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)) + 1e-6 * np.eye(2))
        elongation = math.sqrt(eig[1] / eig[0])
    else:
        elongation = 1.0
    return {
        "aspect": long_side / short_side,
        "fill": len(ys) / float(height * width),
        "elongation": elongation,
        "span": long_side / float(max(image_shape) if height >= width else image_shape[1]),
        "thickness": len(ys) / float(long_side),
    }


@dataclass
class _Local:
    """A detection in its measuring window: the detection on the window's grid, the detection
    grown (where its extent may lie; less anything excluded), the hole left out of the
    background (the detection grown, plus anything excluded), the deviation
    ``L / background - 1`` and its noise (robust sigma outside the hole)."""

    window: tuple[slice, slice]
    region: np.ndarray
    grown: np.ndarray
    hole: np.ndarray
    deviation: np.ndarray
    noise: float
    short_side: int


def _placed(mask: np.ndarray, top: int, left: int, window: tuple[slice, slice]) -> np.ndarray:
    """``mask`` (top-left pixel at image row ``top``, column ``left``) on ``window``'s grid,
    cut where it leaves the window."""
    shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    out = np.zeros(shape, bool)
    r0, c0 = top - window[0].start, left - window[1].start
    rows = slice(max(0, r0), min(shape[0], r0 + mask.shape[0]))
    cols = slice(max(0, c0), min(shape[1], c0 + mask.shape[1]))
    out[rows, cols] = mask[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    return out


def _local(
    lum: np.ndarray | LazyImage,
    detection: np.ndarray,
    top: int,
    left: int,
    exclude: tuple[np.ndarray, tuple[int, int]] | None,
) -> _Local:
    """The window around a detection (cropped to its pixels, top-left at ``top``, ``left``)
    and its deviation from the local background; ``exclude`` (a mask and its origin): pixels
    kept out of the background as well (another defect beside this one)."""
    short_side = min(detection.shape)
    sigma = max(4.0, float(short_side))
    window, _ = _measuring_window(detection.shape, top, left, lum.shape)
    region = _placed(detection, top, left, window)
    local = lum[window].astype(np.float64)
    grown = ndimage.binary_dilation(region, iterations=max(2, short_side // 4))
    hole = grown
    if exclude is not None:
        mask, (row, col) = exclude
        excluded = _placed(mask, row, col, window)
        grown, hole = grown & ~excluded, grown | excluded
    background = local_background(local, (~hole).astype(np.float64), sigma)
    deviation = local / np.maximum(background, 1e-6) - 1.0
    outside = deviation[~hole]
    noise = _robust_sigma(outside) if outside.size > 8 else 0.0
    return _Local(window, region, grown, hole, deviation, noise, short_side)


def _robust_sigma(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _cropped(detection: np.ndarray, origin: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """``detection`` cut to its pixels' bounding box, with that box's top-left (image rows and
    columns)."""
    rows, cols = np.flatnonzero(detection.any(axis=1)), np.flatnonzero(detection.any(axis=0))
    crop = detection[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return crop, origin[0] + int(rows[0]), origin[1] + int(cols[0])


def measure_region(
    lum: np.ndarray | LazyImage,
    detection: np.ndarray,
    fused_map: np.ndarray | MapOnDisk,
    pixel_pitch_mm: float,
    noise_k: float = 6.0,
    origin: tuple[int, int] = (0, 0),
    exclude: tuple[np.ndarray, tuple[int, int]] | None = None,
) -> Region:
    """Measure one detected region on luminance ``lum`` (an array, or a ``LazyImage`` read on
    windows): ``detection`` is a boolean mask, the image's size or a crop of it whose top-left
    pixel is at ``origin`` (row, column); its scores are read from ``fused_map`` (an array or
    a ``MapOnDisk``) on windows. ``exclude`` (a mask and its origin): pixels of other defects,
    left out of this one's background and extent. A region whose measuring window exceeds
    ``MEASURE_PIXELS`` is measured on a coarser grid."""
    detection, top, left = _cropped(detection, origin)
    window, pixels = _measuring_window(detection.shape, top, left, lum.shape)
    if pixels > MEASURE_PIXELS:
        region = _placed(detection, top, left, window)
        return _measure_coarsely(lum, region, window, fused_map, pixel_pitch_mm, noise_k)
    at = _local(lum, detection, top, left, exclude)
    window, region, grown = at.window, at.region, at.grown
    deviation, noise = at.deviation, at.noise
    detection_area = int(np.count_nonzero(detection))
    # The sign of the strongest excursion under the detection (lightly smoothed against single
    # noise pixels), not of its mean: a thin defect covers little of a coarse map's blob.
    smooth = ndimage.gaussian_filter(deviation, 1.0)[region]
    sign = 1.0 if smooth.max() >= -smooth.min() else -1.0
    raw_peak = np.max(sign * deviation[grown])
    signed = sign * (
        deviation if raw_peak > noise_k * noise else ndimage.gaussian_filter(deviation, 1.5)
    )
    # A high percentile, so that one noise pixel does not set the peak; but a defect of a few
    # pixels in a wide detection is less than 1 % of it, and its maximum, less the noise's
    # typical excess, is its peak.
    peak = max(np.quantile(signed[grown], 0.99), np.max(signed[grown]) - 3.0 * noise)
    extent = grown & (signed >= 0.5 * peak) if peak > 0 else region
    labels, count = ndimage.label(extent)
    if count > 1:  # keep the parts that touch the detection
        keep = np.unique(labels[region & extent])
        extent = np.isin(labels, keep[keep > 0])
    if not extent.any():
        extent = region
    area_px = int(extent.sum())
    area_mm2 = area_px * pixel_pitch_mm**2
    contrast = 100.0 * float(deviation[extent].mean())
    scores = fused_map[window][region].astype(np.float64)
    ys, xs = np.nonzero(extent)
    inside = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    ys, xs = ys + window[0].start, xs + window[1].start
    region_semu = float(semu(contrast, area_mm2))
    features = {
        "log_area": math.log1p(area_px),
        "log_detection_area": math.log1p(detection_area),
        "contrast_pct": contrast,
        "abs_contrast": abs(contrast),
        "log_abs_contrast": math.log(abs(contrast) + 1e-3),
        "peak_pct": 100.0 * float(sign * peak),
        "log_semu": math.log(region_semu + 1e-4),
        "score": float(scores.max()),
        "mean_score": float(scores.mean()),
        **_shape_features(extent, lum.shape),
    }
    return Region(
        bbox=[int(xs.min()), int(ys.min()), int(xs.max() + 1), int(ys.max() + 1)],
        area_px=area_px,
        area_mm2=area_mm2,
        contrast_pct=contrast,
        semu=region_semu,
        score=float(scores.max()),
        mean_score=float(scores.mean()),
        features=features,
        mask=extent[inside],
    )


def _defects_in(
    lum: np.ndarray | LazyImage, detection: np.ndarray, top: int, left: int, noise_k: float
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The separate defects under one detection (crop at ``top``, ``left``), as masks on its
    measuring window's grid (whose top-left is returned with them), strongest first: a coarse
    map's blob can cover two defects, and a region is measured for one.

    A defect is an excursion of the deviation (raw, or lightly smoothed for faint wide ones)
    that stands ``noise_k`` sigmas out under the detection; its support, the pixels around it
    connected to it at ``noise_k / 2`` sigmas or more of the same sign. Two peaks are separate
    defects only where the deviation falls back to the noise between them over more than
    ``GAP_PX`` pixels: a peak whose support touches a defect's, or nearly (a line whose contrast
    varies along it, a faint one broken up by the noise, a dark core in a bright rim), is more
    of that defect. All of this on the deviation less its local mean (``SEPARATION_SCALE_PX``),
    the significant pixels left out of that mean (found twice: the second time without what
    the first mean held of them)."""
    at = _local(lum, detection, top, left, None)
    outside = ~at.hole
    corner = (at.window[0].start, at.window[1].start)
    if np.count_nonzero(outside) <= 8:  # a panel-wide detection: no noise to measure against
        return [], corner
    deviation = at.deviation
    for _ in range(2):
        z = _significance(deviation, outside)
        quiet = ~ndimage.binary_dilation(np.abs(z) >= 0.5 * noise_k, iterations=2)
        local_mean = _masked_blur(at.deviation, quiet.astype(np.float64), SEPARATION_SCALE_PX)
        deviation = at.deviation - local_mean
    z = _significance(deviation, outside)
    supports = {sign: ndimage.label(at.grown & (sign * z >= 0.5 * noise_k))[0] for sign in (1, -1)}
    defects: list[np.ndarray] = []
    claimed = ~at.region
    while len(defects) < MAX_DEFECTS_PER_DETECTION:
        open_z = np.where(claimed, 0.0, np.abs(z))
        peak = np.unravel_index(np.argmax(open_z), z.shape)
        if open_z[peak] < noise_k:
            break
        labels = supports[1 if z[peak] > 0 else -1]
        support = labels == labels[peak]
        claimed |= support
        touching = ndimage.binary_dilation(support, iterations=GAP_PX + 1)
        # More of the first (strongest) defect it touches, if any.
        owner = next((i for i, found in enumerate(defects) if (touching & found).any()), None)
        if owner is None:
            defects.append(support)
        else:
            defects[owner] |= support
    return defects, corner


def _significance(deviation: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Each pixel's deviation in sigmas of the noise ``outside``, raw or smoothed by 1.5 px
    (for faint wide defects), whichever stands out more."""
    smooth = ndimage.gaussian_filter(deviation, 1.5)
    raw_z = deviation / max(_robust_sigma(deviation[outside]), 1e-12)
    smooth_z = smooth / max(_robust_sigma(smooth[outside]), 1e-12)
    return np.where(np.abs(raw_z) >= np.abs(smooth_z), raw_z, smooth_z)


def measure_detection(
    lum: np.ndarray | LazyImage,
    detection: np.ndarray,
    fused_map: np.ndarray | MapOnDisk,
    pixel_pitch_mm: float,
    noise_k: float = 6.0,
    origin: tuple[int, int] = (0, 0),
) -> list[Region]:
    """The regions of one detection (arguments as ``measure_region``'s): one for each separate
    defect under it (``_defects_in``), measured on its support grown by two pixels, as a true
    defect's region is measured (``grading.matching.truth_regions``), with the others left out
    of its background; where none stands out of the noise (or the detection is too large to
    measure pixel by pixel, or spans the panel), one, measured on the whole detection."""
    crop, top, left = _cropped(detection, origin)
    defects: list[np.ndarray] = []
    if _measuring_window(crop.shape, top, left, lum.shape)[1] <= MEASURE_PIXELS:
        defects, origin = _defects_in(lum, crop, top, left, noise_k)
    if not defects:
        return [measure_region(lum, crop, fused_map, pixel_pitch_mm, noise_k, (top, left))]
    grown = [ndimage.binary_dilation(support, iterations=2) for support in defects]
    regions = []
    for i, part in enumerate(grown):
        # The others' pixels, less this one's own (grown, two may overlap at their rims).
        others = [g & ~part for j, g in enumerate(grown) if j != i]
        exclude = (np.logical_or.reduce(others), origin) if others else None
        regions.append(
            measure_region(lum, part, fused_map, pixel_pitch_mm, noise_k, origin, exclude=exclude)
        )
    return regions


def _measure_coarsely(
    lum: np.ndarray | LazyImage,
    region: np.ndarray,
    window: tuple[slice, slice],
    fused_map: np.ndarray | MapOnDisk,
    pixel_pitch_mm: float,
    noise_k: float,
) -> Region:
    """A region too large to measure pixel by pixel (one spanning a panel: its float64 window
    would be gigabytes), measured on blocks of ``step x step`` pixels with the pitch scaled
    to match; its scores are read at full resolution."""
    step = math.ceil(math.sqrt(region.size / MEASURE_PIXELS))
    coarse = measure_region(
        _coarse(lum, step, "mean", window),
        _coarse(region, step, "any"),
        _coarse(fused_map, step, "mean", window),
        pixel_pitch_mm * step,
        noise_k,
    )
    x0, y0, x1, y1 = coarse.bbox
    top, left = window[0].start + y0 * step, window[1].start + x0 * step
    bottom, right = (
        min(window[0].stop, window[0].start + y1 * step),
        min(window[1].stop, window[1].start + x1 * step),
    )
    mask = np.repeat(np.repeat(coarse.mask, step, axis=0), step, axis=1)
    mask = mask[: bottom - top, : right - left]
    count = int(np.count_nonzero(region))
    score, total = -np.inf, 0.0
    rows_per_band = band_rows(region.shape[1])
    for start in range(0, region.shape[0], rows_per_band):
        inside = region[start : start + rows_per_band]
        rows = slice(window[0].start + start, window[0].start + start + len(inside))
        scores = fused_map[rows, window[1]]
        score = max(score, float(np.max(scores, where=inside, initial=-np.inf)))
        total += float(np.sum(scores, where=inside, dtype=np.float64))
    mean_score = total / count
    # What the blocks found, if small (a particle on a panel-wide detection), is measured again
    # pixel by pixel: its blocks, grown by one block, are the detection.
    grown = ndimage.binary_dilation(np.pad(mask, step), iterations=step)
    corner = (max(0, step - top), max(0, step - left))  # where the padding leaves the image
    grown = grown[corner[0] : lum.shape[0] - top + step, corner[1] : lum.shape[1] - left + step]
    if (grown.shape[0] + 6 * max(grown.shape)) ** 2 <= MEASURE_PIXELS:
        origin = (top - step + corner[0], left - step + corner[1])
        fine = measure_region(lum, grown, fused_map, pixel_pitch_mm, noise_k, origin=origin)
        fine.score, fine.mean_score = score, mean_score
        fine.features.update(
            score=score, mean_score=mean_score, log_detection_area=math.log1p(count)
        )
        return fine
    area_px = int(np.count_nonzero(mask))
    area_mm2 = area_px * pixel_pitch_mm**2
    region_semu = float(semu(coarse.contrast_pct, area_mm2))
    features = {
        **coarse.features,
        "log_area": math.log1p(area_px),
        "log_detection_area": math.log1p(count),
        "log_semu": math.log(region_semu + 1e-4),
        "score": score,
        "mean_score": mean_score,
        **_shape_features(coarse.mask, (-(-lum.shape[0] // step), -(-lum.shape[1] // step))),
    }
    return Region(
        bbox=[int(left), int(top), int(right), int(bottom)],
        area_px=area_px,
        area_mm2=area_mm2,
        contrast_pct=coarse.contrast_pct,
        semu=region_semu,
        score=score,
        mean_score=mean_score,
        features=features,
        mask=mask,
    )


@dataclass
class _Components:
    """The connected components of a map at or above a threshold, found a band of rows at a
    time, numbered as ``ndimage.label`` numbers them on the whole map (in the raster order of
    their first pixel): each one's ``peaks``, ``sizes`` and ``boxes`` (``[row0, col0, row1,
    col1]``, exclusive ends); ``of_label`` gives, for each band's own labels in turn (label 1 of
    the first band, ..., label 1 of the second band, ...), the component it belongs to, and
    ``offsets`` where each band's labels begin in it; ``rows``: the bands' height."""

    peaks: np.ndarray
    sizes: np.ndarray
    boxes: np.ndarray
    of_label: np.ndarray
    offsets: list[int]
    rows: int


def _band_labels(band: np.ndarray, threshold: float) -> np.ndarray:
    """``ndimage.label`` of one band of rows (the 4-connected default, as on the whole map)."""
    return ndimage.label(band >= threshold)[0]


def _components(fused_map: Any, threshold: float) -> _Components:
    """``_Components`` of ``fused_map >= threshold`` (an array or a ``MapOnDisk``). Memory is a
    band's labels and a few numbers per component, not a label image the map's size (262 MB
    for a panel)."""
    height, width = fused_map.shape
    step = band_rows(width)
    peaks, sizes, boxes, offsets, links = [], [], [], [], []
    total, last_row = 0, None
    for start in range(0, height, step):
        band = fused_map[start : start + step]
        labels = _band_labels(band, threshold)
        count = int(labels.max(initial=0))
        where = np.flatnonzero(labels)
        ids = labels.ravel()[where]
        # Per label from its pixels sorted by label (np.maximum.at is several times slower);
        # a stable sort keeps each label's pixels in raster order.
        order = np.argsort(ids, kind="stable")
        ids, where = ids[order], where[order]
        firsts = np.flatnonzero(np.diff(ids, prepend=0))
        scores = band.ravel()[where]
        rows, cols = np.divmod(where, width)
        if count:
            peaks.append(np.maximum.reduceat(scores, firsts))
            sizes.append(np.diff(np.append(firsts, len(ids))))
            ends = np.append(firsts[1:], len(ids)) - 1
            boxes.append(
                np.stack(
                    [
                        start + rows[firsts],
                        np.minimum.reduceat(cols, firsts),
                        start + rows[ends] + 1,
                        np.maximum.reduceat(cols, firsts) + 1,
                    ],
                    axis=1,
                )
            )
        # Labels of this band touching those of the band above across their shared edge are
        # one component.
        first_row = np.where(labels[0] > 0, labels[0] + total, 0)
        if last_row is not None:
            touch = (last_row > 0) & (first_row > 0)
            links.append(np.stack([last_row[touch], first_row[touch]]) - 1)
        last_row = np.where(labels[-1] > 0, labels[-1] + total, 0)
        offsets.append(total)
        total += count
    if total == 0:
        empty = np.zeros(0, np.int64)
        return _Components(np.zeros(0), empty, np.zeros((0, 4), np.int64), empty, offsets, step)
    pairs = np.concatenate(links, axis=1) if links else np.zeros((2, 0), np.int64)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    # Numbered by their first label, which holds their first pixel in raster order.
    _, first_label = np.unique(component, return_index=True)
    rank = np.empty(len(first_label), np.int64)
    rank[np.argsort(first_label)] = np.arange(len(first_label))
    of_label = rank[component]
    count = len(first_label)
    label_peaks, label_boxes = np.concatenate(peaks), np.concatenate(boxes)
    merged_peaks = np.full(count, -np.inf)
    np.maximum.at(merged_peaks, of_label, label_peaks)
    merged_boxes = np.empty((count, 4), np.int64)
    merged_boxes[:, :2] = np.iinfo(np.int64).max
    merged_boxes[:, 2:] = -1
    np.minimum.at(merged_boxes[:, 0], of_label, label_boxes[:, 0])
    np.minimum.at(merged_boxes[:, 1], of_label, label_boxes[:, 1])
    np.maximum.at(merged_boxes[:, 2], of_label, label_boxes[:, 2])
    np.maximum.at(merged_boxes[:, 3], of_label, label_boxes[:, 3])
    merged_sizes = np.bincount(of_label, np.concatenate(sizes), count).astype(np.int64)
    return _Components(merged_peaks, merged_sizes, merged_boxes, of_label, offsets, step)


def _detection(fused_map: Any, threshold: float, found: _Components, index: int) -> np.ndarray:
    """Component ``index``'s pixels within its box (a crop, not a mask the map's size): the
    bands it spans labelled again as when it was found, their labels read as components."""
    row0, col0, row1, col1 = (int(v) for v in found.boxes[index])
    detection = np.empty((row1 - row0, col1 - col0), bool)
    for band in range(row0 // found.rows, (row1 - 1) // found.rows + 1):
        start = band * found.rows
        labels = _band_labels(fused_map[start : start + found.rows], threshold)
        offset = found.offsets[band]
        # Label 0 (background) reads as component -1.
        lookup = np.concatenate([[-1], found.of_label[offset : offset + int(labels.max())]])
        top, bottom = max(row0, start), min(row1, start + len(labels))
        detection[top - row0 : bottom - row0] = (
            lookup[labels[top - start : bottom - start, col0:col1]] == index
        )
    return detection


def find_regions(
    image: np.ndarray | LazyImage,
    fused_map: np.ndarray | MapOnDisk,
    threshold: float,
    pixel_pitch_mm: float,
    min_area_px: int = 1,
    max_regions: int = 50,
) -> list[Region]:
    """Measured regions of ``fused_map`` (``[H, W]``; an array, or a ``MapOnDisk`` read a band
    at a time) at or above ``threshold``, strongest first (at most ``max_regions``), measured
    on ``image`` (an array, or a ``LazyImage`` read on windows). The components are found and
    cut out a band of rows at a time."""
    if not isinstance(fused_map, MapOnDisk):
        fused_map = np.asarray(fused_map)
        if not np.issubdtype(fused_map.dtype, np.floating):
            fused_map = fused_map.astype(np.float32)
        if fused_map.ndim > 2 and all(side == 1 for side in fused_map.shape[:-2]):
            fused_map = fused_map.reshape(fused_map.shape[-2:])  # not squeeze: 1 px sides stay
    if not isinstance(image, LazyImage):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[1:] == fused_map.shape and image.shape[0] in (1, 3):
            image = np.moveaxis(image, 0, -1)  # [C, H, W]; tiny images make it ambiguous
    lum = luminance(image)
    if fused_map.shape != lum.shape:
        raise ValueError(f"map {fused_map.shape} and image {lum.shape} differ in size")
    found = _components(fused_map, threshold)
    order = [i for i in np.argsort(-found.peaks) if found.sizes[i] >= min_area_px][:max_regions]
    regions = []
    for i in order:
        origin = (int(found.boxes[i, 0]), int(found.boxes[i, 1]))
        detection = _detection(fused_map, threshold, found, i)
        regions += measure_detection(lum, detection, fused_map, pixel_pitch_mm, origin=origin)
    return regions[:max_regions]

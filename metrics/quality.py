"""Image-quality metrics for reconstruction members and panel uniformity.

Every ``XxxMetric`` averages a per-image value over the images given to ``update`` (images are
``[B, C, H, W]`` or ``[B, H, W]`` tensors or arrays in [0, 1]):

- ``PSNRMetric``: 10 log10(1 / MSE) per image.
- ``SSIMMetric`` and ``MSSSIMMetric``: through pytorch-msssim (Gaussian window 11, sigma 1.5).
- ``LPIPSMetric``: through the lpips package; its backbone (AlexNet, VGG16 or SqueezeNet 1.1)
  comes from ``backbones/`` in torchvision's published file, never from the network; LPIPS's own
  linear layers ship inside the package.
- ``DeltaE2000Metric``: mean CIEDE2000 colour difference (sRGB D65 to CIELAB), per pixel then
  per image; ``delta_e_2000`` follows Sharma, Wu & Dalal (2005) and is checked on their 34 pairs.
- ``MuraEnergyMetric``: FFT band-pass energy of the luminance after removing the low-frequency
  background (a wide Gaussian), in percent of the background: the smooth blotches mura are made
  of, without the panel's gradual fall-off and without pixel noise.
- ``WaveletUniformityMetric``: the largest detail band's energy of an orthonormal (Haar) wavelet
  transform of the luminance, in percent of the mean luminance (``wavelet_bands`` gives every
  level and orientation): banding and mura at that band's scale.

Each figure is one named function, which its metric class calls: ``psnr``, ``ssim_index``
(SSIM and MS-SSIM), ``LPIPSMetric.distance``, ``delta_e_2000``, ``mura_energy`` and
``wavelet_uniformity``. Three functions give the pipelines their figures: ``panel_quality``
(one panel's mura energy, wavelet uniformity and colour uniformity, for ``predict`` and the
hybrid's report), ``reconstruction_figures`` (per image: PSNR, SSIM, MS-SSIM and LPIPS against
a reconstruction member's output) and ``reconstruction_quality`` (their means, for the
benchmark's jobs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from artifacts.io import torch_load
from metrics.detection import Metric, to_numpy

LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# Pixel budgets that bound the figures of the largest panels (9344 x 7000 = 65 Mpx): the grid
# ``mura_energy`` filters and transforms, and the pixels whose ΔE2000 ``panel_quality`` computes.
MURA_MAX_PIXELS = 2048 * 2048
DELTA_E_MAX_PIXELS = 1 << 20


def image_batch(images: Any) -> torch.Tensor:
    tensor = torch.as_tensor(to_numpy(images), dtype=torch.float32)
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] or [B, H, W], got {tuple(tensor.shape)}")
    return tensor


class MeanOverImages(Metric):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._values: list[float] = []

    def _add(self, values: torch.Tensor | np.ndarray) -> None:
        self._values.extend(float(v) for v in np.asarray(values, dtype=np.float64).ravel())

    def compute(self) -> float:
        if not self._values:
            raise ValueError(f"{type(self).__name__}: no images were given to update()")
        return float(np.mean(self._values))


# MS-SSIM's five scales of an 11-px window need images of more than this many pixels a side.
MS_SSIM_MIN_SIDE = 160


def psnr(images: Any, references: Any) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, ``10 log10(1 / MSE)`` for images in [0, 1]
    (``[B, C, H, W]`` or ``[B, H, W]``): ``[B]``."""
    mse = ((image_batch(images) - image_batch(references)) ** 2).flatten(1).mean(1).double()
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def ssim_index(images: Any, references: Any, multiscale: bool = False) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004), or MS-SSIM (Wang, Simoncelli & Bovik 2003) with
    ``multiscale``, through pytorch-msssim: Gaussian window 11 px, sigma 1.5, data range 1:
    ``[B]``. MS-SSIM needs images of more than ``MS_SSIM_MIN_SIDE`` px a side."""
    from pytorch_msssim import ms_ssim, ssim

    a, b = image_batch(images), image_batch(references)
    if multiscale and min(a.shape[-2:]) <= MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"MS-SSIM needs images of more than {MS_SSIM_MIN_SIDE} px a side, got "
            f"{a.shape[-1]}x{a.shape[-2]}"
        )
    return (ms_ssim if multiscale else ssim)(a, b, data_range=1.0, size_average=False)


class PSNRMetric(MeanOverImages):
    name = "psnr"

    def update(self, images: Any, references: Any) -> None:
        self._add(psnr(images, references))


class SSIMMetric(MeanOverImages):
    name = "ssim"
    multiscale = False

    def update(self, images: Any, references: Any) -> None:
        self._add(ssim_index(images, references, self.multiscale))


class MSSSIMMetric(SSIMMetric):
    """MS-SSIM needs images of more than ``MS_SSIM_MIN_SIDE`` px per side."""

    name = "ms_ssim"
    multiscale = True


class LPIPSMetric(MeanOverImages):
    name = "lpips"

    def __init__(self, net: str = "alex", weights_dir: str | os.PathLike = "backbones") -> None:
        import lpips

        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        path = Path(weights_dir) / LPIPS_BACKBONE_FILES[net]
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS ({net}) needs the torchvision backbone file {path}; put "
                f"{LPIPS_BACKBONE_FILES[net]} into {weights_dir}/ (see backbones/README.md)"
            )
        # pnet_rand: build the backbone without torchvision's download, then load the local file.
        self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        features = {
            k.removeprefix("features."): v
            for k, v in torch_load(path).items()
            if k.startswith("features.")
        }
        own = self.model.net.state_dict()
        # lpips keeps torchvision's layer indices inside its slices: sliceK.<index>.<param>.
        mapped = {key: features[key.split(".", 1)[1]] for key in own}
        self.model.net.load_state_dict(mapped, strict=True)
        super().__init__()

    def distance(self, images: Any, references: Any) -> torch.Tensor:
        """LPIPS per image (Zhang et al. 2018) of images in [0, 1]: ``[B]``."""
        a, b = image_batch(images), image_batch(references)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.model(a, b, normalize=True).flatten()

    def update(self, images: Any, references: Any) -> None:
        self._add(self.distance(images, references))


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 1], ``[..., 3]``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ matrix.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def delta_e_2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 difference of CIELAB colours ``[..., 3]`` (kL = kC = kH = 1)."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = c1p * c2p == 0
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0.0, dh)
    d_lp, d_cp = L2 - L1, c2p - c1p
    d_hp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
    l_bar, cp_bar = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    wrapped = np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)
    h_bar = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, wrapped)
    h_bar = np.where(chroma_zero, h_sum, h_bar)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    terms = (d_lp / s_l) ** 2 + (d_cp / s_c) ** 2 + (d_hp / s_h) ** 2
    return np.sqrt(terms + r_t * (d_cp / s_c) * (d_hp / s_h))


class DeltaE2000Metric(MeanOverImages):
    name = "delta_e_2000"

    def update(self, images: Any, references: Any) -> None:
        a, b = image_batch(images), image_batch(references)
        if a.shape[1] != 3:
            raise ValueError(f"ΔE2000 needs RGB images [B, 3, H, W], got {tuple(a.shape)}")
        lab_a = srgb_to_lab(a.permute(0, 2, 3, 1).numpy())
        lab_b = srgb_to_lab(b.permute(0, 2, 3, 1).numpy())
        self._add(delta_e_2000(lab_a, lab_b).reshape(len(a), -1).mean(axis=1))


def mura_energy(
    luminance: np.ndarray,
    background_sigma: float = 32.0,
    band: tuple[float, float] = (4.0, 32.0),
    max_pixels: int | None = MURA_MAX_PIXELS,
) -> float:
    """Band-pass energy (RMS, percent of the background) of ``luminance`` ``[H, W]`` (floats,
    or integers as an 8- or 16-bit file holds them, read as fractions of their full scale): the
    deviation from a Gaussian-smoothed background, restricted by FFT to spatial periods between
    ``band[0]`` and ``band[1]`` pixels (by default 4 to 32: above pixel noise, below the
    panel's gradual fall-off).

    Images of more than ``max_pixels`` pixels are first reduced by block means over ``f x f``
    pixels, ``f`` the smallest integer that brings them within it, and the background sigma and
    the band are divided by ``f``, so that the figure still measures periods of ``band`` image
    pixels; this bounds time and memory (a 9344 x 7000 panel: ``f = 4``, a 2336 x 1750 grid).
    Periods shorter than ``2 f`` pixels, the reduced grid's limit, drop out (``f = 4``: 8 to
    32 px instead of 4 to 32 px) and those near it are attenuated by the block mean. ``None``:
    always at full resolution.
    """
    lum = np.asarray(luminance)
    if lum.ndim != 2:
        raise ValueError(f"expected a luminance image [H, W], got {lum.shape}")
    factor = 1
    if max_pixels is not None and lum.size > max_pixels:
        factor = math.ceil(math.sqrt(lum.size / max_pixels))
    if band[1] <= 2 * factor:
        raise ValueError(
            f"mura_energy: a {lum.shape[1]}x{lum.shape[0]} image reduced {factor}x to fit "
            f"max_pixels={max_pixels} keeps no period of the band {band} px; raise max_pixels"
        )
    lum = _block_means(lum, factor)
    background = ndimage.gaussian_filter(lum, background_sigma / factor, mode="reflect")
    deviation = lum / np.maximum(background, 1e-6) - 1
    spectrum = np.fft.rfft2(deviation)
    fy = np.fft.fftfreq(lum.shape[0])[:, None]
    fx = np.fft.rfftfreq(lum.shape[1])[None, :]
    frequency = np.hypot(fy, fx)
    keep = (frequency >= factor / band[1]) & (frequency <= factor / band[0])
    filtered = np.fft.irfft2(spectrum * keep, s=lum.shape)
    return float(100 * math.sqrt(np.mean(filtered**2)))


class MuraEnergyMetric(MeanOverImages):
    name = "mura_energy"

    def __init__(self, background_sigma: float = 32.0, band: tuple[float, float] = (4.0, 32.0)):
        self.background_sigma, self.band = background_sigma, tuple(band)
        super().__init__()

    def update(self, images: Any) -> None:
        for image in image_batch(images).mean(1).numpy():
            self._add([mura_energy(image, self.background_sigma, self.band)])


# The three detail bands of each level, in PyWavelets' order (cH, cV, cD): horizontal detail
# varies down the rows (horizontal lines and bands), vertical detail across the columns.
WAVELET_ORIENTATIONS = ("horizontal", "vertical", "diagonal")


def wavelet_bands(
    luminance: np.ndarray,
    wavelet: str = "haar",
    levels: int = 4,
    max_pixels: int | None = MURA_MAX_PIXELS,
) -> np.ndarray:
    """Relative energy of each detail band of ``luminance`` ``[H, W]`` (floats, or integers as
    an 8- or 16-bit file holds them), ``[levels, 3]``: row ``j - 1`` is level ``j``, columns
    ``WAVELET_ORIENTATIONS`` (horizontal, vertical, diagonal detail), in percent of the mean
    luminance; NaN for a band not measured.

    Definition: an orthonormal 2-D discrete wavelet transform (Mallat 1989) of the luminance
    ``L`` (``N`` pixels, mean ``mu``) to ``levels`` levels gives detail coefficients
    ``d[j, o]``; the band's relative energy is ``100 * sqrt(sum(d[j, o]**2) / N) / mu``. The
    transform is orthonormal, so by Parseval ``sum(d[j, o]**2)`` is the energy of the part of
    ``L`` that band reconstructs, and the figure is that part's RMS over the panel, a contrast
    in percent of the mean luminance like ``mura_energy`` (the squares of all bands and of the
    approximation add up to the mean square of ``100 * L / mu``). Divided by ``N`` rather than
    by the band's own coefficient count, a pattern of a given contrast reads alike at any
    level, while white pixel noise of relative sigma ``s`` reads ``100 s / 2**j`` (fine levels
    carry the noise). Level ``j`` responds most to periods of about ``2**j`` px (a sinusoid of
    that period puts about three quarters of its energy there, the rest in the levels beside
    it): by default levels 1 to 4, periods of about 2 to 16 px; above lies the panel's gradual
    fall-off. Horizontal banding (rows) shows in the horizontal band, column banding in the
    vertical one. A global gain does not change the figures.

    References: Mallat, "A theory for multiresolution signal decomposition: the wavelet
    representation", IEEE TPAMI 11(7), 1989 (the orthonormal transform); wavelet analysis of
    flat-panel non-uniformity, e.g. Tsai & Hung, "Automatic defect inspection of patterned
    TFT-LCD panels using 1-D Fourier reconstruction and wavelet decomposition", Int. J.
    Production Research (2005).

    ``wavelet``: any orthogonal PyWavelets wavelet; Haar by default. Haar's block structure
    needs no boundary extension (with ``mode="periodization"`` on a side that is a multiple of
    ``2**levels`` its basis never wraps around the panel's edge, which a longer filter such as
    db2 would, turning the left-to-right luminance difference into edge energy), it localises a
    one-pixel line to one coefficient, and its approximation is the block mean, so that the
    reduction below is exact. Its one vanishing moment lets a smooth gradient leak into the
    coarse levels, in proportion to the slope per pixel times ``2**j`` (db2's two vanishing
    moments would not, but its wrap-around puts edge energy into every level): the synthetic
    panels' 3 % non-uniformity and 4 % vignetting read about 0.3 % at level 4 of a 128 px
    panel, half that at 256 px, and next to nothing on a full-size one.

    The image is cropped to whole blocks of ``2**levels`` px (fewer levels where it is smaller
    than that; the last rows and columns, under ``2**levels``, are left out). Images of more
    than ``max_pixels`` pixels are first reduced by the means of ``f x f`` blocks, ``f`` the
    smallest power of two that brings them within it: that is the Haar approximation at level
    ``log2 f``, so levels above it come out as at full resolution (the same crop; with Haar
    exactly), and levels ``1 .. log2 f`` (periods of about ``f`` px and less) are NaN.
    A 9344 x 7000 panel: ``f = 4``, levels 3 and 4 on a 2336 x 1750 grid. ``None``: always at
    full resolution. Every band is NaN where the panel's mean luminance is not positive (no
    relative figure) or the image is under 2 px a side.
    """
    import pywt  # only this figure needs it

    lum = np.asarray(luminance)
    if lum.ndim != 2:
        raise ValueError(f"expected a luminance image [H, W], got {lum.shape}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    basis = pywt.Wavelet(wavelet)
    if not basis.orthogonal:
        raise ValueError(f"wavelet_bands needs an orthogonal wavelet, {wavelet!r} is not")
    factor = 1
    if max_pixels is not None and lum.size > max_pixels:
        factor = 2 ** math.ceil(math.log2(math.sqrt(lum.size / max_pixels)))
    skipped = factor.bit_length() - 1  # levels finer than the reduced grid's pixel
    if skipped >= levels:
        raise ValueError(
            f"wavelet_bands: a {lum.shape[1]}x{lum.shape[0]} image reduced {factor}x to fit "
            f"max_pixels={max_pixels} keeps none of levels 1-{levels}; raise max_pixels"
        )
    bands = np.full((levels, len(WAVELET_ORIENTATIONS)), np.nan)
    side = min(lum.shape) // factor
    held = min(levels - skipped, pywt.dwt_max_level(side, basis.dec_len) if side >= 2 else 0)
    if held < 1:
        return bands
    # Whole blocks of 2**held reduced pixels: the crop is the same at any reduction factor.
    block = factor * 2**held
    rows, cols = lum.shape[0] // block * block, lum.shape[1] // block * block
    reduced = _block_means(lum[:rows, :cols], factor)
    mean = float(reduced.mean())
    if not mean > 0:
        return bands
    coefficients = pywt.wavedec2(reduced, basis, mode="periodization", level=held)
    # wavedec2 lists the coarsest level first; the reduced grid's level 1 is level skipped + 1.
    for level, details in enumerate(reversed(coefficients[1:]), start=skipped + 1):
        for o, detail in enumerate(details):
            bands[level - 1, o] = 100 * math.sqrt(float(np.sum(detail**2)) / reduced.size) / mean
    return bands


def wavelet_uniformity(
    luminance: np.ndarray,
    wavelet: str = "haar",
    levels: int = 4,
    max_pixels: int | None = MURA_MAX_PIXELS,
) -> float | None:
    """The largest relative band energy of ``wavelet_bands`` (same arguments), in percent of the
    mean luminance: the contrast of the panel's strongest structure at any one scale and
    orientation, periods of about 2 to ``2**levels`` px (banding concentrates in one band, mura
    in the levels of its size). It rises with a pattern's contrast once that pattern's band is
    the panel's strongest; below, pixel noise at level 1 or the fall-off at the coarsest level
    sets it. Being an energy over the whole panel, it dilutes a small defect by its share of
    the area: banding of 0.5 % over a 128 px panel stands out, a single spot of 3 px sigma
    needs tens of percent (the anomaly maps find those). None where no band is measured (an
    image under 2 px a side, or a mean luminance that is not positive)."""
    bands = wavelet_bands(luminance, wavelet, levels, max_pixels)
    if np.isnan(bands).all():
        return None
    return float(np.nanmax(bands))


class WaveletUniformityMetric(MeanOverImages):
    name = "wavelet_uniformity"

    def __init__(self, wavelet: str = "haar", levels: int = 4) -> None:
        self.wavelet, self.levels = wavelet, levels
        super().__init__()

    def update(self, images: Any) -> None:
        for image in image_batch(images).mean(1).numpy():
            value = wavelet_uniformity(image, self.wavelet, self.levels)
            if value is None:
                raise ValueError(
                    f"wavelet_uniformity: no band of a {image.shape[1]}x{image.shape[0]} image "
                    "could be measured (under 2 px a side, or a mean luminance of 0 or less)"
                )
            self._add([value])


def _block_means(lum: np.ndarray, factor: int) -> np.ndarray:
    """``lum`` as float64 fractions of full scale (``_unit``), reduced by the means of whole
    ``factor x factor`` blocks (the last < factor rows and columns are left out)."""
    if factor == 1:
        return _unit(lum).astype(np.float64)
    rows, cols = lum.shape[0] // factor, lum.shape[1] // factor
    # A row of blocks at a time: an integer panel is converted a band at a time, never whole.
    reduced = np.empty((rows, cols))
    for row in range(rows):
        values = _unit(lum[row * factor : (row + 1) * factor, : cols * factor])
        reduced[row] = values.reshape(factor, cols, factor).mean(axis=(0, 2), dtype=np.float64)
    return reduced


def _unit(values: np.ndarray) -> np.ndarray:
    """Integers (an 8- or 16-bit image as its file holds it) as float32 fractions of their
    type's full scale, the values ``data.images.read_image`` gives; floats as they are."""
    if np.issubdtype(values.dtype, np.integer):
        return np.divide(values, np.iinfo(values.dtype).max, dtype=np.float32)
    return values


def panel_quality(image: np.ndarray) -> dict[str, float | None]:
    """Uniformity figures of one panel image as read, at its own resolution (``[H, W]`` or
    ``[H, W, 3]`` in [0, 1], or integers as an 8- or 16-bit file holds them):

    - ``mura_energy_pct``: ``mura_energy`` of its luminance (the channel mean, as the grading
      stage measures it), in percent of the background; large panels are reduced for the FFT
      (see ``mura_energy``).
    - ``wavelet_uniformity_pct``: ``wavelet_uniformity`` of the same luminance, the largest
      relative energy of a Haar detail band (levels 1 to 4, periods of about 2 to 16 px, each
      orientation), in percent of the mean luminance; None for an image under 2 px a side or
      one with no light.
    - ``delta_e2000_mean`` and ``delta_e2000_p99``: mean and 99th percentile of the CIEDE2000
      difference between each pixel and the panel's mean CIELAB colour (sRGB, D65). Colour
      panels only: both are None for grey images (one channel, or three equal ones), whose
      colour is not measured (which is not a difference of 0). Panels of more than
      ``DELTA_E_MAX_PIXELS`` pixels are measured on that many pixels drawn uniformly at random,
      with a fixed seed (the same image gives the same figures; random rather than a regular
      subgrid, which a sub-pixel pattern could alias).
    """
    image = np.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a panel image [H, W] or [H, W, 3], got {image.shape}")
    grey = image.ndim == 2 or (
        np.array_equal(image[..., 0], image[..., 1])
        and np.array_equal(image[..., 1], image[..., 2])
    )
    luminance = image
    if image.ndim == 3:  # the channel mean, converted a band of rows at a time
        luminance = np.empty(image.shape[:2], np.float32)
        for start in range(0, image.shape[0], 256):
            rows = slice(start, start + 256)
            luminance[rows] = _unit(image[rows]).mean(axis=2, dtype=np.float32)
    figures: dict[str, float | None] = {
        "mura_energy_pct": mura_energy(luminance),
        "wavelet_uniformity_pct": wavelet_uniformity(luminance),
        "delta_e2000_mean": None,
        "delta_e2000_p99": None,
    }
    if grey:
        return figures
    pixels = image.reshape(-1, 3)
    if len(pixels) > DELTA_E_MAX_PIXELS:
        pixels = pixels[np.random.default_rng(0).integers(0, len(pixels), DELTA_E_MAX_PIXELS)]
    lab = srgb_to_lab(np.clip(_unit(pixels), 0.0, 1.0))
    difference = delta_e_2000(lab, lab.mean(axis=0))
    figures["delta_e2000_mean"] = float(difference.mean())
    figures["delta_e2000_p99"] = float(np.percentile(difference, 99))
    return figures


RECONSTRUCTION_FIGURES = ("psnr_db", "ssim", "ms_ssim", "lpips")


def lpips_or_reason(
    net: str = "alex", weights_dir: str | os.PathLike = "backbones"
) -> tuple[LPIPSMetric | None, str | None]:
    """An ``LPIPSMetric``, or None and why not (its backbone file missing from ``weights_dir``,
    naming the file to put there, or the lpips package missing). Nothing is downloaded."""
    try:
        return LPIPSMetric(net, weights_dir), None
    except (FileNotFoundError, ImportError) as exc:
        return None, str(exc)


def reconstruction_figures(
    images: Any, reconstructions: Any, lpips: LPIPSMetric | None = None
) -> list[dict[str, float | None]]:
    """How closely each image is reconstructed: per image ``psnr_db`` (``psnr``), ``ssim`` and
    ``ms_ssim`` (``ssim_index``; None for images of at most ``MS_SSIM_MIN_SIDE`` px a side)
    and ``lpips`` (``LPIPSMetric.distance``; None without ``lpips``).

    ``images`` and ``reconstructions``: ``[B, C, H, W]`` in [0, 1]; one-channel images against
    three-channel reconstructions are compared as three equal channels (what the
    reconstruction members are trained to reproduce)."""
    reconstructions = image_batch(reconstructions)
    images = image_batch(images).expand(-1, reconstructions.shape[1], -1, -1)
    columns = {
        "psnr_db": psnr(reconstructions, images),
        "ssim": ssim_index(reconstructions, images),
    }
    if min(images.shape[-2:]) > MS_SSIM_MIN_SIDE:
        columns["ms_ssim"] = ssim_index(reconstructions, images, multiscale=True)
    if lpips is not None:
        columns["lpips"] = lpips.distance(reconstructions, images)
    return [
        {key: float(columns[key][i]) if key in columns else None for key in RECONSTRUCTION_FIGURES}
        for i in range(len(images))
    ]


def reconstruction_quality(
    pairs: Iterable[tuple[Any, Any]],
    lpips_net: str = "alex",
    weights_dir: str | os.PathLike = "backbones",
) -> dict[str, Any]:
    """How closely a member reconstructs its input: the mean over images of each of
    ``reconstruction_figures`` (over the images that have it: ``ms_ssim`` leaves out images of
    at most ``MS_SSIM_MIN_SIDE`` px a side; None where none has it), and ``count``, the number
    of images. ``pairs``: batches ``(images, reconstructions)``. LPIPS needs its backbone file in
    ``weights_dir`` (``LPIPS_BACKBONE_FILES``) and the lpips package; without them ``lpips`` is
    None and ``lpips_unavailable`` says why."""
    lpips, unavailable = lpips_or_reason(lpips_net, weights_dir)
    rows = [
        row
        for images, reconstructions in pairs
        for row in reconstruction_figures(images, reconstructions, lpips)
    ]
    if not rows:
        raise ValueError("reconstruction_quality: no images were given")
    figures: dict[str, Any] = {"count": len(rows)}
    for key in RECONSTRUCTION_FIGURES:
        values = [row[key] for row in rows if row[key] is not None]
        figures[key] = float(np.mean(values)) if values else None
    if unavailable is not None:
        figures["lpips_unavailable"] = unavailable
    return figures


QUALITY_METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (
        PSNRMetric,
        SSIMMetric,
        MSSSIMMetric,
        LPIPSMetric,
        DeltaE2000Metric,
        MuraEnergyMetric,
        WaveletUniformityMetric,
    )
}

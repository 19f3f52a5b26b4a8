"""Wavelet uniformity against the contrast of banding and mura on a defect-free synthetic panel:
a Markdown table on stdout and a small SVG plot (log-log) written to the path given.

    PYTHONPATH=. python docs/benchmarks/2026-12-07-wavelet-contrast.py OUT.svg
"""

import sys

import numpy as np

from data.synthetic import PanelGenerator
from metrics.quality import wavelet_uniformity
from tests.helpers import banding, mura_field

SIZE = 256
CONTRASTS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c"]


def svg_plot(series: dict[str, list[float]]) -> str:
    width, height, left, top = 360, 240, 50, 20
    xs = np.log10([max(c, 0.1) for c in CONTRASTS])  # 0 % drawn at 0.1 %
    values = np.array(list(series.values()))
    low, high = np.log10(values.min()) - 0.1, np.log10(values.max()) + 0.1

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - xs[0]) / (xs[-1] - xs[0]) * width,
            top + height - (np.log10(y) - low) / (high - low) * height,
        )

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + left + 190}" '
        f'height="{height + top + 45}" font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#888"/>',
    ]
    for contrast, x in zip(CONTRASTS, xs):
        label = "0" if contrast == 0 else f"{contrast:g}"
        parts.append(
            f'<text x="{at(x, 1)[0]:.1f}" y="{top + height + 14}" '
            f'text-anchor="middle">{label}</text>'
        )
    for exponent in range(int(np.floor(low)), int(np.ceil(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= np.log10(value) <= high:
                y = at(xs[0], value)[1]
                parts.append(
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>'
                )
    parts.append(
        f'<text x="{left + width / 2}" y="{top + height + 32}" text-anchor="middle">'
        "contrast of the pattern (%, log; 0 = the clean panel)</text>"
    )
    parts.append(
        f'<text transform="translate(12,{top + height / 2}) rotate(-90)" '
        'text-anchor="middle">wavelet uniformity (%, log)</text>'
    )
    for colour, (name, ys) in zip(COLOURS, series.items()):
        points = " ".join("{:.1f},{:.1f}".format(*at(x, y)) for x, y in zip(xs, ys))
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        index = list(series).index(name)
        parts.append(
            f'<text x="{left + width + 8}" y="{top + 14 + 16 * index}" '
            f'fill="{colour}">{name}</text>'
        )
    return "\n".join([*parts, "</svg>"]) + "\n"


def main() -> None:
    clean = PanelGenerator(size=SIZE, seed=0).generate_normal(0)["image"].astype(np.float64)
    mura = mura_field(SIZE, sigma=4, spacing=16)
    patterns = {
        "row banding, period 4 px": lambda c: banding(SIZE, 4, c),
        "row banding, period 16 px": lambda c: banding(SIZE, 16, c),
        "blotchy mura, 4 px blobs": lambda c: 1 - c / 100 * mura,
    }
    series = {
        name: [wavelet_uniformity(clean * pattern(c)) for c in CONTRASTS]
        for name, pattern in patterns.items()
    }
    print("| contrast (%) | " + " | ".join(series) + " |")
    print("|---" * (len(series) + 1) + "|")
    for k, contrast in enumerate(CONTRASTS):
        print(f"| {contrast:g} | " + " | ".join(f"{v[k]:.3f}" for v in series.values()) + " |")
    with open(sys.argv[1], "w") as handle:
        handle.write(svg_plot(series))


if __name__ == "__main__":
    main()

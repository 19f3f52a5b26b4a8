"""Predict's HTML report: counts, levels, region types, the panels' quality figures, a gallery of
the flagged panels by level (thumbnails of the overlays, linked relative to the output folder),
the skipped files; left-out tables say why. Opened in a real headless browser too."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from reporting.predict_report import GALLERY_MAX, write_predict_report
from reporting.quality import QUALITY_TABLE_WORST
from tests.helpers import browser_flags, find_browser

HYBRID = "reports/run/hybrid-rank-top3/hybrid"
MAGENTA = (255, 0, 255)  # the overlays' colour: no other part of the page draws it
NO_COLOUR = "no colour panel: ΔE2000 is measured on colour panels only"


def _region(kind: str, level: int) -> dict:
    return {
        "bbox": [4, 2, 14, 9],
        "area_px": 52,
        "area_mm2": 0.0468,
        "contrast_pct": 3.1,
        "semu": 1.7,
        "score": 0.82,
        "mean_score": 0.61,
        "type": kind,
        "type_confidence": 0.9,
        "level": level,
    }


def _entry(
    out: Path,
    name: str,
    *,
    label: int = 0,
    level: int = 0,
    score: float = 0.1,
    regions: tuple[dict, ...] = (),
    colour: bool = False,
    overlay: bool = True,
    mura: float = 1.0,
    wavelet: float = 0.5,
) -> dict:
    """An entry as ``prediction.run`` streams it, with a real overlay PNG in ``out/overlays``
    (named as predict names it; the stored path absolute, as a Ray run stores it)."""
    sha = hashlib.sha256(name.encode()).hexdigest()
    entry = {
        "path": f"/data/panels/{name}",
        "hybrid_id": "hybrid-0123456789",
        "sha256": sha,
        "status": "ok",
        "width": 120,
        "height": 80,
        "score": score,
        "label": label,
        "level": level,
        "regions": list(regions),
        "mura_energy_pct": mura,
        "wavelet_uniformity_pct": wavelet,
        "delta_e2000_mean": 0.8 if colour else None,
        "delta_e2000_p99": 2.4 if colour else None,
    }
    if overlay:
        path = out / "overlays" / f"{Path(name).stem}-{sha[:10]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 80), MAGENTA).save(path)
        entry["overlay"] = str(path.resolve())
    return entry


def _skipped(name: str, error: str) -> dict:
    return {
        "path": f"/data/panels/{name}",
        "hybrid_id": "hybrid-0123456789",
        "status": "skipped",
        "error": error,
    }


def _gallery(page: str) -> str:
    start = page.index('<div class="row gallery">')
    return page[start : page.index("</div>", start)]


def _folder(out: Path) -> list[dict]:
    """Four flagged panels of mixed levels and scores, one of them named with markup, two
    normal ones, two skipped files."""
    return [
        _entry(out, "a.png", label=1, level=3, score=0.7, regions=(_region("line", 3),)),
        _entry(out, "normal-1.png", score=0.2, mura=0.4),
        _entry(
            out,
            "b.png",
            label=1,
            level=5,
            score=0.6,
            regions=(_region("spot_mura", 5), _region("line", 2)),
        ),
        _entry(out, "<script>c.png", label=1, level=3, score=0.9, regions=(_region("line", 3),)),
        _entry(out, "d.png", label=1, level=1, score=0.99, regions=(_region("unknown", 1),)),
        _entry(out, "normal-2.png", score=0.3, mura=2.5, wavelet=3.0),
        _skipped("broken.png", "cannot identify image file"),
        _skipped("empty.png", "empty file <0 bytes>"),
    ]


def test_gallery_holds_the_flagged_panels_by_level_then_score(tmp_path):
    page = write_predict_report(tmp_path, HYBRID, _folder(tmp_path)).read_text()
    gallery = _gallery(page)
    names = re.findall(r"<figcaption><b>(.*?)</b>", gallery)
    assert names == ["b.png", "&lt;script&gt;c.png", "a.png", "d.png"]
    assert "normal-" not in gallery
    assert "level 5 · score 0.6 · 2 region(s): line, spot_mura" in gallery
    # Every link and thumbnail is relative to the folder and names a file in it.
    links = re.findall(r'(?:href|src)="([^"]+)"', gallery)
    assert len(links) == 8
    for link in links:
        assert link.startswith("overlays/") and str(tmp_path) not in link
        assert (tmp_path / unquote(link)).is_file()
    assert 'loading="lazy"' in gallery
    # Counts, levels and region types in the header.
    assert "<b>images predicted</b>: 6 · <b>flagged defective</b>: 4 · <b>skipped</b>: 2" in page
    levels = dict(re.findall(r"<tr><td>(\d)</td><td>(\d+)</td></tr>", page))
    assert levels == {"0": "2", "1": "1", "2": "0", "3": "2", "4": "0", "5": "1"}
    assert "<tr><td>line</td><td>3</td><td>3</td></tr>" in page


def test_the_folder_moves_with_its_links(tmp_path):
    out = tmp_path / "out"
    write_predict_report(out, HYBRID, _folder(out))
    moved = shutil.copytree(out, tmp_path / "copy")
    shutil.rmtree(out)
    for link in re.findall(r'src="([^"]+)"', (moved / "report.html").read_text()):
        assert (moved / unquote(link)).is_file()


def test_names_and_errors_are_escaped_and_skipped_files_listed(tmp_path):
    page = write_predict_report(tmp_path, HYBRID, _folder(tmp_path)).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;c.png" in page
    assert "<h2>Skipped files</h2>" in page
    assert "/data/panels/broken.png</td><td>cannot identify image file" in page
    assert "empty file &lt;0 bytes&gt;" in page


def test_quality_figures_of_grey_and_colour_panels(tmp_path):
    grey = tmp_path / "grey"
    page = write_predict_report(grey, HYBRID, _folder(grey)).read_text()
    assert f"<p>Left out — {NO_COLOUR}.</p>" in page
    assert page.count(NO_COLOUR) == 1  # one line for the two ΔE2000 figures
    assert "<th>ΔE2000 mean</th>" not in page and "<td>ΔE2000 p99</td>" not in page
    # Mura energy over the six predicted panels: min, median, 95th percentile, max.
    mura = np.array([1.0, 0.4, 1.0, 1.0, 1.0, 2.5])
    row = re.search(r"<tr><td>FFT mura energy \(%\)</td>(.*?)</tr>", page).group(1)
    expected = [6, 0.4, np.median(mura), np.percentile(mura, 95), 2.5]
    assert re.findall(r"<td>(.*?)</td>", row) == [f"{v:.4g}" for v in expected]
    assert page.count("<svg") == 2  # mura energy and wavelet uniformity histograms
    # One row per image in the quality table: the figures, flagged, level.
    assert "<td>/data/panels/normal-2.png</td><td>2.5</td><td>3</td><td>no</td><td>0</td>" in page

    colour = tmp_path / "colour"
    entries = [*_folder(colour), _entry(colour, "rgb.png", colour=True)]
    page = write_predict_report(colour, HYBRID, entries).read_text()
    assert NO_COLOUR not in page
    assert "<td>ΔE2000 mean</td><td>1</td><td>0.8</td>" in page
    assert "<th>ΔE2000 p99</th>" in page and page.count("<svg") == 4


def test_tables_with_nothing_to_say_are_left_out_with_a_line(tmp_path):
    entries = [
        _entry(tmp_path, "flagged.png", label=1, level=2, score=0.8, overlay=False),
        _entry(tmp_path, "normal.png", overlay=False),
    ]
    page = write_predict_report(tmp_path, HYBRID, entries).read_text()
    assert "Region types: left out, no regions were found." in page
    assert "1 flagged panel(s) have no overlay: overlays were off" in page
    assert "<img" not in page and "flagged.png</b><br>level 2" in _gallery(page)
    assert "Skipped files" not in page
    page = write_predict_report(tmp_path, HYBRID, [_skipped("x.png", "bad")]).read_text()
    assert "Levels: left out, no image was predicted." in page
    assert "Gallery: left out, no panel was flagged." in page
    assert "Panel quality: left out, no image was predicted." in page


def test_a_large_folder_caps_the_gallery_and_the_quality_table(tmp_path):
    n = GALLERY_MAX + 30
    entries = [
        _entry(
            tmp_path,
            f"{k}.png",
            label=1,
            level=k % 6,
            score=k / n,
            overlay=False,
            mura=float(k),
            wavelet=float(n - k),
        )
        for k in range(n)
    ]
    page = write_predict_report(tmp_path, HYBRID, entries).read_text()
    assert _gallery(page).count("<figure>") == GALLERY_MAX
    assert "30 more flagged panel(s) not shown" in page
    assert f"the {QUALITY_TABLE_WORST} least uniform" in page
    listed = re.findall(r"<tr><td>/data/panels/(\d+)\.png</td>", page)
    # The highest mura energies (the last images) and wavelet figures (the first) both make it.
    assert len(listed) == QUALITY_TABLE_WORST
    assert {"0", "1", str(n - 1), str(n - 2)} <= set(listed)


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium installed (.ci/run installs Debian's chromium); cannot open the report"
        )
    report = write_predict_report(tmp_path, HYBRID, _folder(tmp_path))
    flags = [
        *browser_flags(tmp_path / "profile"),
        # Lazy thumbnails load after the page's load event: give them time before the capture.
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Predict report" in dom.stdout and dom.stdout.count('src="overlays/') == 4
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,1400", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    # The four thumbnails drawn (220 x 147 px each): their magenta fills the screen, where a
    # thumbnail that did not load would leave a broken-image icon.
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    magenta = np.all(np.abs(pixels.astype(int) - MAGENTA) <= 8, axis=1).sum()
    assert magenta >= 4 * 0.9 * 220 * 146

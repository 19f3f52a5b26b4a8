"""The README's robustness figures match the suite: counts of bad-input and fault cases."""

from __future__ import annotations

import re
from pathlib import Path

from tests.robustness import cases, test_faults

README = Path(__file__).resolve().parents[2] / "README.md"


def suite_figures() -> dict[str, int]:
    faults = [name for name in vars(test_faults) if name.startswith("test_")]
    return {
        "bad images": len(cases.IMAGE_CASES) + len(cases.TILE_CASES),
        "bad folders": len(cases.BENCHMARK_FOLDER_CASES)
        + len(cases.BAD_FOLDERS)
        + len(cases.PREDICT_FOLDER_CASES),
        "bad configurations": len(cases.BAD_CONFIGS) + len(cases.MEMBER_CONFIG_CASES),
        "tampered artifacts": len(cases.BAD_ARTIFACTS),
        "SIGKILL": sum("killed" in name for name in faults),
        "full disk": sum("full_disk" in name for name in faults),
    }


def readme_figures() -> dict[str, int]:
    text = README.read_text()
    section = text[text.index("## Robustness") :]
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \| ([^|]+?) \|", section, flags=re.M)
    return {label.split(":")[0].strip(): int(count) for label, count, _ in rows}


def test_the_readme_counts_what_the_suite_tries():
    figures = suite_figures()
    assert readme_figures() == figures
    assert sum(figures.values()) == sum(readme_figures().values())
    section = README.read_text().split("## Robustness", 1)[1]
    total_bad = sum(v for k, v in figures.items() if k.startswith(("bad", "tampered")))
    total_faults = figures["SIGKILL"] + figures["full disk"]
    assert f"{total_bad} bad-input cases" in section and f"{total_faults} fault cases" in section

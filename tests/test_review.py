"""The test images to review (``evaluation.review.ReviewCases``): the worst misses and the
false alarms kept while a split is scored, each with its overlay on disk and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.review import ReviewCases
from fusion.hybrid import Prediction


def _case(index: int, label: int, score: float, flagged: int) -> tuple[dict, Prediction]:
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = bool(label)
    sample = {"image": np.full((16, 16), 0.5, np.float32), "label": label, "mask": mask,
              "path": f"panels/{index:03d}.png"}  # fmt: skip
    heat = np.zeros((16, 16), np.float32)
    return sample, Prediction(score, flagged, 0, [], heat, {}, None, None, 1.0)


def test_the_worst_misses_and_false_alarms_are_kept_with_their_overlays_only(tmp_path):
    folder = tmp_path / "review"
    folder.mkdir()
    (folder / "missed-00099-old.png").write_bytes(b"an earlier run's")
    (folder / "notes.png").write_bytes(b"not ours")
    cases = ReviewCases(folder, per_kind=3)
    assert not (folder / "missed-00099-old.png").exists() and (folder / "notes.png").exists()
    miss_scores = [0.5, 0.1, 0.3, 0.1, 0.9, 0.2, float("nan")]
    for index, score in enumerate(miss_scores):
        cases.offer(index, *_case(index, 1, score, 0))
    alarm_scores = [2.0, 3.0, 1.5, 3.0]
    for index, score in enumerate(alarm_scores, start=10):
        cases.offer(index, *_case(index, 0, score, 1))
    for index in (20, 21):  # caught and correctly passed: not cases
        cases.offer(index, *_case(index, 1, 5.0, 1))
        cases.offer(index + 10, *_case(index + 10, 0, 0.0, 0))
    summary = cases.summary()
    assert summary["counts"] == {"missed": 7, "false alarm": 4} and summary["per_kind"] == 3
    kept = [(c["kind"], Path(c["path"]).stem) for c in summary["cases"]]
    # Lowest misses first (ties in image order), highest false alarms first; NaN never kept.
    assert kept == [
        ("missed", "001"), ("missed", "003"), ("missed", "005"),
        ("false alarm", "011"), ("false alarm", "013"), ("false alarm", "010"),
    ]  # fmt: skip
    written = sorted(p.name for p in folder.glob("*.png") if p.name != "notes.png")
    assert written == sorted(Path(c["overlay"]).name for c in summary["cases"])
    assert all(c["overlay"].startswith("review/") for c in summary["cases"])


def test_a_case_whose_overlay_cannot_be_written_is_still_listed(tmp_path):
    blocked = tmp_path / "review"
    blocked.write_text("a file where the folder should be")
    cases = ReviewCases(blocked, per_kind=2)
    cases.offer(0, *_case(0, 1, 0.2, 0))
    (case,) = cases.summary()["cases"]
    assert case["overlay"] is None and "review" in case["overlay_error"]

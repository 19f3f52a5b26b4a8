"""The fixed holdout on which champion and challenger are compared.

Chosen once, on the first run (a seeded share of its normal images), extended only by new
confirmed defects, and never trained on. Its normal images also get injected-defect copies with
a fixed seed, so every run scores on the same samples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from artifacts.io import atomic_write_json
from data.datasets import ImageFiles
from data.images import IntensityWindow, to_tensor

# What a holdout can score by (``retrain.metric``).
METRICS = ("composite", "image_auroc", "pixel_auroc", "aupro")


class HoldoutSet(Dataset):
    """Fixed holdout samples held in memory: real files and injected-defect copies."""

    def __init__(self, samples: list[dict[str, Any]], has_masks: bool) -> None:
        self.samples, self.has_masks = samples, has_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def choose_holdout(
    workspace: Path, normals: list[str], defects: list[str], opts: Mapping[str, Any]
) -> dict:
    """The fixed holdout: chosen on the first run, extended only by new confirmed defects."""
    path = workspace / "holdout.json"
    if path.is_file():
        holdout = json.loads(path.read_text())
    else:
        if len(normals) < 4:
            raise ValueError(
                f"the first run needs at least 4 normal images, found {len(normals)} in "
                f"retrain.normal_dirs: {', '.join(map(str, opts['normal_dirs']))}"
            )
        order = np.random.default_rng(0).permutation(len(normals))
        count = max(2, int(round(len(normals) * opts["holdout_fraction"])))
        holdout = {"normal": sorted(normals[i] for i in order[:count]), "defects": []}
    holdout["defects"] = sorted(set(holdout["defects"]) | set(defects))
    atomic_write_json(path, holdout)
    return holdout


def holdout_dataset(holdout: dict, opts: Mapping[str, Any], window: IntensityWindow) -> HoldoutSet:
    """The holdout at its images' own size, as predict sees them."""
    from data.validation import injected_validation_samples

    normal = ImageFiles([Path(p) for p in holdout["normal"]], None, window)
    defect_paths = [Path(p) for p in holdout["defects"]]
    defects = ImageFiles(defect_paths, None, window, [p.parent.name for p in defect_paths])
    samples = [normal[i] for i in range(len(normal))] + [defects[i] for i in range(len(defects))]
    injected = injected_validation_samples(
        (s["image"] for s in samples[: len(normal)]), opts["holdout_injections"], seed=12345
    )
    for k, sample in enumerate(s for s in injected if s["label"]):
        samples.append(
            {
                "image": to_tensor(sample["image"]),
                "label": 1,
                "defect_type": sample["defects"][0]["type"],
                "path": f"injected-{k}",
                "mask": torch.from_numpy(sample["mask"]).float()[None],
                "instances": torch.from_numpy(sample["instances"].astype(np.int64))[None],
                "defects": sample["defects"],
                "level": sample["level"],
            }
        )
    # Confirmed defects come without masks: pixel metrics only where every defect has one.
    return HoldoutSet(samples, has_masks=not holdout["defects"])


def holdout_score(
    hybrid, holdout: HoldoutSet, metric: str
) -> tuple[float, dict[str, float], list[dict[str, Any]]]:
    """``hybrid``'s ``metric`` on the holdout, all its figures there, and its per-image
    records (label and score, in the holdout's order)."""
    from evaluation import evaluate_hybrid
    from metrics.composite import composite

    # The holdout's comparison pairs both hybrids (compare_on_holdout): no intervals of one.
    evaluation = evaluate_hybrid(hybrid, holdout, intervals=False)
    metrics = evaluation["metrics"]["hybrid"]
    value = composite(metrics) if metric == "composite" else metrics.get(metric, float("nan"))
    return float(value), metrics, evaluation["records"]


def compare_on_holdout(
    challenger: Sequence[Mapping[str, Any]],
    champion: Sequence[Mapping[str, Any]],
    exact: Mapping[str, Mapping[str, float]],
) -> dict[str, Any] | None:
    """The challenger's lead over the champion in image AUROC and AP on the same holdout
    images (their records, from ``holdout_score``), with the lead's paired bootstrap interval
    and verdict, so a history entry tells a real change from the holdout's noise. ``exact``:
    both hybrids' figures by name. None without normal and defective holdout images."""
    from metrics.bootstrap import PairedBootstrap

    bootstrap = PairedBootstrap()
    for mine, theirs in zip(challenger, champion, strict=True):
        if mine["path"] != theirs["path"]:
            raise ValueError(f"holdout records differ: {mine['path']} and {theirs['path']}")
        bootstrap.update(mine["label"], {"challenger": mine["score"], "champion": theirs["score"]})
    result = bootstrap.compute("challenger", exact)
    if result is None:
        return None
    return {
        "method": result["method"],
        "confidence": result["confidence"],
        "images": result["images"],
        **result["differences"]["champion"],
    }


PROMOTE_ON = ("margin", "verdict")


def promotion(
    score: float,
    champion_score: float,
    comparison: Mapping[str, Any] | None,
    promote_on: str = "margin",
    margin: float = 0.0,
) -> tuple[bool, str]:
    """Whether the challenger replaces the champion, and why. ``margin``: its holdout score
    (``retrain.metric``) is at least the champion's less ``margin``. ``verdict``: its image
    AUROC lead on the same holdout images (``compare_on_holdout``) is "higher" by the paired
    bootstrap: the interval lies above zero, so a lead the holdout's noise could give is not
    enough; without a comparison (a holdout of one class) it is not promoted."""
    if promote_on not in PROMOTE_ON:
        raise ValueError(f"retrain.promote_on: {promote_on!r}; choose one of {PROMOTE_ON}")
    reason = f"challenger {score:.4f} vs champion {champion_score:.4f}"
    lead = (comparison or {}).get("image_auroc")
    if lead:
        low, high = lead["interval"]
        reason += (
            f"; image AUROC lead {lead['difference']:+.4f} [{low:+.4f}, {high:+.4f}] "
            f"{lead['verdict']}"
        )
    if promote_on == "margin":
        return score >= champion_score - margin, f"{reason} (margin {margin})"
    if lead is None:
        return False, f"{reason}; no paired verdict (the holdout needs normal and defective images)"
    return lead["verdict"] == "higher", f"{reason} (promoted only when higher)"

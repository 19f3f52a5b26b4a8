"""The saved hybrid: one folder, checked against its SHA-256 manifest before anything loads.

The folder holds ``hybrid.json`` (format version, member names, the hybrid's constructor
options, the image threshold, what it was fitted on, the grader choice), ``members/<name>/``
(each member's own saved folder), ``fusion.joblib`` (the image and pixel ``ScoreFusion``),
``grading.joblib`` (pixel threshold calibrator, type classifier, grader) and the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from artifacts.io import (
    MANIFEST_NAME,
    ArtifactError,
    atomic_folder,
    atomic_joblib_dump,
    atomic_write_json,
    load_joblib_verified,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from members.base import Member, load_member

FORMAT_VERSION = 1
HYBRID_FILE = "hybrid.json"
FUSION_FILE = "fusion.joblib"
GRADING_FILE = "grading.joblib"
# The fitted state each file holds, by attribute name without its trailing underscore.
FUSION_STATE = ("image_fusion", "pixel_fusion")
GRADING_STATE = ("calibrator", "type_classifier", "grader")
# ``selected``: the members the fusion weighs (those saved); absent from hybrids saved before
# members could be left out, where it is every member.
DESCRIBED_STATE = ("image_threshold", "validation", "grader_report", "selected")
FITTED_STATE = FUSION_STATE + GRADING_STATE + DESCRIBED_STATE


def hybrid_id(folder: str | Path) -> str:
    """What identifies a saved hybrid: the SHA-256 of its manifest (which lists every file's)."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


def save_hybrid(
    folder: str | Path,
    members: Mapping[str, Member],
    options: Mapping[str, Any],
    fitted: Mapping[str, Any],
) -> Path:
    """Write a hybrid folder (atomically: readers see the old folder or the new one, whole).

    ``members``: fitted members by name, in order; ``options``: the hybrid's constructor
    options but ``members``; ``fitted``: its fitted state, every name of ``FITTED_STATE``."""
    folder = Path(folder)
    names = list(members)
    with atomic_folder(folder) as tmp:
        for name in names:
            members[name].save(tmp / "members" / name)
        atomic_joblib_dump({k: fitted[k] for k in FUSION_STATE}, tmp / FUSION_FILE)
        atomic_joblib_dump({k: fitted[k] for k in GRADING_STATE}, tmp / GRADING_FILE)
        atomic_write_json(
            tmp / HYBRID_FILE,
            {
                "format_version": FORMAT_VERSION,
                "members": names,
                "options": dict(options),
                **{k: fitted[k] for k in DESCRIBED_STATE},
            },
        )
        write_manifest(tmp)
    return folder


def load_hybrid(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Member], dict[str, Any], dict[str, Any]]:
    """A saved hybrid's members by name (on ``device``), constructor options and fitted state
    (as ``save_hybrid`` takes them); every file is checked against the manifest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such hybrid folder")
    verify_manifest(folder)
    try:
        meta = json.loads((folder / HYBRID_FILE).read_text())
        names, options = meta["members"], meta["options"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{folder / HYBRID_FILE}: not a hybrid description ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: hybrid format {meta.get('format_version')} unsupported")
    members = {name: load_member(folder / "members" / name, device) for name in names}
    fitted = {
        **load_joblib_verified(folder / FUSION_FILE, folder),
        **load_joblib_verified(folder / GRADING_FILE, folder),
        **{k: meta[k] for k in DESCRIBED_STATE if k != "selected"},
        "selected": meta.get("selected") or names,
    }
    return members, options, fitted

"""The saved hybrid: one folder, checked against its SHA-256 manifest before anything loads.

The folder holds ``hybrid.json`` (format version, member names, the hybrid's constructor
options, the image threshold, what it was fitted on, the grader choice), ``members/<name>/``
(each member's own saved folder), ``fusion.joblib`` (the image and pixel ``ScoreFusion``),
``grading.joblib`` (pixel threshold calibrator, type classifier, grader) and the manifest.
``Hybrid.save`` writes it with ``save_hybrid``; ``Hybrid.load``, the one way in, reads it with
``read_hybrid``, which checks each file once, on the bytes it then uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts.io import (
    ArtifactError,
    VerifiedFolder,
    atomic_folder,
    atomic_joblib_dump,
    atomic_write_json,
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


@dataclass
class SavedHybrid:
    """What a hybrid folder holds, as ``save_hybrid`` took it, and its identity (``manifest_id``:
    the SHA-256 of its manifest)."""

    members: dict[str, Member]
    options: dict[str, Any]
    fitted: dict[str, Any]
    identity: str


def read_hybrid(folder: str | Path, device: str | torch.device = "cpu") -> SavedHybrid:
    """A saved hybrid's members (on ``device``), constructor options and fitted state. Each file
    is checked against the manifest once, as it is read (nothing is unpickled before its bytes
    matched), and the files not read are checked at the end."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such hybrid folder")
    files = VerifiedFolder.open(folder)
    try:
        meta = files.read_json(HYBRID_FILE)
        names, options = meta["members"], meta["options"]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{folder / HYBRID_FILE}: not a hybrid description ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: hybrid format {meta.get('format_version')} unsupported")
    members = {
        name: load_member(folder / "members" / name, device, files.within(f"members/{name}"))
        for name in names
    }
    fitted = {
        **files.load_joblib(FUSION_FILE),
        **files.load_joblib(GRADING_FILE),
        **{k: meta[k] for k in DESCRIBED_STATE if k != "selected"},
        "selected": meta.get("selected") or names,
    }
    files.verify()  # the members' own manifests, anything else listed
    return SavedHybrid(members, options, fitted, files.identity)

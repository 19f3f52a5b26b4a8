"""Helpers the tests share: fit a member on the small panel set and score it, run scripts and
modules, find a browser, and the uniformity test patterns (banding, blotchy mura)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.datasets import collate_samples, get_dataset
from members import FabricTrainer, Member
from metrics import get_metric


def panel_loader(data_dir: Path, split: str, size: int = 128, batch_size: int = 8) -> DataLoader:
    dataset = get_dataset(
        "mvtec", data_dir=data_dir, categories=["panel"], split=split, image_size=size
    )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=split == "train", collate_fn=collate_samples
    )


def fit_member(
    member: Member, data_dir: Path, batch_size: int = 8, **trainer_options
) -> list[dict]:
    """Fit ``member`` on the panels' training split; its history rows."""
    trainer_options.setdefault("progress", False)
    trainer = FabricTrainer(**trainer_options)
    train = panel_loader(data_dir, "train", batch_size=batch_size)
    return member.fit(train, None, trainer).history_


def fit_supervised(member: Member, data_dir: Path, **trainer_options) -> Member:
    """Train the supervised member (a head, whose options ``member`` carries) on the panels'
    training images and one injected-defect copy of each, on cached features."""
    import numpy as np

    from data.validation import injected_validation_samples
    from members.supervised import cache_features, train_head

    trainer_options.setdefault("progress", False)
    train = panel_loader(data_dir, "train").dataset
    samples = injected_validation_samples(
        [train[i]["image"] for i in range(len(train))], injections_per_image=1, seed=0
    )

    def inputs():
        for sample in samples:
            image = torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32)
            image = image.permute(2, 0, 1) if image.ndim == 3 else image.expand(3, -1, -1)
            mask = sample["mask"] if sample["label"] else np.zeros((1, 1))
            yield image[None], mask, sample["label"]

    cached = cache_features(member, inputs())
    return train_head(member, cached, FabricTrainer(**trainer_options))


def separation(member: Member, data_dir: Path) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of a fitted member on the panels' test split."""
    image_auroc, pixel_auroc = get_metric("image_auroc"), get_metric("pixel_auroc")
    for batch in panel_loader(data_dir, "test"):
        out = member.predict(batch["image"])
        image_auroc.update(out["pred_score"], batch["label"])
        pixel_auroc.update(out["anomaly_map"], batch["mask"])
    return float(image_auroc.compute()), float(pixel_auroc.compute())


def outputs_equal(first: Member, second: Member, images: torch.Tensor) -> bool:
    a, b = first.predict(images), second.predict(images)
    return torch.allclose(a["pred_score"], b["pred_score"], atol=1e-5) and torch.allclose(
        a["anomaly_map"], b["anomaly_map"], atol=1e-5
    )


def run_script(script: str, folder: Path, *args: str) -> None:
    """Run ``script`` (Python source) in a fresh interpreter with the repository importable,
    for multi-process (DDP) tests; fails the test with the script's stderr."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    path = folder / "script.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def run_module(
    module: str,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    pythonpath: tuple[Path, ...] = (),
    timeout: float = 600,
    start_new_session: bool = False,
):
    """``python -m module args`` in a fresh interpreter (the repository importable, ``pythonpath``
    first, e.g. a folder with a ``sitecustomize.py``); returns the ``CompletedProcess`` with its
    text output, whatever the exit status."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(str(p) for p in (*pythonpath, repo))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd or repo,
        env={**os.environ, **(env or {}), "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=start_new_session,
    )


def find_browser() -> str | None:
    """A headless-capable Chromium on the PATH (``.ci/run`` installs Debian's), or None."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_flags(profile: Path) -> list[str]:
    """Chromium's flags for opening a report offline and headless, its profile in ``profile``."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def banding(size: int, period: float, contrast_pct: float, rows: bool = True) -> np.ndarray:
    """Sinusoidal banding as a relative luminance change ``1 + c sin(2 pi x / period)``: rows
    (varying down the panel) or columns."""
    x = np.arange(size, dtype=np.float64)
    wave = 1 + contrast_pct / 100 * np.sin(2 * np.pi * x / period)
    return np.broadcast_to(wave[:, None] if rows else wave[None, :], (size, size))


def mura_field(size: int, sigma: float, spacing: int) -> np.ndarray:
    """Blotchy mura: Gaussian blobs of ``sigma`` px about every ``spacing`` px (jittered by a
    fixed seed), peak 1: the profile ``p`` of a relative change ``1 - c p``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    field = np.zeros((size, size))
    for cy in np.arange(spacing / 2, size, spacing):
        for cx in np.arange(spacing / 2, size, spacing):
            dy, dx = rng.uniform(-spacing / 4, spacing / 4, 2)
            field += np.exp(-((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) / (2 * sigma**2))
    return field / field.max()

"""The supervised member against a logistic regression on the same pooled features, on
synthetic panels of fresh generator seeds (docs/benchmarks/2026-12-07-supervised-dev-seeds.md).

    PYTHONPATH=. python docs/benchmarks/2026-12-07-supervised-dev-seeds.py SEED [SEED ...]
        [--epochs 20] [--lr 0.002] [--out FOLDER]

Each seed is a new set of default panels (``synthetic`` section of the ensemble's defaults,
``n_train`` defect-free training panels and ``n_test`` test panels, half defective), generated
into ``synthetic.cache_dir``. Nothing was fitted or chosen on these seeds: the default run uses
seed 0 and its unseen panels seed 1. The test panels are cut into 5 grouped folds as
``pipelines.ensemble`` cuts them; the head trained without fold ``k`` (on the training panels,
one injected copy of each and the other folds' labeled panels, as ``SupervisedFolds`` trains
every head) answers fold ``k``. ``SupervisedFolds.logistic_baseline`` answers the same folds
from the same training samples. Prints one line per seed: the out-of-fold image AUROC of the
head's decision, of its segmentation map's maximum, and of the logistic regression; writes each
seed's scores to ``FOLDER/seed<S>.npz``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from configs.loader import load_config
from data.sources import make_dataset, resolve_source
from data.validation import labeled_defect_sample
from evaluation.scoring import grouped_folds
from evaluation.supervision import build_supervised


def as_input(image: np.ndarray) -> torch.Tensor:
    """A ``[H, W, C]`` or ``[H, W]`` panel in [0, 1] as the members take it (``[1, 3, H, W]``;
    the panels are already at the members' input size)."""
    tensor = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]
    return tensor.expand(3, -1, -1)[None].contiguous()


def run_seed(seed: int, epochs: int, lr: float, out: Path) -> str:
    cfg = load_config(
        "ensemble",
        overrides=[
            f"members.supervised.trainer.max_epochs={epochs}",
            f"members.supervised.lr={lr}",
        ],
    )
    source = resolve_source(cfg["data"], cfg["synthetic"], seed)
    train = make_dataset(source, "panel", "train", seed, None)
    test = make_dataset(source, "panel", "test", seed, None)
    samples = [labeled_defect_sample(test[i]) for i in range(len(test))]
    labels = np.array([s["label"] for s in samples])
    groups = [s.get("group", str(i)) for i, s in enumerate(samples)]
    fold_of = grouped_folds(labels, groups, 5, cfg["seed"])
    folds = build_supervised(
        {},
        cfg["members"]["supervised"],
        cfg["trainer"],
        cfg["device"],
        lambda images: [as_input(image) for image in images],
        cfg["ensemble"]["supervised_injections"],
        cfg["data"]["pixel_pitch_mm"],
        cfg["seed"],
        workers=cfg["ensemble"]["fit_workers"],
    )
    started = time.perf_counter()
    normal = (train[i]["image"] for i in range(len(train)))
    folds.fit(normal, samples, fold_of, [], nested=False)
    decision, segmentation_max = [], []
    for index, fold in enumerate(fold_of):
        score, segmentation = folds.answers_[(frozenset({int(fold)}), "labeled")][index]
        decision.append(score)
        segmentation_max.append(float(segmentation.max()))
    logistic = folds.logistic_baseline()
    seconds = time.perf_counter() - started
    np.savez(
        out / f"seed{seed}.npz",
        label=labels,
        decision=decision,
        segmentation_max=segmentation_max,
        logistic=logistic,
    )
    return (
        f"seed {seed}: {len(labels)} panels, {labels.sum()} defective; image AUROC decision "
        f"{roc_auc_score(labels, decision):.4f}, segmentation max "
        f"{roc_auc_score(labels, segmentation_max):.4f}, logistic "
        f"{roc_auc_score(labels, logistic):.4f} ({seconds:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--out", type=Path, default=Path("supervised-dev-seeds"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        print(run_seed(seed, args.epochs, args.lr, args.out), flush=True)


if __name__ == "__main__":
    main()

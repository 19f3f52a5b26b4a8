"""Replay the image fusion of an ensemble's cross-validation folds with three normalizer
references (docs/benchmarks/2026-12-07-nested-normalizers.md).

    PYTHONPATH=. python docs/benchmarks/2026-12-07-nested-normalizers-replay.py dump RUN OUT.pkl
    PYTHONPATH=. python docs/benchmarks/2026-12-07-nested-normalizers-replay.py replay OUT.pkl

``dump`` runs ``pipelines.ensemble --from RUN`` up to the hybrids' fits (members, supervised
heads), saves the member scores every fit reads, with each row's label, group and split, and
stops (its log and configuration are left in RUN/replay-dump). ``replay`` fits each fold's
forward image fusion on them as ``Hybrid.fit`` does, with the normalizer fitted on every normal
image, on the held-out images only, or on every normal image but the supervised member's
answers from other heads (the shipped rule), and prints the pooled out-of-fold image AUROC, the
miss rates at 1, 2 and 5 % false alarms and the paired interval against the supervised member,
on the test split.
"""

from __future__ import annotations

import pickle
import sys

import numpy as np


class _Dumped(BaseException):
    """Stops the ensemble once the scores are saved (not an Exception: the pipeline reports
    those as errors)."""


def dump(run: str, out: str) -> None:
    import evaluation.scoring as scoring
    import fusion.fitting as fitting
    from pipelines.ensemble import main

    captured: dict = {}
    grouped_folds = scoring.grouped_folds

    def folds(*args, **kwargs):
        captured["fold_of"] = grouped_folds(*args, **kwargs)
        return captured["fold_of"]

    def fit_hybrids(hybrids, sample_sets, *args, **kwargs):
        captured["fits"] = []
        for hybrid, samples in zip(hybrids, sample_sets):
            rows = []
            for sample in samples:
                outputs = sample["member_outputs"]
                scores, _ = outputs() if callable(outputs) else outputs
                rows.append({"scores": np.asarray(scores, float), "label": int(sample["label"])})
                rows[-1]["split"] = sample.get("split")
                rows[-1]["group"] = str(sample.get("group", f"image-{len(rows) - 1}"))
                defects = sample.get("defects") or []
                rows[-1]["real"] = not defects or any(d.get("source") == "labeled" for d in defects)
            captured["fits"].append({"names": list(hybrid.names), "rows": rows})
        with open(out, "wb") as file:
            pickle.dump(captured, file)
        raise _Dumped

    scoring.grouped_folds = folds
    fitting.fit_hybrids = fit_hybrids
    try:
        main(["--from", run, "--name", "replay-dump"])
    except _Dumped:
        print(f"member scores of {len(captured['fits'])} fits written to {out}")


def replay(path: str) -> None:
    from sklearn.metrics import roc_auc_score

    from fusion.combiners import ScoreFusion
    from metrics.bootstrap import PairedBootstrap
    from metrics.detection import miss_rates

    with open(path, "rb") as file:
        dumped = pickle.load(file)
    fits, fold_of = dumped["fits"], dumped["fold_of"]
    names = fits[0]["names"]
    # The last fit (every fold) reads each test image through the head without its fold:
    # the answers the out-of-fold scoring reads.
    final = fits[-1]["rows"]
    test = [row for row in final if row["split"] == "test"]
    scores = np.stack([row["scores"] for row in test])
    labels = np.array([row["label"] for row in test])

    def reference(rows: list[dict], rule: str) -> np.ndarray | None:
        held_out = np.array([row["split"] != "test" for row in rows])
        if rule == "every normal image":
            return None
        if rule == "held-out images only":
            return held_out
        cells = np.ones((len(rows), len(names)), bool)
        if "supervised" in names:
            cells[~held_out, names.index("supervised")] = False
        return cells

    detectors = {name: scores[:, m] for m, name in enumerate(names)}
    rules = ("every normal image", "held-out images only", "but other heads' answers")
    for rule in rules:
        fused = np.empty(len(test))
        for fold, fit in enumerate(fits[:-1]):
            rows = fit["rows"]
            X = np.stack([row["scores"] for row in rows])
            y = np.array([row["label"] for row in rows])
            groups = np.array([row["group"] for row in rows])
            real = np.array([row["real"] for row in rows])
            choose_on = real if real[y == 1].any() else None
            fusion = ScoreFusion("forward", "rank").fit(
                X, y, groups, choose_on, reference(rows, rule)
            )
            fused[fold_of == fold] = fusion.transform(scores[fold_of == fold])
        detectors[rule] = fused
    bootstrap = PairedBootstrap()
    for k, label in enumerate(labels):
        bootstrap.update(int(label), {name: values[k] for name, values in detectors.items()})
    for rule in rules:
        missed = miss_rates(detectors[rule], labels)
        line = f"{rule}: image AUROC {roc_auc_score(labels, detectors[rule]):.4f}, missed "
        line += " / ".join(f"{100 * v:.1f} %" for v in missed.values())
        if "supervised" in names:
            against = bootstrap.compute(rule)["differences"]["supervised"]["image_auroc"]
            low, high = against["interval"]
            line += f"; minus supervised [{low:+.4f}, {high:+.4f}] {against['verdict']}"
        print(line)


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"] and len(sys.argv) == 4:
        dump(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["replay"] and len(sys.argv) == 3:
        replay(sys.argv[2])
    else:
        sys.exit(__doc__)

"""PatchCore's HNSW search against exact search, paired on the same test images
(docs/benchmarks/2026-12-07-patchcore-search-paired.md).

    PYTHONPATH=. python docs/benchmarks/2026-12-07-patchcore-search-paired.py EXACT_RUN HNSW_RUN

Each run is a ``pipelines.benchmark --members patchcore`` run folder, one with
``members.patchcore.search=exact`` and one with ``hnsw``, otherwise alike. Both saved members
answer every image of the test split, as their benchmark jobs scored it (the job's own splits and
input size, maps brought to the mask's size). The project's paired bootstrap
(``metrics.bootstrap.PairedBootstrap``, 1000 resamples within each label) then scores both on
the same resamples. Prints each member's exact image AUROC and AUPRO, and HNSW minus exact with
its 95 % interval and verdict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from data.sources import make_loader
from experiments.job import job_data
from members import load_member
from metrics import get_metric
from metrics.bootstrap import PairedBootstrap

METRICS = ("image_auroc", "aupro")


def only_job(run: Path) -> Path:
    jobs = sorted(p for p in (run / "jobs").iterdir() if (p / "job.json").is_file())
    if len(jobs) != 1:
        raise SystemExit(f"{run}: expected one job (a --members patchcore run), found {len(jobs)}")
    return jobs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exact_run", type=Path)
    parser.add_argument("hnsw_run", type=Path)
    args = parser.parse_args()
    jobs = {"exact": only_job(args.exact_run), "hnsw": only_job(args.hnsw_run)}
    specs = {name: json.loads((job / "job.json").read_text()) for name, job in jobs.items()}
    searches = {name: spec["member_config"]["search"] for name, spec in specs.items()}
    if searches != {"exact": "exact", "hnsw": "hnsw"}:
        raise SystemExit(f"the runs' searches are {searches}")
    data = job_data(specs["exact"], jobs["exact"])
    members = {name: load_member(job / "weights").eval() for name, job in jobs.items()}
    metrics = {name: {m: get_metric(m) for m in METRICS} for name in members}
    bootstrap = PairedBootstrap()
    loader = make_loader(data.test, specs["exact"]["batch_size"], shuffle=False)
    with torch.no_grad():
        for batch in loader:
            labels = torch.as_tensor(batch["label"]).long()
            masks = batch["mask"].float()
            scores, maps = {}, {}
            for name, member in members.items():
                out = member.predict(batch["image"])
                scores[name] = out["pred_score"].float()
                maps[name] = out["anomaly_map"].float()
                if maps[name].shape[-2:] != masks.shape[-2:]:
                    maps[name] = F.interpolate(maps[name], size=masks.shape[-2:], mode="bilinear")
                metrics[name]["image_auroc"].update(scores[name], labels)
                metrics[name]["aupro"].update(maps[name], masks)
            for i in range(len(labels)):
                bootstrap.update(
                    int(labels[i]),
                    {name: float(scores[name][i]) for name in members},
                    {name: maps[name][i] for name in members},
                    masks[i],
                )
    exact = {
        name: {m: float(metric.compute()) for m, metric in own.items()}
        for name, own in metrics.items()
    }
    result = bootstrap.compute(reference="hnsw", exact=exact)
    print(f"{len(bootstrap.labels)} test images, {sum(bootstrap.labels)} defective")
    for name in members:
        figures = ", ".join(
            f"{m} {exact[name][m]:.4f} {result['intervals'][name][m]}" for m in METRICS
        )
        print(f"{name}: {figures}")
        recorded = json.loads((jobs[name] / "results.json").read_text())
        print(f"  its job recorded: { {m: recorded['metrics'].get(m) for m in METRICS} }")
    for m in METRICS:
        entry = result["differences"]["exact"][m]
        low, high = entry["interval"]
        print(
            f"hnsw minus exact, {m}: {entry['difference']:+.4f} [{low:+.4f}, {high:+.4f}] "
            f"{entry['verdict']}"
        )


if __name__ == "__main__":
    main()

"""The benchmark's ranking: each job's composite, the leaderboard and its CSV and printed table.

Ranking composite (``metrics.composite``, documented in the README): a weighted mean of the
detection metrics a job has, ``0.3 image AUROC + 0.2 image AP + 0.2 pixel AUROC + 0.2 AUPRO +
0.1 pixel F1-max``, renormalized over the metrics present (image-level-only datasets have no
pixel metrics). Cost figures are shown beside it but do not enter it: speed and memory are
constraints a plant sets, not trade-offs a score should make for it. A variant's dataset score
is the mean of its categories' composites; its overall score the mean over datasets. Failed jobs
rank last.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.io import atomic_write_csv
from metrics.composite import composite
from reporting.columns import (
    COST_COLUMNS,
    INTERVAL_COLUMNS,
    JOB_COLUMNS,
    METRIC_COLUMNS,
    RECONSTRUCTION_COLUMNS,
    VARIANT_COLUMNS,
    finite,
    variant_name,
)


def leaderboard(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-job rows with composites, plus rankings per dataset, overall and per category."""
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        row = {
            "variant": variant_name(r),
            "dataset": r["dataset"],
            "category": r["category"],
            "member": r["member"],
            "backbone": r.get("backbone"),
            "image_size": r.get("image_size"),
            "tiling": r.get("tiling"),
            "status": r.get("status", "missing"),
            "error": r.get("error", ""),
            # The ranking is on the test split; ensemble chooses members on the val composite.
            "composite": composite(r.get("metrics", {})) if ok else float("nan"),
            "val_composite": (composite(r.get("validation_metrics") or {}) if ok else float("nan")),
        }
        row.update({k: (r.get("metrics") or {}).get(k, float("nan")) for k in METRIC_COLUMNS})
        row.update({k: (r.get("cost") or {}).get(k, float("nan")) for k in COST_COLUMNS})
        intervals = (r.get("intervals") or {}).get("intervals", {})
        for column in INTERVAL_COLUMNS:
            bounds = intervals.get(column.removesuffix("_interval"))
            row[column] = f"{bounds[0]:.3f}-{bounds[1]:.3f}" if bounds else None
        quality = r.get("reconstruction_quality") or {}
        row.update({k: quality.get(k) for k in RECONSTRUCTION_COLUMNS})
        rows.append(row)

    def ranked(groups: dict[str, list[float]]) -> list[dict[str, Any]]:
        table = []
        for variant, values in groups.items():
            good = [v for v in values if finite(v)]
            table.append(
                {
                    "variant": variant,
                    "score": float(np.mean(good))
                    if good and len(good) == len(values)
                    else float("nan"),
                    "jobs": len(values),
                    "failed": len(values) - len(good),
                }
            )
        table.sort(key=lambda t: (not finite(t["score"]), -t["score"] if finite(t["score"]) else 0))
        for rank, t in enumerate(table, 1):
            t["rank"] = rank
        return table

    per_dataset: dict[str, list[dict[str, Any]]] = {}
    by_dataset: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_category: dict[str, list[dict[str, Any]]] = {}
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_dataset[row["dataset"]][row["variant"]].append(row["composite"])
        by_category[f"{row['dataset']}/{row['category']}"][row["variant"]].append(row["composite"])
    overall_groups: dict[str, list[float]] = defaultdict(list)
    for dataset, groups in by_dataset.items():
        per_dataset[dataset] = ranked(groups)
        for t in per_dataset[dataset]:
            overall_groups[t["variant"]].append(t["score"])
    for key, groups in by_category.items():
        per_category[key] = ranked(groups)
    overall = ranked(overall_groups)
    rank_of = {t["variant"]: t["rank"] for t in overall}
    rows.sort(key=lambda r: (rank_of.get(r["variant"], 10**6), r["dataset"], r["category"]))
    for row in rows:
        row["overall_rank"] = rank_of.get(row["variant"])
    return {
        "rows": rows,
        "overall": overall,
        "per_dataset": per_dataset,
        "per_category": per_category,
    }


def write_leaderboard_csv(board: dict[str, Any], path: Path) -> Path:
    """The leaderboard's job rows as CSV, best variant first (missing figures empty)."""
    columns = [*JOB_COLUMNS, *VARIANT_COLUMNS, "error"]
    rows = [{k: _csv_value(row.get(k)) for k in columns} for row in board["rows"]]
    return atomic_write_csv(path, rows, columns)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def format_table(board: dict[str, Any]) -> str:
    """The printed ranking: overall, then each dataset."""
    lines = []

    def block(title: str, table: Sequence[dict[str, Any]]) -> None:
        lines.append(title)
        width = max([len(t["variant"]) for t in table] + [7])
        lines.append(f"  {'rank':>4}  {'variant':<{width}}  {'score':>6}  jobs")
        for t in table:
            score = f"{t['score']:.4f}" if finite(t["score"]) else "failed"
            lines.append(f"  {t['rank']:>4}  {t['variant']:<{width}}  {score:>6}  {t['jobs']}")

    block("Overall ranking (test composite, higher is better)", board["overall"])
    if len(board["per_dataset"]) > 1:
        for dataset, table in board["per_dataset"].items():
            block(f"\n{dataset}", table)
    return "\n".join(lines)

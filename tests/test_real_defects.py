"""The default ensemble where labeled defects exist: the supervised member is trained inside
each fold, members enter the hybrid only where they raise the cross-validated figure, and the
report gives what a plant reads: misses at its false-alarm budget, what each member adds, the
supervised member against a logistic regression on the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion.hybrid import Hybrid
from metrics.detection import miss_rate_key
from pipelines import benchmark, ensemble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    common = [
        "--set", f"output_dir={root}",
        "--set", f"synthetic.cache_dir={root / 'cache'}",
        "--set", "synthetic.n_train=40",
        "--set", "synthetic.n_test=30",
        "--set", "synthetic.size=128",
        "--set", "data.image_size=128",
    ]  # fmt: skip
    assert benchmark.main([*common, "--members", "patchcore,padim", "--run-name", "bench"]) == 0
    run_dir = root / "bench"
    sets = ["--set", "ensemble.unseen_panels=0", "--set", "members.supervised.trainer.max_epochs=8"]
    assert ensemble.main(["--from", str(run_dir), "--name", "hybrid", *sets]) == 0
    out = run_dir / "hybrid"
    return {"out": out, "results": json.loads((out / "results.json").read_text())}


def test_members_enter_only_on_cross_validated_evidence(run):
    results = run["results"]
    # Candidates: the benchmark's members and the supervised member, trained in each fold.
    assert set(results["metrics"]) == {"hybrid", "patchcore", "padim", "supervised"}
    selection = results["member_selection"]
    assert selection["chosen_on"] == "normal and labeled-defect images"
    for level, chosen_by in (("image", "AUROC"), ("pixel", "mean of pixel AUROC and AUPRO")):
        entry = selection[level]
        assert entry["chosen_by"] == chosen_by
        figures = [step["figure"] for step in entry["steps"]]
        # The first to enter is the best alone; each later one raised the figure.
        alone = entry["steps"][0]["alone"]
        assert entry["steps"][0]["member"] == max(alone, key=alone.get)
        assert all(b >= a + 0.001 for a, b in zip(figures, figures[1:]))
        assert sum(entry["weights"].values()) == pytest.approx(1.0)
    kept = set(selection["image"]["weights"]) | set(selection["pixel"]["weights"])
    assert set(results["kept_members"]) == kept
    # The saved hybrid holds the kept members only.
    assert set(Hybrid.load(run["out"] / "hybrid").names) == kept
    assert len(results["cross_validation"]["fold_members"]) == results["cross_validation"]["folds"]
    # The run's wall time by phase, each phase once, within the whole.
    wall = dict(results["wall_seconds"])
    total = wall.pop("total")
    assert {
        "test images through the members",
        "supervised heads",
        "test images scored out of fold",
    } <= set(wall)
    assert all(seconds >= 0 for seconds in wall.values()) and sum(wall.values()) <= total


def test_the_hybrid_is_never_lower_than_a_member_by_its_own_intervals(run):
    differences = run["results"]["intervals"]["differences"]
    for member, figures in differences.items():
        for metric in ("image_auroc", "aupro"):
            assert figures[metric]["verdict"] != "lower", (member, metric, figures[metric])
    contributions = dict(run["results"]["contributions"])
    assert contributions.pop("split") == run["results"]["splits"]["metrics"]
    kept = run["results"]["kept_members"]
    # What each kept member adds (measured where the hybrid weighs more than one member).
    assert set(contributions) == (set(kept) if len(kept) > 1 else set())
    for entry in contributions.values():
        lead = entry["hybrid_minus_without"]["image_auroc"]
        assert lead["interval"][0] - 1e-9 <= lead["difference"] <= lead["interval"][1] + 0.01


def test_the_supervised_member_is_scored_against_a_logistic_regression(run):
    supervised = run["results"]["supervised"]
    assert supervised["split"].startswith("test, out of fold")
    figures = supervised["metrics"]
    assert set(figures) == {"supervised", "logistic_pooled"}
    # Both learn real defects from the other folds: far better than chance.
    assert (
        figures["supervised"]["image_auroc"] > 0.75
        and figures["logistic_pooled"]["image_auroc"] > 0.6
    )
    lead = supervised["intervals"]["differences"]["logistic_pooled"]["image_auroc"]
    assert lead["verdict"] in ("higher", "lower", "within noise")


def test_misses_at_the_false_alarm_budgets_are_reported_with_intervals(run):
    results = run["results"]
    hybrid = results["metrics"]["hybrid"]
    intervals = results["intervals"]["intervals"]["hybrid"]
    for budget in (0.01, 0.02, 0.05):
        key = miss_rate_key(budget)
        low, high = intervals[key]
        assert 0 <= hybrid[key] <= 1 and low <= hybrid[key] + 1e-9 and hybrid[key] <= high + 1e-9
    assert hybrid[miss_rate_key(0.01)] >= hybrid[miss_rate_key(0.05)]
    point = results["operating_point"]
    assert point["miss_rate_interval"][0] <= point["miss_rate"] <= point["miss_rate_interval"][1]
    grading = results["grading"]
    assert grading["regions_found_end_to_end"] == pytest.approx(
        grading["defects_detected"] / grading["defects"]
    )
    report = (run["out"] / "report.html").read_text()
    for text in (
        "Miss rate against false-alarm rate",
        "budget 1%",
        "Members: who is in, and what each adds",
        "The supervised member against a logistic regression",
    ):
        assert text in report

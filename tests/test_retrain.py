"""The scheduled retraining job: promotion, rejection, the lock, no new data, and SIGKILL at
several steps (the champion stays loadable and the next run completes the work)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.images import write_png
from data.synthetic import PanelGenerator
from fusion.hybrid import Hybrid
from pipelines import retrain
from retraining.workspace import current_champion, read_history

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def add_normals(folder: Path, start: int, count: int) -> None:
    generator = PanelGenerator(size=64, seed=7)
    for i in range(start, start + count):
        write_png(folder / f"panel{i:03d}.png", generator.generate_normal(i)["image"], 16)


def settings(tmp_path: Path, *extra: str) -> list[str]:
    sets = [
        f"retrain.workspace={tmp_path / 'ws'}",
        f"retrain.normal_dirs=[{tmp_path / 'normal'}]",
        "retrain.members=[padim]",
        "retrain.image_size=64",
        "retrain.holdout_injections=2",
        "retrain.injections_per_image=3",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def run_killed(tmp_path: Path, step: str, *extra: str) -> int:
    code = "import sys; from pipelines.retrain import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, *settings(tmp_path, *extra)],
        cwd=REPO,
        env={**os.environ, "OLED_AD_KILL_AT": step, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode


def test_promotion_rejection_and_no_new_data(tmp_path, capsys):
    add_normals(tmp_path / "normal", 0, 14)
    assert retrain.main(settings(tmp_path)) == 0
    workspace = tmp_path / "ws"
    first = current_champion(workspace)
    assert first is not None and "promoted" in capsys.readouterr().out
    hybrid = Hybrid.load(first)  # complete and verified
    saved_window = json.loads((workspace / "intensity.json").read_text())
    assert hybrid.intensity == saved_window  # predict applies the same scaling

    assert retrain.main(settings(tmp_path)) == 0
    assert "no new data" in capsys.readouterr().out
    assert current_champion(workspace) == first

    add_normals(tmp_path / "normal", 14, 4)
    # A margin no challenger can meet: rejected, the champion stays.
    assert retrain.main(settings(tmp_path, "retrain.margin=-1.0")) == 0
    assert "rejected" in capsys.readouterr().out
    assert current_champion(workspace) == first

    add_normals(tmp_path / "normal", 18, 2)
    assert retrain.main(settings(tmp_path, "retrain.margin=1.0", "retrain.warm_start=true")) == 0
    assert "promoted" in capsys.readouterr().out
    second = current_champion(workspace)
    assert second != first
    history = read_history(workspace)
    assert [h["action"] for h in history] == ["promoted", "none", "rejected", "promoted"]
    assert history[2]["champion"]["hybrid"] == first.name
    # The challenger's image AUROC lead over the champion on the same holdout images, with
    # its paired interval (the exact lead inside it) and verdict, also in the reason.
    figures = {who: history[2][who]["metrics"]["image_auroc"] for who in ("challenger", "champion")}
    lead = history[2]["comparison"]["image_auroc"]
    assert lead["difference"] == pytest.approx(figures["challenger"] - figures["champion"])
    low, high = lead["interval"]
    assert low <= high and (lead["verdict"] == "within noise") == (low <= 0 <= high)
    assert lead["verdict"] in history[2]["reason"]
    assert {"challenger", "train_images", "holdout_images"} <= set(history[3])
    holdout = json.loads((workspace / "holdout.json").read_text())
    # The holdout was fixed on the first run: later images never join it.
    names = {Path(p).name for p in holdout["normal"]}
    assert len(names) == 3 and not names & {f"panel{i:03d}.png" for i in range(14, 20)}


def test_the_lock_refuses_a_second_run_and_clears_a_stale_one(tmp_path, capsys):
    add_normals(tmp_path / "normal", 0, 10)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from artifacts.lock import RunLock; "
            f"RunLock({str(workspace / 'lock')!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert retrain.main(settings(tmp_path)) == 1
        assert f"held by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder died holding it: the kernel freed the lock, and the run says so and goes on.
    assert retrain.main(settings(tmp_path)) == 0
    assert current_champion(workspace) is not None
    assert not (workspace / "lock.holder.json").exists()


def test_sigkill_at_any_step_leaves_the_champion_intact(tmp_path):
    add_normals(tmp_path / "normal", 0, 12)
    workspace = tmp_path / "ws"
    for step in ("after_training", "after_save"):
        assert run_killed(tmp_path, step) == -signal.SIGKILL
        assert current_champion(workspace) is None  # nothing promoted, nothing half-written
    assert retrain.main(settings(tmp_path)) == 0
    champion = current_champion(workspace)
    Hybrid.load(champion)

    add_normals(tmp_path / "normal", 12, 3)
    assert run_killed(tmp_path, "after_training", "retrain.margin=1.0") == -signal.SIGKILL
    assert current_champion(workspace) == champion
    Hybrid.load(champion)
    assert run_killed(tmp_path, "after_promote", "retrain.margin=1.0") == -signal.SIGKILL
    promoted = current_champion(workspace)
    assert promoted != champion
    Hybrid.load(promoted)  # the switch is atomic: the new champion is complete
    # The killed run did not record its data as consumed: the next run does the work again.
    assert retrain.main(settings(tmp_path, "retrain.margin=1.0")) == 0
    assert read_history(workspace)[-1]["action"] == "promoted"
    Hybrid.load(current_champion(workspace))
    assert not list((workspace / "hybrids").glob(".*"))


def test_the_intensity_window_is_fitted_once_per_workspace(tmp_path):
    from PIL import Image

    from configs import load_config
    from retraining.workspace import workspace_intensity

    twelve_bit = []
    for i in range(3):  # a 12-bit camera writing 16-bit files
        counts = (PanelGenerator(size=64, seed=7).generate_normal(i)["image"] * 4095).round()
        path = tmp_path / f"panel{i}.png"
        Image.fromarray(counts.astype("uint16")).save(path)
        twelve_bit.append(str(path))
    data_cfg = load_config("retrain")["data"]
    window = workspace_intensity(tmp_path / "ws", twelve_bit, data_cfg)
    assert window.mode == "bitdepth" and window.bits == 12
    saved = json.loads((tmp_path / "ws" / "intensity.json").read_text())
    assert saved["bits"] == 12
    # Later runs keep it, whatever their training images.
    add_normals(tmp_path / "later", 0, 2)
    later = [str(p) for p in sorted((tmp_path / "later").glob("*.png"))]
    assert workspace_intensity(tmp_path / "ws", later, data_cfg) == window


def test_retrain_builds_its_hybrid_with_every_option_of_the_hybrid_section():
    """ensemble and retrain build the hybrid alike: every key of ``hybrid`` (here all set away
    from their defaults) and the operating point of ``grading`` reach the ``Hybrid``."""
    from configs import load_config
    from fusion.build import build_hybrid
    from members.build import build_member, member_options

    chosen = {
        "combiner": "max",
        "pixel_combiner": "auto",
        "normalizer": "zscore",
        "learner": "boosting",
        "pixel_threshold": "quantile",
        "grader": "rules",
        "type_confidence": 0.7,
        "describer_backbone": None,
    }
    defaults = load_config("retrain")["hybrid"]
    assert set(defaults) == set(chosen)
    assert all(defaults[k] != v for k, v in chosen.items())
    overrides = [f"hybrid.{k}={'null' if v is None else v}" for k, v in chosen.items()]
    overrides += ["grading.operating_point=f1", "grading.false_alarm_rate=0.05"]
    cfg = load_config("retrain", overrides=overrides)
    members = {"padim": build_member("padim", member_options(cfg["members"], "padim"))}
    hybrid = build_hybrid(
        members,
        cfg["retrain"]["image_size"],
        hybrid_cfg=cfg["hybrid"],
        grading_cfg=cfg["grading"],
        pixel_pitch_mm=0.05,
        intensity=None,
        seed=3,
    )
    assert {k: hybrid.get_params()[k] for k in chosen} == chosen
    assert (hybrid.operating_point, hybrid.false_alarm_rate) == ("f1", 0.05)
    assert (hybrid.pixel_pitch_mm, hybrid.seed) == (0.05, 3)


def add_labeled(folder: Path, count: int, with_masks: int) -> None:
    """``count`` defective panels in a labeled folder (``<type>/`` images, the first
    ``with_masks`` with a mask under ``ground_truth/``) and as many defect-free ones."""
    generator = PanelGenerator(size=64, seed=11)
    for i in range(count):
        panel = generator.generate_defective(i)
        kind = panel["defects"][0]["type"]
        write_png(folder / kind / f"part{i:02d}_d.png", panel["image"], 16)
        if i < with_masks:
            write_png(folder / "ground_truth" / kind / f"part{i:02d}_d_mask.png", panel["mask"])
        write_png(folder / "good" / f"part{i:02d}_g.png", generator.generate_normal(i)["image"], 16)


def test_labeled_defects_train_the_supervised_member_and_decide_the_members(tmp_path, capsys):
    add_normals(tmp_path / "normal", 0, 14)
    # Without labeled defects the supervised member is skipped, and the entry says why.
    assert retrain.main(settings(tmp_path)) == 0
    entry = read_history(tmp_path / "ws")[-1]
    assert "labeled_dirs is empty" in entry["supervised"]["skipped"]
    assert "supervised member skipped" in capsys.readouterr().out

    add_labeled(tmp_path / "labeled", 10, with_masks=6)
    extra = (
        f"retrain.labeled_dirs=[{tmp_path / 'labeled'}]",
        "retrain.folds=3",
        r"data.group_pattern=^(part\d+)_",
        "members.supervised.trainer.max_epochs=6",
        "retrain.margin=1.0",  # promoted whatever its score: its folder is kept
    )
    assert retrain.main(settings(tmp_path, *extra)) == 0
    entry = read_history(tmp_path / "ws")[-1]
    supervised = entry["supervised"]
    # Mixed supervision: ten labeled defects, six with masks, cross-fitted in three folds.
    assert supervised["labeled_defects"] == 10 and supervised["with_masks"] == 6
    assert supervised["folds"] == 3 and set(supervised["kept_members"]) <= {"padim", "supervised"}
    assert "supervised member trained on 10 labeled defects" in capsys.readouterr().out
    # The labeled images are trained on: never in the fixed holdout.
    holdout = json.loads((tmp_path / "ws" / "holdout.json").read_text())
    labeled_root = str((tmp_path / "labeled").resolve())
    assert not any(labeled_root in path for path in holdout["defects"] + holdout["normal"])
    assert entry["action"] == "promoted"
    assert Hybrid.load(current_champion(tmp_path / "ws")).names == supervised["kept_members"]

    # A labeled folder that overlaps the normal images is refused, naming it.
    overlap = (f"retrain.labeled_dirs=[{tmp_path / 'normal'}]",)
    assert retrain.main(settings(tmp_path, *overlap)) == 1
    assert "overlaps retrain.labeled_dirs" in capsys.readouterr().err


def _holdout_records(scores: np.ndarray, labels: np.ndarray) -> list[dict]:
    return [
        {"path": f"holdout/{i:03d}.png", "label": int(y), "score": float(s)}
        for i, (s, y) in enumerate(zip(scores, labels))
    ]


@pytest.mark.parametrize(
    ("challenger", "by_margin", "by_verdict"),
    [("really better", True, True), ("seems better", True, False), ("worse", False, False)],
)
def test_promotion_by_verdict_needs_a_lead_beyond_the_holdouts_noise(
    challenger, by_margin, by_verdict
):
    """On one holdout of 200 images, against one champion: a challenger that is really better
    is promoted either way; one whose small lead the holdout's noise could give is promoted by
    ``margin`` 0 and not by ``verdict``; a worse one by neither."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from retraining.holdout import compare_on_holdout, promotion

    rng = np.random.default_rng(3)  # a draw where added noise happens to lead a little
    labels = np.repeat([0, 1], 100)
    champion = labels * 1.0 + rng.normal(size=200)
    challengers = {
        "really better": labels * 3.0 + rng.normal(size=200),
        "seems better": champion + 0.3 * rng.normal(size=200),
        "worse": labels * 0.3 + rng.normal(size=200),
    }
    scores = {"challenger": challengers[challenger], "champion": champion}
    exact = {
        who: {
            "image_auroc": roc_auc_score(labels, values),
            "image_ap": average_precision_score(labels, values),
        }
        for who, values in scores.items()
    }
    lead = exact["challenger"]["image_auroc"] - exact["champion"]["image_auroc"]
    assert {"really better": lead > 0.1, "seems better": 0 < lead < 0.03, "worse": lead < 0}[
        challenger
    ], lead
    comparison = compare_on_holdout(
        _holdout_records(scores["challenger"], labels),
        _holdout_records(scores["champion"], labels),
        exact,
    )
    verdict = {"really better": "higher", "seems better": "within noise", "worse": "lower"}
    assert comparison["image_auroc"]["verdict"] == verdict[challenger]
    figures = (exact["challenger"]["image_auroc"], exact["champion"]["image_auroc"], comparison)
    promoted, reason = promotion(*figures, promote_on="margin", margin=0.0)
    assert promoted == by_margin and "margin 0.0" in reason
    promoted, reason = promotion(*figures, promote_on="verdict")
    assert promoted == by_verdict and verdict[challenger] in reason
    # Without a paired comparison (a holdout of one class) the verdict cannot promote.
    assert promotion(*figures[:2], None, promote_on="verdict")[0] is False
    with pytest.raises(ValueError, match="retrain.promote_on"):
        promotion(*figures, promote_on="always")

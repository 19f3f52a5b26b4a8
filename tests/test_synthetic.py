"""Synthetic OLED panels: SEMU, contrast truth, reproducibility, rendering, writer, levels."""

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from configs import load_config
from data.datasets import get_dataset
from data.synthetic import (
    SHARP_TYPES,
    PanelGenerator,
    PanelSet,
    ensure_synthetic_dataset,
    generator_of_dataset,
    inject_defects,
    write_dataset,
)
from metrics.severity import (
    DEFAULT_LEVEL_RULES,
    DEFECT_TYPES,
    MURA_TYPES,
    SEMU_LEVEL_EDGES,
    jnd_contrast,
    level_from_semu,
    semu,
)

# The synthetic section's keys that are the generator's (the rest say how many panels, where).
LINE_KEYS = (
    "level_weights",
    "gain_pct",
    "panel_variation",
    "background_mura",
    "background_mura_semu",
)


def default_panels(size: int = 256, seed: int = 0, **overrides) -> PanelGenerator:
    """The embedded default's generator: ``configs/defaults.yaml``'s synthetic section."""
    synthetic = load_config("benchmark")["synthetic"]
    return PanelGenerator(size=size, seed=seed, **{k: synthetic[k] for k in LINE_KEYS} | overrides)


def test_semu_just_noticeable_contrast_matches_hand_values():
    assert jnd_contrast(1.0) == pytest.approx(2.69, abs=0.005)
    assert jnd_contrast(10.0) == pytest.approx(1.64, abs=0.005)
    assert jnd_contrast(100.0) == pytest.approx(1.15, abs=0.005)
    assert semu(2.69, 1.0) == pytest.approx(1.0, abs=0.002)
    assert semu(-3.28, 10.0) == pytest.approx(2.0, abs=0.01)
    assert [level_from_semu(v) for v in (0.5, 1.0, 2.5, 4.0, 5.0, 9.0)] == [1, 2, 3, 4, 5, 5]


def measured_contrast(sample, defect):
    region = sample["instances"] == defect["id"]
    image, background = sample["image"], sample["background"]
    return float(((image[region] - background[region]) / background[region]).mean() * 100)


def test_measured_contrast_is_within_ten_percent_of_the_truth():
    generator = PanelGenerator(size=192, seed=3)
    checked = 0
    for i in range(40):
        sample = generator.generate_defective(i)
        for defect in sample["defects"]:
            measured = measured_contrast(sample, defect)
            assert measured == pytest.approx(defect["contrast_pct"], rel=0.10), defect
            checked += 1
    assert checked >= 40


def test_injected_contrast_is_within_ten_percent_of_the_truth(kolektorsdd_dir):
    from data.images import read_image

    image = read_image(sorted((kolektorsdd_dir / "train" / "good").iterdir())[0])
    sample = inject_defects(
        image, seed=5, n_defects=4, defect_types=("spot_mura", "particle", "scratch")
    )
    assert sample["defects"] and sample["label"] == 1
    for defect in sample["defects"]:
        assert measured_contrast(sample, defect) == pytest.approx(defect["contrast_pct"], rel=0.10)
    # Outside the masks only soft tails (profile < 1/2) remain: at most the contrast itself.
    outside = sample["mask"] == 0
    relative = np.abs(sample["image"][outside] - image[outside]) / np.maximum(image[outside], 1e-6)
    assert relative.max() <= max(abs(d["contrast_pct"]) for d in sample["defects"]) / 100 + 1e-5


def test_same_seed_same_images_in_any_order():
    a, b = PanelGenerator(size=96, seed=7), PanelGenerator(size=96, seed=7)
    first = [a.generate_defective(i) for i in range(3)]
    second = [b.generate_defective(i) for i in reversed(range(3))][::-1]
    for x, y in zip(first, second):
        assert np.array_equal(x["image"], y["image"]) and x["defects"] == y["defects"]
    other = PanelGenerator(size=96, seed=8).generate_defective(0)
    assert not np.array_equal(other["image"], first[0]["image"])


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_every_type_renders_with_its_sign_inside_its_mask(defect_type):
    generator = PanelGenerator(size=192, seed=1, defect_types=(defect_type,), max_defects=1)
    sample = generator.generate_defective(0)
    (defect,) = sample["defects"]
    assert defect["type"] == defect_type
    region = sample["instances"] == defect["id"]
    change = (sample["image"][region] - sample["background"][region]).mean()
    assert np.sign(change) == np.sign(defect["contrast_pct"]) != 0
    if defect_type in ("dark_pixel", "particle"):
        assert defect["contrast_pct"] < 0
    if defect_type == "bright_pixel":
        assert defect["contrast_pct"] > 0
    if defect_type in ("dark_pixel", "bright_pixel"):
        assert 1 <= defect["area_px"] <= 30
    x0, y0, x1, y1 = defect["bbox"]
    assert region[y0:y1, x0:x1].sum() == region.sum() == defect["area_px"]


def test_normal_panels_have_no_defects_but_realistic_nonuniformity():
    sample = PanelGenerator(size=256, seed=0).generate_normal(0)
    assert sample["label"] == 0 and sample["level"] == 0 and not sample["mask"].any()
    background = sample["background"]
    spread = (background.max() - background.min()) / background.mean()
    assert 0.01 < spread < 0.15  # a few percent of non-uniformity and vignetting


def test_writer_layout_truth_and_level_coverage(tmp_path):
    root = write_dataset(tmp_path, n_train=3, n_test=120, size=128, seed=0, defect_fraction=1.0)
    assert len(list((root / "train" / "good").glob("*.png"))) == 3
    with Image.open(next((root / "train" / "good").glob("*.png"))) as image:
        assert image.mode.startswith("I;16") or image.mode == "I"
    lines = [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]
    assert len(lines) == 120
    levels = defaultdict(set)
    for line in lines:
        folder = line["path"].split("/")[1]
        assert line["level"] == max(d["level"] for d in line["defects"])
        assert folder == max(line["defects"], key=lambda d: (d["level"], d["area_px"]))["type"]
        stem = line["path"].split("/")[-1][:-4]
        mask = np.asarray(Image.open(root / "ground_truth" / folder / f"{stem}_mask.png"))
        instances = np.asarray(Image.open(root / "ground_truth" / folder / f"{stem}_instances.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert set(np.unique(instances)) == {0, *(d["id"] for d in line["defects"])}
        for d in line["defects"]:
            levels[d["type"]].add(d["level"])
    for mura in MURA_TYPES:
        assert levels[mura] == {1, 2, 3, 4, 5}, (mura, levels[mura])
    test = get_dataset("mvtec", data_dir=tmp_path, categories=["panel"], split="test")
    sample = test[0]
    assert sample["defects"] and sample["level"] >= 1 and sample["instances"].max() >= 1


def test_level_weights_set_the_mix_of_levels():
    faint = PanelGenerator(size=96, seed=3, level_weights=[0.43, 0.26, 0.16, 0.09, 0.06])
    uniform = PanelGenerator(size=96, seed=3)
    counts = {}
    for name, generator in (("faint", faint), ("uniform", uniform)):
        rng = np.random.default_rng(0)
        defects = [
            generator.make_defect("spot_mura", rng, np.zeros((96, 96), bool)) for _ in range(300)
        ]
        levels = [d.truth["target_level"] for d in defects if d is not None]
        counts[name] = np.bincount(levels, minlength=6)[1:] / len(levels)
    assert counts["faint"][0] > 0.35 and counts["faint"][4] < 0.1, counts
    assert np.all(np.abs(counts["uniform"] - 0.2) < 0.07), counts
    with pytest.raises(ValueError, match="level_weights"):
        PanelGenerator(level_weights=[1, 0, 0])


def test_each_drawn_level_is_the_defects_level_so_faint_sharp_defects_exist():
    # Size and contrast are both chosen for the target level: a level-1 line is short and
    # faint, a level-1 dark pixel a single pixel at low contrast (before, a line's length alone
    # put it at level 2 or 3 whatever its contrast, and the faint mix was not the mix drawn).
    generator = PanelGenerator(size=256, seed=0)
    for defect_type in DEFECT_TYPES:
        rng = np.random.default_rng(0)
        for level in range(1, 6):
            drawn = [
                generator.make_defect(defect_type, rng, np.zeros((256, 256), bool), level)
                for _ in range(40)
            ]
            truth = [generator.apply(np.full((256, 256), 0.4), [d])[3][0] for d in drawn]
            hits = np.mean([t["level"] == level for t in truth])
            assert hits >= 0.85, (defect_type, level, hits)
            if level == 1 and defect_type in SHARP_TYPES:
                rule = DEFAULT_LEVEL_RULES[defect_type]
                ones = [t for t in truth if t["level"] == 1]
                assert all(t["area_px"] < rule["area_px"][0] for t in ones), defect_type
                assert all(abs(t["contrast_pct"]) < rule["contrast_pct"][0] for t in ones)


def test_the_default_mix_holds_mostly_panels_whose_only_defects_are_faint():
    generator = default_panels()
    worst = [generator.generate_defective(i)["level"] for i in range(150)]
    share = {level: np.mean([w == level for w in worst]) for level in range(6)}
    # One or two defects per panel, levels 1-5 drawn 0.43, 0.26, 0.16, 0.09, 0.06: a panel's
    # worst defect is level 1 with probability about 0.31 and level 1 or 2 about 0.58.
    assert 0.22 <= share[1] <= 0.40, share
    assert 0.50 <= share[1] + share[2] <= 0.67, share
    assert share[0] == 0 and share[5] > 0, share


def test_measured_contrast_of_drawn_defects_spans_each_level_band():
    # Uniform levels, so that every band has as many defects; the default's look around them.
    generator = default_panels(level_weights=None)
    measured = defaultdict(list)
    for i in range(200):
        sample = generator.generate_defective(i)
        for defect in sample["defects"]:
            contrast = measured_contrast(sample, defect)
            if defect["type"] in MURA_TYPES:
                measured["mura", defect["level"]].append(semu(contrast, defect["area_mm2"]))
            elif defect["level"] == 1 and defect["type"] in ("dark_pixel", "line_defect"):
                measured[defect["type"], 1].append(abs(contrast))
    bands = {("mura", 1): (0.35, SEMU_LEVEL_EDGES[0]), ("mura", 5): (5.0, 8.0)}
    bands |= {("mura", k + 2): SEMU_LEVEL_EDGES[k : k + 2] for k in range(3)}
    bands |= {("dark_pixel", 1): (10.0, 20.0), ("line_defect", 1): (2.5, 5.0)}
    for key, values in measured.items():
        low, high = bands[key]
        width = high - low
        assert len(values) >= 6, (key, values)
        # Within the band (sensor noise: 10 % of its width), and across it: the lowest within
        # its bottom quarter, the highest within its top quarter.
        assert low - 0.1 * width <= min(values) <= low + 0.25 * width, (key, sorted(values))
        assert high - 0.25 * width <= max(values) <= high + 0.1 * width, (key, sorted(values))
    assert {("mura", level) for level in range(1, 6)} <= set(measured)


def test_defect_free_panels_vary_within_the_stated_bounds():
    line = default_panels(size=128)
    alike = default_panels(size=128, gain_pct=0.0, background_mura=0)  # the same draws otherwise
    gains, noise, semus = [], [], []
    for i in range(40):
        sample, twin = line.generate_normal(i), alike.generate_normal(i)
        assert sample["label"] == 0 and not sample["mask"].any() and not sample["defects"]
        # The panel's own luminance, measured against its twin without gain or background mura
        # (their ratio is the gain times the mura, which cover a small part of the panel).
        ratio = sample["background"] / twin["background"]
        gains.append(float(np.median(ratio)))
        # Its noise, measured against the nominal sensor model.
        nominal = np.sqrt(line.shot_noise**2 * sample["background"] + line.read_noise**2)
        noise.append(float(np.std((sample["image"] - sample["background"]) / nominal)))
        # Each background mura, measured: its region within its box is where the change is at
        # least half its peak; its SEMU from the change's mean there and the region's area.
        change = ratio / gains[-1] - 1
        assert len(sample["background_mura"]) <= line.background_mura
        for blemish in sample["background_mura"]:
            x0, y0, x1, y1 = blemish["bbox"]
            box = change[y0:y1, x0:x1]
            region = np.abs(box) >= 0.5 * np.abs(box).max()
            area_mm2 = region.sum() * line.pixel_pitch_mm**2
            semus.append(semu(100 * box[region].mean(), area_mm2))
    gains, noise = np.array(gains), np.array(noise)
    assert np.all(np.abs(gains - 1) <= line.gain_pct / 100) and np.ptp(gains) > 0.06, gains
    spread = line.panel_variation
    assert np.all((noise > 1 - spread - 0.05) & (noise < 1 + spread + 0.05)), noise
    assert noise.max() / noise.min() > 1.3, noise
    # Background mura are there (about two a panel) and within spec: each below its bound
    # (5 % for the measurement), not all negligible.
    assert len(semus) >= 40 and max(semus) <= 1.05 * line.background_mura_semu, semus
    assert np.percentile(semus, 75) > 0.4 * line.background_mura_semu, semus


def test_a_panels_look_does_not_change_its_defects():
    still = PanelGenerator(size=128, seed=4)
    varied = PanelGenerator(size=128, seed=4, gain_pct=5, panel_variation=0.3, background_mura=4)
    for i in range(10):
        a, b = still.generate_defective(i), varied.generate_defective(i)
        key = [[(d["type"], d["bbox"], d["level"]) for d in s["defects"]] for s in (a, b)]
        assert key[0] == key[1] and np.array_equal(a["mask"], b["mask"])
        assert not np.allclose(a["background"], b["background"])


@pytest.mark.parametrize("defect_type", MURA_TYPES)
def test_soft_defects_fade_out_before_their_window_ends(defect_type):
    # A cloud with a cut edge would be found by its edge, not its luminance.
    generator, rng = PanelGenerator(size=256, seed=0), np.random.default_rng(0)
    for _ in range(10):
        profile = generator.make_defect(defect_type, rng, np.zeros((256, 256), bool)).profile
        border = np.concatenate([profile[0], profile[-1], profile[:, 0], profile[:, -1]])
        assert border.max() < 0.02 * profile.max(), (defect_type, border.max())


def test_unseen_panels_come_from_the_dataset_generator_with_another_seed(tmp_path):
    root = write_dataset(
        tmp_path, n_train=2, n_test=2, size=64, seed=0, level_weights=[1, 1, 1, 0, 0]
    )
    generator = generator_of_dataset(root, seed=5)
    assert generator.seed == 5 and generator.size == (64, 64)
    assert generator.level_weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0, 0])
    panels = PanelSet(generator, 6, defect_fraction=0.5, channels=3)
    assert [panels[i]["label"] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    sample = panels[0]
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (1, 64, 64)
    assert all(d["level"] <= 3 for d in sample["defects"])
    written = PanelGenerator(size=64, seed=0).generate(0, True, "test")["image"]
    assert not np.allclose(sample["image"][0].numpy(), written)  # not the dataset's own panels
    assert generator_of_dataset(tmp_path, seed=5) is None  # not a generated folder


def test_cache_returns_the_same_folder_and_does_not_rewrite(tmp_path):
    first = ensure_synthetic_dataset(tmp_path, n_train=2, n_test=2, size=64, seed=1)
    stamp = (first / "panel" / "truth.jsonl").stat().st_mtime_ns
    again = ensure_synthetic_dataset(tmp_path, n_train=2, n_test=2, size=64, seed=1)
    assert again == first and (again / "panel" / "truth.jsonl").stat().st_mtime_ns == stamp
    assert ensure_synthetic_dataset(tmp_path, n_train=2, n_test=2, size=64, seed=2) != first


def test_the_command_writes_the_embedded_default_panels_unless_told_otherwise(tmp_path, capsys):
    """``python -m pipelines.synthetic`` writes the panels a benchmark generates from the same
    configuration and seed (same pixels), and ``--set`` changes them like any pipeline's."""
    from data.sources import resolve_source
    from pipelines.synthetic import main as synthetic_main

    small = ["synthetic.n_train=2", "synthetic.n_test=2", "synthetic.size=64", "seed=3"]
    cfg = load_config("benchmark", overrides=[*small, f"synthetic.cache_dir={tmp_path}/cache"])
    source = resolve_source(cfg["data"], cfg["synthetic"], seed=cfg["seed"])
    sets = [arg for key in small for arg in ("--set", key)]
    assert synthetic_main(["--out", str(tmp_path / "cli"), *sets]) == 0
    written = sorted((tmp_path / "cli" / "panel").rglob("*.png"))
    cached = sorted((source.data_dir / "panel").rglob("*.png"))
    assert len(written) == 2 + 2 + sum("ground_truth" in str(p) for p in written)
    assert [p.relative_to(tmp_path / "cli") for p in written] == [
        p.relative_to(source.data_dir) for p in cached
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(written, cached))
    meta = json.loads((tmp_path / "cli" / "panel" / "meta.json").read_text())["generator"]
    assert meta["gain_pct"] == cfg["synthetic"]["gain_pct"] > 0
    assert meta["background_mura"] == cfg["synthetic"]["background_mura"] > 0

    out = tmp_path / "flat"
    flat = ["synthetic.gain_pct=0", "synthetic.panel_variation=0", "synthetic.background_mura=0"]
    flat += ["synthetic.level_weights=null"]
    args = ["--out", str(out), *sets, *(arg for key in flat for arg in ("--set", key))]
    assert synthetic_main([*args, "--seed", "4"]) == 0
    meta = json.loads((out / "panel" / "meta.json").read_text())["generator"]
    assert (meta["gain_pct"], meta["panel_variation"], meta["background_mura"]) == (0, 0, 0)
    assert meta["level_weights"] is None and meta["seed"] == 4
    bad = ["--out", str(tmp_path / "bad"), *sets, "--set", "synthetic.gain_pct=-1"]
    assert synthetic_main(bad) == 2  # bad configuration
    assert "gain_pct" in capsys.readouterr().err


def test_bad_parameters_are_errors():
    with pytest.raises(ValueError, match="unknown defect type"):
        PanelGenerator(defect_types=("crack",))
    with pytest.raises(ValueError, match="at least 32"):
        PanelGenerator(size=8)
    with pytest.raises(ValueError, match="pixel_pitch_mm"):
        PanelGenerator(pixel_pitch_mm=0)
    with pytest.raises(ValueError, match="gain_pct"):
        PanelGenerator(gain_pct=-1)
    with pytest.raises(ValueError, match="panel_variation"):
        PanelGenerator(panel_variation=1.5)
    with pytest.raises(ValueError, match="background_mura must"):
        PanelGenerator(background_mura=-1)
    with pytest.raises(ValueError, match="background_mura_semu .*within spec"):
        PanelGenerator(background_mura_semu=1.0)


@pytest.mark.slow
def test_full_size_panel():
    generator = PanelGenerator(size=(7000, 9344), seed=0, max_defects=3)
    sample = generator.generate_defective(0)
    assert sample["image"].shape == (7000, 9344) and sample["image"].dtype == np.float32
    assert sample["defects"]


def test_a_cap_on_injected_copies_spreads_them_evenly_and_keeps_the_uncapped_draws():
    from data.validation import injected_validation_samples

    panels = default_panels(size=64, seed=3)
    normals = [panels.generate_normal(i, split="val")["image"] for i in range(3)]

    def copies_per_image(samples):
        counts = []
        for sample in samples:
            if sample["label"]:
                counts[-1] += 1
            else:
                counts.append(0)
        return counts

    uncapped = injected_validation_samples(normals, 4, seed=1)
    assert copies_per_image(uncapped) == [4, 4, 4]
    # A cap the set stays under changes nothing, draw for draw.
    same = injected_validation_samples(normals, 4, seed=1, max_injected=12)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(uncapped, same))
    assert [a["defects"] for a in uncapped] == [b["defects"] for b in same]

    capped = injected_validation_samples(normals, 4, seed=1, max_injected=5)
    assert copies_per_image(capped) == [2, 2, 1]
    levels = sorted({d["level"] for s in capped for d in s["defects"]})
    assert levels[0] == 1 and len(levels) >= 4  # the levels still cycle through the bands

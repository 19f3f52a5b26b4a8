"""The configuration loader: defaults, files, overrides, and errors that name the key."""

import re

import pytest
import yaml

import configs.loader
import configs.schema
from configs import (
    CONFIG_DIR,
    PIPELINES,
    ConfigError,
    Flag,
    default_tree,
    key_table,
    load_config,
    parse_override,
    write_config,
)
from members.base import available_members, member_parameters


def test_defaults_load_for_every_pipeline():
    for pipeline in ("benchmark", "ensemble", "predict", "retrain"):
        cfg = load_config(pipeline)
        assert cfg["data"]["image_size"] == 256
        assert pipeline in cfg
        assert set(cfg["members"]) == set(available_members())


def test_files_and_overrides_apply_in_order(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("data:\n  image_size: 128\n  categories: [a, b]\n")
    second = tmp_path / "b.yaml"
    second.write_text("data:\n  image_size: 64\n")
    cfg = load_config("benchmark", [first, second], ["data.batch_size=3", "trainer.max_steps=7"])
    assert cfg["data"]["image_size"] == 64
    assert cfg["data"]["categories"] == ["a", "b"]
    assert cfg["data"]["batch_size"] == 3
    assert cfg["trainer"]["max_steps"] == 7


def test_image_size_is_a_side_or_height_and_width():
    cfg = load_config("benchmark", overrides=["data.image_size=[512,208]"])
    assert cfg["data"]["image_size"] == [512, 208]
    cfg = load_config("retrain", overrides=["retrain.image_size=[96,64]"])
    assert cfg["retrain"]["image_size"] == [96, 64]
    assert load_config("predict", overrides=["data.image_size=null"])["data"]["image_size"] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.imag_size=3", "did you mean 'data.image_size'"),
        ("tilng.stride=3", "did you mean 'tiling'"),
        ("stride=5", "did you mean 'tiling.stride'"),
        ("data.image_size=abc", "data.image_size must be int"),
        ("data.image_size=[0,64]", "data.image_size must be a positive int (square side) or ["),
        ("data.image_size=[64,64,3]", "data.image_size must be a positive int (square side) or"),
        ("benchmark.image_sizes=[128,[64,x]]", "benchmark.image_sizes[1] must be a positive int"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs must be int"),
        ("tiling.stride=999", "larger than tiling.tile_size"),
        ("data.batch_size=-1", "data.batch_size must be a positive number"),
        ("tiling.tile_size=0", "tiling.tile_size must be a positive number"),
        ("data.val_fraction=1", "data.val_fraction must be in [0, 1)"),
        ("grading.operating_point=youden", "grading.operating_point must be false_alarm or f1"),
        ("grading.false_alarm_rate=1.5", "grading.false_alarm_rate must be in [0, 1)"),
        ("data=3", "data must be a mapping"),
        ("data.image_size", "expects key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("benchmark", overrides=[override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tiling:\n  reductoin: max\n")
    with pytest.raises(ConfigError) as info:
        load_config("predict", [path])
    assert str(path) in str(info.value)
    assert "tiling.reduction" in str(info.value)


def test_member_options_are_validated_against_the_constructor():
    name = available_members()[0]
    option = next(k for k, v in member_parameters(name).items() if isinstance(v, bool))
    cfg = load_config("benchmark", overrides=[f"members.{name}.{option}=false"])
    assert cfg["members"][name][option] is False
    with pytest.raises(ConfigError, match=f"members.{name}.no_such_option"):
        load_config("benchmark", overrides=[f"members.{name}.no_such_option=1"])
    cfg = load_config("benchmark", overrides=[f"members.{name}.trainer.max_epochs=3"])
    assert cfg["members"][name]["trainer"]["max_epochs"] == 3
    with pytest.raises(ConfigError, match="max_epoch"):
        load_config("benchmark", overrides=[f"members.{name}.trainer.max_epoch=3"])


def test_every_member_file_names_only_constructor_options():
    for path in sorted((CONFIG_DIR / "members").glob("*.yaml")):
        assert path.stem in available_members(), f"{path} belongs to no registered member"
        options = set(member_parameters(path.stem)) | {"trainer"}
        unknown = set(yaml.safe_load(path.read_text()) or {}) - options
        assert not unknown, f"{path}: {sorted(unknown)} are not options of {path.stem}"


def test_every_dataset_file_is_a_valid_overlay():
    for path in sorted((CONFIG_DIR / "datasets").glob("*.yaml")):
        load_config("benchmark", [path])


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=true") == {"a": True}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_resolved_config_round_trips_through_yaml(tmp_path, pipeline):
    # Loading the written defaults checks every default against key_table's types and choices.
    cfg = load_config(pipeline, overrides=["data.image_size=96"])
    path = write_config(cfg, tmp_path / "config.yaml")
    assert load_config(pipeline, [path]) == cfg


# --- typed configuration: names stay text, choices and numbers are checked -------------------


def test_flag_names_stay_text(tmp_path):
    from pipelines import benchmark, ensemble, predict

    args = benchmark.parse_args(
        ["--run-name", "2024-06-01", "--categories", "01, 02", "--members", "patchcore,padim"]
    )
    cfg = load_config("benchmark", overrides=benchmark.overrides_from_flags(args))
    assert cfg["benchmark"]["run_name"] == "2024-06-01"
    assert (tmp_path / cfg["benchmark"]["run_name"]).name == "2024-06-01"  # was a TypeError
    assert cfg["data"]["categories"] == ["01", "02"]
    assert cfg["benchmark"]["members"] == ["patchcore", "padim"]

    args = benchmark.parse_args(["--data-dir", "2024", "--dataset", "btad", "--init-from", "007"])
    cfg = load_config("benchmark", overrides=benchmark.overrides_from_flags(args))
    assert (cfg["data"]["data_dir"], cfg["data"]["dataset"]) == ("2024", "btad")
    assert cfg["data"]["categories"] == []  # --data-dir alone: every category found
    assert cfg["benchmark"]["init_from"] == "007"

    args = ensemble.parse_args(
        ["--from", "2024-06-01", "--members", "padim", "--name", "1e3", "--top-k", "2"]
    )
    opts = load_config("ensemble", overrides=ensemble.overrides_from_flags(args))["ensemble"]
    assert (opts["from_run"], opts["members"], opts["name"]) == ("2024-06-01", ["padim"], "1e3")
    assert opts["top_k"] == 2

    args = predict.parse_args(["--hybrid", "2024-06-01", "--out", "yes", "panel.png"])
    opts = load_config("predict", overrides=predict.overrides_from_flags(args))["predict"]
    assert (opts["hybrid"], opts["out"]) == ("2024-06-01", "yes")


def test_flags_win_over_set_and_are_checked():
    cfg = load_config(
        "benchmark",
        overrides=["benchmark.run_name=a", Flag("benchmark.run_name", "b", "--run-name")],
    )
    assert cfg["benchmark"]["run_name"] == "b"
    with pytest.raises(ConfigError, match=re.escape("--dataset foo: data.dataset must be")):
        load_config("benchmark", overrides=[Flag("data.dataset", "foo", "--dataset")])


@pytest.mark.parametrize(
    ("pipeline", "override", "key", "expected"),
    [
        ("benchmark", "benchmark.run_name=2024-06-01", "benchmark.run_name", "2024-06-01"),
        ("benchmark", "data.categories=[01, 02]", "data.categories", ["01", "02"]),
        ("benchmark", "benchmark.backbones=[007]", "benchmark.backbones", ["007"]),
        ("benchmark", "output_dir=2024", "output_dir", "2024"),
        ("benchmark", "data.data_dir=1e3", "data.data_dir", "1e3"),
        ("benchmark", "device.precision=32", "device.precision", "32"),
        ("ensemble", "ensemble.category=01", "ensemble.category", "01"),
        ("ensemble", "ensemble.name=yes", "ensemble.name", "yes"),
        ("retrain", "retrain.normal_dirs=[2024-06-01]", "retrain.normal_dirs", ["2024-06-01"]),
        ("benchmark", "benchmark.run_name=null", "benchmark.run_name", None),
    ],
)
def test_set_keeps_the_text_typed_where_a_key_takes_text(pipeline, override, key, expected):
    section, name = key.split(".") if "." in key else (None, key)
    cfg = load_config(pipeline, overrides=[override])
    assert (cfg[section] if section else cfg)[name] == expected


def test_set_values_stay_yaml_where_a_key_takes_numbers():
    cfg = load_config("benchmark", overrides=["trainer.gradient_clip_val=1", "data.batch_size=4"])
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["data"]["batch_size"] == 4


def test_names_in_a_file_must_be_quoted(tmp_path):
    path = tmp_path / "names.yaml"
    path.write_text("data:\n  categories: [01, 02]\n")
    with pytest.raises(ConfigError) as info:
        load_config("benchmark", [path])
    message = str(info.value)
    assert str(path) in message
    assert "data.categories[0] must be str, got int 1" in message
    assert "quote it" in message
    path.write_text("benchmark:\n  run_name: 2024-06-01\n")
    with pytest.raises(ConfigError, match="benchmark.run_name must be str or null, got date"):
        load_config("benchmark", [path])
    path.write_text("data:\n  categories: ['01', '02']\nbenchmark:\n  run_name: '2024-06-01'\n")
    cfg = load_config("benchmark", [path])
    assert (cfg["data"]["categories"], cfg["benchmark"]["run_name"]) == (["01", "02"], "2024-06-01")


def _choice_cases() -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(pipeline, key, bad value, choices) from the libraries' own lists where they have one."""
    from data.datasets import available_datasets
    from experiments.selection import CRITERIA
    from fusion.combiners import COMBINERS, LEARNERS
    from fusion.normalizers import NORMALIZERS
    from grading.graders import GRADERS, OPERATING_POINTS, THRESHOLD_METHODS
    from members.autoencoder import AUTOENCODER_VARIANTS
    from members.base import SCORE_AGGREGATIONS
    from members.nearest_neighbours import SEARCH_METHODS
    from members.trainer import PRECISIONS
    from retraining.holdout import METRICS
    from tiling.grid import PAD_MODES, REDUCTIONS

    members = tuple(available_members())
    return [
        ("benchmark", "device.accelerator", "tpu9", ("cpu", "cuda", "gpu", "mps", "auto")),
        ("benchmark", "device.strategy", "ddp9", ("auto", "ddp", "ddp_spawn")),
        ("benchmark", "device.precision", "16", PRECISIONS),
        ("benchmark", "data.dataset", "foo", ("synthetic", *available_datasets())),
        ("benchmark", "tiling.reduction", "median", REDUCTIONS),
        ("benchmark", "tiling.pad_mode", "wrap", PAD_MODES),
        ("benchmark", "grading.operating_point", "youden", OPERATING_POINTS),
        ("benchmark", "benchmark.members", "[patchcore, foo]", members),
        ("benchmark", "members.autoencoder.variant", "resnet", AUTOENCODER_VARIANTS),
        ("benchmark", "members.padim.score_aggregation", "median", SCORE_AGGREGATIONS),
        ("benchmark", "members.patchcore.search", "ivf", SEARCH_METHODS),
        ("ensemble", "hybrid.combiner", "vote", COMBINERS),
        ("ensemble", "hybrid.normalizer", "robust", tuple(NORMALIZERS)),
        ("ensemble", "hybrid.learner", "svm", LEARNERS),
        ("ensemble", "hybrid.grader", "learned", GRADERS),
        ("ensemble", "hybrid.pixel_threshold", "otsu", THRESHOLD_METHODS),
        ("ensemble", "ensemble.criterion", "speed", CRITERIA),
        ("ensemble", "ensemble.labeled_defects", "always", configs.schema.LABELED_DEFECTS),
        ("ensemble", "ensemble.members", "[foo]", members),
        ("retrain", "retrain.metric", "speed", METRICS),
        ("retrain", "retrain.promote_on", "always", configs.schema.PROMOTE_ON),
        ("retrain", "hybrid.combiner", "vote", COMBINERS),
        ("retrain", "retrain.members", "[foo]", members),
        ("tiling_benchmark", "tiling_benchmark.member", "foo", members),
        ("benchmark", "benchmark.executor", "dask", configs.schema.EXECUTORS),
        ("predict", "predict.executor", "dask", configs.schema.EXECUTORS),
        ("predict", "predict.runtime", "tensorrt", configs.schema.RUNTIMES),
        ("export", "export.format", "tflite", configs.schema.EXPORT_FORMATS),
    ]


@pytest.mark.parametrize(
    ("pipeline", "key", "value", "choices"), _choice_cases(), ids=lambda v: str(v)[:40]
)
def test_choice_errors_name_the_key_the_value_and_the_choices(pipeline, key, value, choices):
    with pytest.raises(ConfigError) as info:
        load_config(pipeline, overrides=[f"{key}={value}"])
    message = str(info.value)
    bad = value.strip("[]").split(", ")[-1]
    assert key in message
    assert repr(bad) in message
    for choice in choices:
        assert str(choice) in message
    good = f"[{choices[0]}]" if value.startswith("[") else choices[0]
    assert load_config(pipeline, overrides=[f"{key}={good}"])  # a choice itself is taken


@pytest.mark.parametrize(
    ("pipeline", "override", "message"),
    [
        ("benchmark", "trainer.gradient_clip_val=abc", "trainer.gradient_clip_val must be float"),
        ("benchmark", "trainer.max_steps=abc", "trainer.max_steps must be int or null"),
        (
            "benchmark",
            "members.padim.trainer.gradient_clip_val=abc",
            "members.padim.trainer.gradient_clip_val must be float",
        ),
        ("benchmark", "benchmark.job_timeout_s=soon", "benchmark.job_timeout_s must be float"),
        ("benchmark", "synthetic.level_weights=[1, a]", "synthetic.level_weights[1] must be"),
        ("benchmark", "synthetic.gain_pct=-2", "synthetic.gain_pct must be in [0, 100), got -2"),
        (
            "benchmark",
            "synthetic.background_mura_semu=1.5",
            "synthetic.background_mura_semu must be in (0, 1): within spec",
        ),
        ("benchmark", "synthetic.background_mura=2.5", "synthetic.background_mura must be int"),
        ("benchmark", "benchmark.tiling=[true, 3]", "benchmark.tiling[1] must be bool"),
        ("benchmark", "members.patchcore.layers=[2, x]", "members.patchcore.layers[1] must be int"),
        ("benchmark", "seed=null", "seed must be int (like the default 0), got null"),
        ("predict", "predict.overlay_max_side=big", "predict.overlay_max_side must be int"),
        ("retrain", "retrain.image_size=null", "retrain.image_size must be int or list"),
        ("benchmark", "ray.cpus_per_job=0", "ray.cpus_per_job must be a positive number, got 0"),
        ("benchmark", "ray.gpus_per_job=-1", "ray.gpus_per_job must be 0 or more, got -1"),
        ("predict", "ray.actors=0", "ray.actors must be a positive number, got 0"),
        ("predict", "ray.num_cpus=many", "ray.num_cpus must be int or null"),
        ("predict", "ray.env_vars={A: [1]}", "ray.env_vars.A must be text or a number, got [1]"),
    ],
)
def test_numbers_reject_what_is_not_a_number(pipeline, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(pipeline, overrides=[override])


@pytest.mark.parametrize(
    ("pipeline", "old", "new"),
    [
        ("ensemble", "ensemble.combiner", "hybrid.combiner"),
        ("ensemble", "ensemble.describer_backbone", "hybrid.describer_backbone"),
        ("retrain", "retrain.combiner", "hybrid.combiner"),
    ],
)
def test_a_moved_key_names_its_new_place(tmp_path, pipeline, old, new):
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: rank\n")
    for where in ({"config_files": [path]}, {"overrides": [f"{old}=rank"]}):
        with pytest.raises(ConfigError) as info:
            load_config(pipeline, **where)
        assert f"{old!r} has moved: it is {new!r} now" in str(info.value)


def test_a_new_member_declares_its_options_once_and_the_configuration_follows():
    """A member registered with its options' choices and its text options: the configuration
    checks them from the registry, with nothing written in configs."""
    from members import base

    class Chooser(base.Member):
        option_choices = {"mode": ("fast", "exact")}
        text_options = ("notes_dir",)

        def __init__(self, mode: str = "fast", notes_dir: str | None = None, **common) -> None:
            super().__init__(**common)
            self.mode, self.notes_dir = mode, notes_dir

    base.register("_chooser")(Chooser)
    try:
        with pytest.raises(ConfigError, match="members._chooser.mode must be fast or exact"):
            load_config("benchmark", overrides=["members._chooser.mode=slow"])
        with pytest.raises(ConfigError, match="score_aggregation must be max, mean"):
            load_config("benchmark", overrides=["members._chooser.score_aggregation=median"])
        cfg = load_config("benchmark", overrides=["members._chooser.notes_dir=01"])
        assert cfg["members"]["_chooser"] == {
            **member_parameters("_chooser"),
            "notes_dir": "01",  # text, as typed: YAML would have read the number 1
            "trainer": {},
        }
        with pytest.raises(ConfigError, match="members._chooser.notes_dir must be str"):
            load_config("benchmark", overrides=["members._chooser.notes_dir=[1]"])
    finally:
        base._REGISTRY.pop("_chooser")


def test_numbers_below_their_range_are_refused_naming_the_key():
    for pipeline, override, message in (
        ("predict", "predict.batch_megapixels=0", "predict.batch_megapixels must be a positive"),
        ("predict", "predict.read_ahead=-1", "predict.read_ahead must be 0 or more, got -1"),
        ("predict", "predict.overlay_max_side=0", "predict.overlay_max_side must be a positive"),
        ("ensemble", "ensemble.fit_workers=0", "ensemble.fit_workers must be a positive"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(pipeline, overrides=[override])
    assert load_config("predict", overrides=["predict.overlay_max_side=null"])


def test_every_key_has_a_type():
    """Every null default and every empty list has a declared type, and the table names only
    keys that exist (a typo in it would silently check nothing)."""
    leaves: dict[str, object] = {}
    for pipeline in PIPELINES:
        tree = default_tree(pipeline)
        for path in configs.loader._leaf_paths(tree):
            node = tree
            for part in path.split("."):
                node = node[part]
            if not isinstance(node, dict):
                leaves[path] = node
    untyped = [
        path
        for path, default in leaves.items()
        if (default is None or default == []) and configs.schema._key(path).type is None
    ]
    assert not untyped, f"declare these in configs.key_table: {untyped}"
    for path in key_table():
        if "*" not in path:
            assert path in leaves, f"configs.key_table names {path!r}, which no pipeline has"


def test_config_choices_equal_the_libraries():
    """configs writes these lists out (their modules are above it or pull in scikit-learn)."""
    from deploy.export import FORMATS
    from experiments.selection import CRITERIA
    from fusion.combiners import COMBINERS, LEARNERS
    from fusion.normalizers import NORMALIZERS
    from grading.graders import GRADERS, OPERATING_POINTS, THRESHOLD_METHODS
    from graphs.runtime import RUNTIMES
    from retraining.holdout import METRICS, PROMOTE_ON

    assert set(configs.schema.COMBINERS) == set(COMBINERS)
    assert set(configs.schema.LEARNERS) == set(LEARNERS)
    assert set(configs.schema.NORMALIZERS) == set(NORMALIZERS)
    assert set(configs.schema.GRADERS) == set(GRADERS)
    assert set(configs.schema.OPERATING_POINTS) == set(OPERATING_POINTS)
    assert set(configs.schema.PIXEL_THRESHOLDS) == set(THRESHOLD_METHODS)
    assert set(configs.schema.CRITERIA) == set(CRITERIA) == set(METRICS)
    assert set(configs.schema.EXPORT_FORMATS) == set(FORMATS)
    assert set(configs.schema.RUNTIMES) == set(RUNTIMES)
    assert set(configs.schema.PROMOTE_ON) == set(PROMOTE_ON)


def test_accelerator_choices_are_what_fabric_takes():
    from lightning_fabric import Fabric

    choices = key_table()["device.accelerator"].choices
    assert {"cpu", "cuda", "gpu", "mps", "auto"} <= set(choices)
    for accelerator in ("cpu", "auto"):  # the others need their hardware
        Fabric(accelerator=accelerator, devices=1)
    with pytest.raises(ValueError, match="tpu9"):  # what configs rejects, Fabric rejects too
        Fabric(accelerator="tpu9", devices=1)

"""The configuration loader: defaults, files, overrides, and errors that name the key."""

import re

import pytest
import yaml

from configs import CONFIG_DIR, ConfigError, load_config, parse_override, write_config
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


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("benchmark", overrides=["data.image_size=96"])
    path = write_config(cfg, tmp_path / "config.yaml")
    assert load_config("benchmark", [path]) == cfg

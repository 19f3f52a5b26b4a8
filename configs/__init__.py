"""Configuration: YAML files in this folder, loaded into one validated tree.

The tree a run starts from is ``defaults.yaml``, plus ``members.<name>`` for every registered
member (its constructor options with the defaults of its signature, overridden by
``members/<name>.yaml``), plus the pipeline's own file (``benchmark.yaml``, ...). That tree is
also the schema: a user's ``--config FILE`` (any subset of the same layout, e.g. one of
``datasets/*.yaml``) and ``--set section.key=value`` overrides may only name keys it has, with
values of the same type. Errors name the key and suggest the closest valid one.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
PIPELINES = ("benchmark", "ensemble", "predict", "retrain", "tiling_benchmark")
MEMBER_TRAINER_KEY = "trainer"
# Image sizes: one side (square) or [height, width]; data.image_size may be null (native).
IMAGE_SIZE_KEYS = ("data.image_size", "retrain.image_size")


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or has a wrong value."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _member_tree(name: str, trainer_schema: Mapping[str, Any]) -> dict[str, Any]:
    from members.base import member_parameters

    tree = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in member_parameters(name).items()
    }
    tree[MEMBER_TRAINER_KEY] = {}
    path = CONFIG_DIR / "members" / f"{name}.yaml"
    if path.is_file():
        schema = dict(tree, **{MEMBER_TRAINER_KEY: dict(trainer_schema)})
        _merge(tree, read_yaml(path), schema, f"members.{name}", str(path))
    return tree


def default_tree(pipeline: str | None = None) -> dict[str, Any]:
    """The full default configuration of ``pipeline`` (or of no pipeline)."""
    from members.base import available_members

    tree = read_yaml(CONFIG_DIR / "defaults.yaml")
    tree["members"] = {name: _member_tree(name, tree["trainer"]) for name in available_members()}
    if pipeline is not None:
        if pipeline not in PIPELINES:
            raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {PIPELINES}")
        own = read_yaml(CONFIG_DIR / f"{pipeline}.yaml")
        # The pipeline's own section is new; anything else it sets must already exist.
        section = own.pop(pipeline, {})
        _merge(tree, own, tree, "", str(CONFIG_DIR / f"{pipeline}.yaml"))
        tree[pipeline] = section
    return tree


def load_config(
    pipeline: str | None = None,
    config_files: Iterable[str | os.PathLike] = (),
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Defaults, then each of ``config_files``, then ``overrides`` (``"a.b=value"``), validated.

    Returns a plain nested dict, JSON-serializable, that is the run's resolved configuration.
    """
    tree = default_tree(pipeline)
    schema = copy.deepcopy(tree)
    for path in config_files:
        _merge(tree, read_yaml(path), schema, "", str(path))
    for item in overrides:
        _merge(tree, parse_override(item), schema, "", f"--set {item}")
    check_values(tree)
    return tree


def parse_override(item: str) -> dict[str, Any]:
    """``"data.image_size=128"`` -> ``{"data": {"image_size": 128}}`` (the value is YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: value is not valid YAML ({exc})") from exc
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _leaf_paths(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in schema.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, Mapping):
            paths.extend(_leaf_paths(value, path + "."))
    return paths


def _suggest(key: str, path: str, schema: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    same_name = [p for p in _leaf_paths(root) if p.rsplit(".", 1)[-1] == key]
    if same_name:
        return f"; did you mean {same_name[0]!r}?"
    near = difflib.get_close_matches(key, [str(k) for k in schema], n=1, cutoff=0.5)
    if near:
        return f"; did you mean {path + near[0]!r}?"
    near = difflib.get_close_matches(path + key, _leaf_paths(root), n=1, cutoff=0.6)
    if near:
        return f"; did you mean {near[0]!r}?"
    return f"; valid keys here: {sorted(map(str, schema))}"


def _type_name(value: Any) -> str:
    return {
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


def _check_type(value: Any, default: Any, where: str, source: str) -> Any:
    if default is None or value is None and not isinstance(default, (bool, dict)):
        return value
    if where in IMAGE_SIZE_KEYS and isinstance(value, (list, tuple)):
        return list(value)  # [height, width]; its values are checked in check_values
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: {where} must be {_type_name(default)} (like the default "
            f"{default!r}), got {_type_name(value)} {value!r}"
        )
    return value


def _merge(
    tree: dict[str, Any],
    update: Mapping[str, Any],
    schema: Mapping[str, Any],
    path: str,
    source: str,
    root: Mapping[str, Any] | None = None,
) -> None:
    root = schema if root is None else root
    prefix = f"{path}." if path else ""
    for key, value in update.items():
        if key not in schema:
            raise ConfigError(
                f"{source}: unknown key {prefix + str(key)!r}"
                + _suggest(str(key), prefix, schema, root)
            )
        default = schema[key]
        where = prefix + str(key)
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {where} must be a mapping, got {_type_name(value)} {value!r}"
                )
            sub_schema = default
            if key == MEMBER_TRAINER_KEY and path.startswith("members."):
                sub_schema = root["trainer"]
            if not sub_schema and not default:
                tree[key] = copy.deepcopy(dict(value))
                continue
            node = tree.setdefault(key, {})
            _merge(node, value, sub_schema, where, source, root)
        else:
            tree[key] = _check_type(value, default, where, source)


def _positive(cfg: Mapping[str, Any], path: str, allow_none: bool = False) -> None:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    if node is None and allow_none:
        return
    if not isinstance(node, (int, float)) or isinstance(node, bool) or node <= 0:
        raise ConfigError(f"{path} must be a positive number, got {node!r}")


def _image_sizes(cfg: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for path in IMAGE_SIZE_KEYS:
        section, key = path.split(".")
        if section in cfg:
            yield path, cfg[section][key]
    if "benchmark" in cfg:
        for k, size in enumerate(cfg["benchmark"]["image_sizes"]):
            yield f"benchmark.image_sizes[{k}]", size


def check_values(cfg: Mapping[str, Any]) -> None:
    """Checks across keys and of value ranges that types alone cannot express."""
    from data.images import size_pair

    for path in ("data.batch_size", "tiling.tile_size", "tiling.stride", "tiling.batch_size"):
        _positive(cfg, path)
    _positive(cfg, "trainer.max_steps", allow_none=True)
    for path, size in _image_sizes(cfg):
        try:
            size_pair(size)
        except ValueError:
            raise ConfigError(
                f"{path} must be a positive int (square side) or [height, width], got {size!r}"
            ) from None
    _positive(cfg, "trainer.max_epochs")
    if cfg["tiling"]["stride"] > cfg["tiling"]["tile_size"]:
        raise ConfigError(
            f"tiling.stride ({cfg['tiling']['stride']}) is larger than tiling.tile_size "
            f"({cfg['tiling']['tile_size']}): parts of the image would never be inspected"
        )
    if cfg["grading"]["operating_point"] not in ("false_alarm", "f1"):
        raise ConfigError(
            "grading.operating_point must be false_alarm or f1, got "
            f"{cfg['grading']['operating_point']!r}"
        )
    if not 0 <= cfg["grading"]["false_alarm_rate"] < 1:
        raise ConfigError(
            f"grading.false_alarm_rate must be in [0, 1), got {cfg['grading']['false_alarm_rate']}"
        )
    if not 0 <= cfg["data"]["val_fraction"] < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg['data']['val_fraction']}")
    reduction = cfg["tiling"]["reduction"]
    if reduction not in ("mean", "max", "hann", "gaussian"):
        raise ConfigError(f"tiling.reduction must be mean, max, hann or gaussian: {reduction!r}")
    choices = {"ensemble.labeled_defects": ("auto", "cross_validate", "never")}
    for path, allowed in choices.items():
        section, key = path.split(".")
        if section in cfg and cfg[section][key] not in allowed:
            raise ConfigError(f"{path} must be one of {allowed}, got {cfg[section][key]!r}")
    from data.images import intensity_settings

    try:  # data.intensity's choices and its percentiles, as the datasets check them
        intensity_settings(cfg["data"]["intensity"], cfg["data"]["intensity_percentiles"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if "ensemble" in cfg:
        _positive(cfg, "ensemble.folds")
        _positive(cfg, "ensemble.top_k")
    if "benchmark" in cfg:
        _positive(cfg, "benchmark.validation_injections")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (repeatable) and ``--set key.sub=value`` (repeatable)."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file with any subset of the configuration (repeatable; later files win)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override one key, e.g. --set data.image_size=128 (repeatable; value is YAML)",
    )


def write_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved configuration as YAML, atomically."""
    from data.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))

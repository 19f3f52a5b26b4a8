"""Loading the configuration: YAML files in this folder, the user's files and overrides merged
into one tree, each value checked against the schema (``configs.schema``) as it is merged.

The tree a run starts from is ``defaults.yaml``, plus ``members.<name>`` for every registered
member (its constructor options with the defaults of its signature, overridden by
``members/<name>.yaml``), plus the pipeline's own file (``benchmark.yaml``, ...). That tree is
also the schema: a user's ``--config FILE`` (any subset of the same layout, e.g. one of
``datasets/*.yaml``) and ``--set section.key=value`` overrides may only name keys it has, with
values of the same type. Errors name the key and suggest the closest valid one; a key that
moved (``MOVED_KEYS``) is an error that names its new place. Names given as command-line flags
(``--run-name``, ``--categories``, paths) arrive as ``Flag``s, typed as given, never read as
YAML.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs.schema import (
    MEMBER_TRAINER_KEY,
    MOVED_KEYS,
    ConfigError,
    check_type,
    check_values,
    type_name,
)

CONFIG_DIR = Path(__file__).resolve().parent
PIPELINES = ("benchmark", "ensemble", "predict", "retrain", "tiling_benchmark", "export")


@dataclass(frozen=True)
class Flag:
    """A command-line flag's value for one key, typed as given and never read as YAML: YAML
    would make ``--run-name 2024-06-01`` a date and ``--categories 01,02`` the numbers 1, 2."""

    key: str  # "benchmark.run_name"
    value: Any  # "2024-06-01", ["01", "02"], 3
    flag: str  # "--run-name", as errors name it


def split_names(text: str) -> list[str]:
    """``"bottle, screw"`` -> ``["bottle", "screw"]``: a comma-separated flag, each name text."""
    return [part.strip() for part in text.split(",") if part.strip()]


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
    overrides: Iterable[str | Flag] = (),
) -> dict[str, Any]:
    """Defaults, then each of ``config_files``, then ``overrides`` in order (``"a.b=value"``,
    its value YAML, or a ``Flag`` with a typed value), validated.

    Returns a plain nested dict, JSON-serializable, that is the run's resolved configuration.
    """
    tree = default_tree(pipeline)
    schema = copy.deepcopy(tree)
    for path in config_files:
        _merge(tree, read_yaml(path), schema, "", str(path))
    for item in overrides:
        if isinstance(item, Flag):
            update = _nest(_override_key(item.key, item.flag), item.value)
            _merge(tree, update, schema, "", f"{item.flag} {item.value}")
        else:
            # The text as typed rides along: where a key takes text, a value YAML reads as a
            # number or a date (01, 2024-06-01) is kept as the user wrote it.
            text = parse_override(item, yaml.BaseLoader)
            _merge(tree, parse_override(item), schema, "", f"--set {item}", text=text)
    check_values(tree)
    return tree


def _override_key(key: str, item: str) -> list[str]:
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    return key.split(".")


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(item: str, loader: type = yaml.SafeLoader) -> dict[str, Any]:
    """``"data.image_size=128"`` -> ``{"data": {"image_size": 128}}`` (the value is YAML).

    ``loader=yaml.BaseLoader`` reads every scalar as the text typed (``"128"``).
    """
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    parts = _override_key(key, item)
    try:  # SafeLoader and BaseLoader build plain data only, never Python objects
        value = yaml.load(raw, Loader=loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: value is not valid YAML ({exc})") from exc
    return _nest(parts, value)


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


def _merge(
    tree: dict[str, Any],
    update: Mapping[str, Any],
    schema: Mapping[str, Any],
    path: str,
    source: str,
    root: Mapping[str, Any] | None = None,
    text: Any = None,
) -> None:
    """Merge ``update`` into ``tree``, each key checked against ``schema``; ``text`` is
    ``update`` as typed on the command line (every scalar a string), where there is one."""
    root = schema if root is None else root
    prefix = f"{path}." if path else ""
    for key, value in update.items():
        where = prefix + str(key)
        if where in MOVED_KEYS:
            raise ConfigError(f"{source}: {where!r} has moved: it is {MOVED_KEYS[where]!r} now")
        if key not in schema:
            raise ConfigError(
                f"{source}: unknown key {where!r}" + _suggest(str(key), prefix, schema, root)
            )
        default = schema[key]
        key_text = text.get(key) if isinstance(text, Mapping) else None
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {where} must be a mapping, got {type_name(value)} {value!r}"
                )
            sub_schema = default
            if key == MEMBER_TRAINER_KEY and path.startswith("members."):
                sub_schema = root["trainer"]
            if not sub_schema and not default:
                tree[key] = copy.deepcopy(dict(value))
                continue
            node = tree.setdefault(key, {})
            _merge(node, value, sub_schema, where, source, root, key_text)
        else:
            tree[key] = check_type(value, default, where, source, key_text)


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
        help="override one key, e.g. --set data.image_size=128 (repeatable; value is YAML, but a "
        "key that takes text keeps the text typed: --set benchmark.run_name=2024-06-01)",
    )


def write_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved configuration as YAML, atomically."""
    from artifacts.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))

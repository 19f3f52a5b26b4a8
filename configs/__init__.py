"""Configuration: YAML files in this folder, loaded into one validated tree.

The tree a run starts from is ``defaults.yaml``, plus ``members.<name>`` for every registered
member (its constructor options with the defaults of its signature, overridden by
``members/<name>.yaml``), plus the pipeline's own file (``benchmark.yaml``, ...). That tree is
also the schema: a user's ``--config FILE`` (any subset of the same layout, e.g. one of
``datasets/*.yaml``) and ``--set section.key=value`` overrides may only name keys it has, with
values of the same type. Errors name the key and suggest the closest valid one; a key that
moved (``MOVED_KEYS``) is an error that names its new place.

A default says a key's type; where it cannot say it all (a null default, an empty list, a
string that takes one of a few values), ``key_table`` declares the type and the choices. Names
given as command-line flags (``--run-name``, ``--categories``, paths) arrive as ``Flag``s,
typed as given, never read as YAML.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import difflib
import functools
import os
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
PIPELINES = ("benchmark", "ensemble", "predict", "retrain", "tiling_benchmark", "export")
MEMBER_TRAINER_KEY = "trainer"
# Image sizes: one side (square) or [height, width] (their values are checked by check_values).
IMAGE_SIZE_KEYS = ("data.image_size", "retrain.image_size")


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or has a wrong value."""


# Choices owned by higher floors (pipelines) or by modules that cost a second to import
# (fusion and grading pull in scikit-learn): written here, and tests/test_config.py keeps them
# equal to the library's own lists.
COMBINERS = (  # fusion
    "forward",
    "auto",
    "mean",
    "max",
    "rank",
    "weighted",
    "learned",
    "rank_or_member",
)
NORMALIZERS = ("minmax", "zscore", "rank")  # fusion.normalizers
LEARNERS = ("logistic", "boosting")  # fusion.combiners
GRADERS = ("auto", "rules", "ordinal")  # grading.graders
OPERATING_POINTS = ("false_alarm", "f1")  # grading.graders
PIXEL_THRESHOLDS = ("region", "f1", "quantile")  # grading.graders.THRESHOLD_METHODS
# experiments.selection.CRITERIA, retraining.holdout.METRICS
CRITERIA = ("composite", "image_auroc", "pixel_auroc", "aupro")
LABELED_DEFECTS = ("auto", "cross_validate", "never")  # read by pipelines.ensemble only
# Whether the supervised member is trained (where labeled defects exist): ensemble and retrain.
SUPERVISED = ("auto", "never")
# Where benchmark jobs and predict's images run: this machine, or a Ray cluster (the ray section).
EXECUTORS = ("local", "ray")
EXPORT_FORMATS = ("onnx", "openvino")  # deploy.export.FORMATS
RUNTIMES = ("torch", "onnx", "openvino")  # deploy.runtime.RUNTIMES
PROMOTE_ON = ("margin", "verdict")  # retraining.holdout.PROMOTE_ON

# Keys that moved (the hybrid's options became one section that ensemble and retrain share): a
# file or override naming the old place is told the new one.
MOVED_KEYS = {
    **{
        f"ensemble.{key}": f"hybrid.{key}"
        for key in (
            "combiner",
            "normalizer",
            "learner",
            "pixel_threshold",
            "grader",
            "type_confidence",
            "describer_backbone",
        )
    },
    "retrain.combiner": "hybrid.combiner",
}


@dataclass(frozen=True)
class Key:
    """What one key may hold where its default does not say it all.

    ``type``: ``str``, ``int``, ``float`` (any number), ``bool``, ``list``, ``list[str]`` (a list
    of names), ``int | list`` ...; ``None`` takes the default's type. ``choices``: the values
    allowed (for a list, for each item). ``null``: null allowed although the default is not.
    """

    type: Any = None
    choices: tuple[Any, ...] = ()
    null: bool = False


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


def key_table() -> Mapping[str, Key]:
    """Declared types and choices, by dotted key; ``members.*.key`` is any member's option, and
    ``trainer.key`` also types ``members.<name>.trainer.key``.

    Choices come from the lower floors' own lists where they are cheap to import (configs
    already loads data and members); ``data.intensity`` is left to ``intensity_settings``, which
    checks it with its percentiles.
    """
    from members.base import available_members

    # Built once per set of registered members (a test may register one), not per key merged.
    return _key_table(tuple(available_members()))


@functools.cache
def _key_table(members: tuple[str, ...]) -> Mapping[str, Key]:
    from lightning_fabric.accelerators import ACCELERATOR_REGISTRY
    from lightning_fabric.strategies import STRATEGY_REGISTRY

    from data.datasets import available_datasets
    from data.sources import SYNTHETIC
    from members.autoencoder import AUTOENCODER_VARIANTS, CORRUPTIONS, LR_SCHEDULES, MAP_METRICS
    from members.base import SCORE_AGGREGATIONS
    from members.coreset import METHODS as CORESET_METHODS
    from members.efficientad import MODEL_SIZES
    from members.nearest_neighbours import SEARCH_METHODS
    from members.stfpm import MAP_COMBINATIONS
    from members.trainer import PRECISIONS
    from tiling.grid import PAD_MODES, REDUCTIONS

    name, names, number = Key(str, null=True), Key(list[str]), Key(float, null=True)
    table = {
        # What Fabric accepts: its registered accelerators plus the aliases it resolves itself.
        "device.accelerator": Key(
            choices=(*sorted({*ACCELERATOR_REGISTRY.available_accelerators(), "gpu"}), "auto")
        ),
        "device.strategy": Key(choices=("auto", *STRATEGY_REGISTRY.available_strategies())),
        "device.precision": Key(choices=PRECISIONS),  # FabricTrainer's subset of Fabric's
        "data.dataset": Key(choices=(SYNTHETIC, *available_datasets())),
        "data.data_dir": name,
        "data.categories": names,
        "data.image_size": Key(int | list, null=True),  # a side or [height, width]; null: native
        "data.group_pattern": name,  # null: each image its own group
        "ray.address": name,  # null or "local": a local instance for the run
        "ray.num_cpus": Key(int, null=True),
        "ray.cpus_per_job": Key(float),
        "ray.gpus_per_job": Key(float),
        "ray.actors": Key(int, null=True),
        "synthetic.level_weights": Key(list[float], null=True),  # null: uniform
        "tiling.reduction": Key(choices=REDUCTIONS),
        "tiling.pad_mode": Key(str, PAD_MODES, null=True),
        "hybrid.combiner": Key(choices=COMBINERS),
        "hybrid.pixel_combiner": Key(str, COMBINERS, null=True),  # null: as hybrid.combiner
        "hybrid.normalizer": Key(choices=NORMALIZERS),
        "hybrid.learner": Key(choices=LEARNERS),
        "hybrid.pixel_threshold": Key(choices=PIXEL_THRESHOLDS),
        "hybrid.grader": Key(choices=GRADERS),
        "hybrid.describer_backbone": name,  # null: off
        "grading.operating_point": Key(choices=OPERATING_POINTS),
        "trainer.max_steps": Key(int, null=True),
        "trainer.gradient_clip_val": number,
        "members.*.score_aggregation": Key(choices=SCORE_AGGREGATIONS),
        "members.autoencoder.variant": Key(choices=AUTOENCODER_VARIANTS),
        "members.autoencoder.map_metric": Key(choices=MAP_METRICS),
        "members.autoencoder.corruption": Key(choices=CORRUPTIONS),
        "members.autoencoder.lr_schedule": Key(choices=LR_SCHEDULES),
        "members.vae.map_metric": Key(choices=MAP_METRICS),
        "members.vae.lr_schedule": Key(choices=LR_SCHEDULES),
        "members.draem.texture_dir": name,
        "members.efficientad.model_size": Key(choices=MODEL_SIZES),
        "members.efficientad.penalty_dir": name,
        "members.patchcore.coreset_method": Key(choices=CORESET_METHODS),
        "members.patchcore.search": Key(choices=SEARCH_METHODS),
        "members.stfpm.map_combination": Key(choices=MAP_COMBINATIONS),
        "benchmark.members": Key(list[str], members),
        "benchmark.backbones": names,
        "benchmark.image_sizes": Key(list),  # items checked by check_values (sizes)
        "benchmark.tiling": Key(list[bool]),
        "benchmark.datasets": Key(list[dict]),  # overlays of the data section
        "benchmark.run_name": name,
        "benchmark.init_from": name,
        "artifacts.key_file": name,
        "benchmark.job_timeout_s": number,
        "benchmark.executor": Key(choices=EXECUTORS),
        "ensemble.from_run": name,
        "ensemble.dataset": name,
        "ensemble.category": name,
        "ensemble.members": Key(list[str], members),
        "ensemble.criterion": Key(choices=CRITERIA),
        "ensemble.labeled_defects": Key(choices=LABELED_DEFECTS),
        "ensemble.fit_workers": Key(int, null=True),  # null: one per CPU
        "ensemble.supervised": Key(choices=SUPERVISED),
        "retrain.supervised": Key(choices=SUPERVISED),
        "ensemble.max_injected_images": Key(int, null=True),  # null: no cap
        "retrain.max_injected_images": Key(int, null=True),
        "ensemble.name": name,
        "predict.hybrid": name,
        "predict.out": name,
        "predict.overlay_max_side": Key(int, null=True),
        "predict.executor": Key(choices=EXECUTORS),
        "predict.runtime": Key(choices=RUNTIMES),
        "export.hybrid": name,
        "export.format": Key(choices=EXPORT_FORMATS),
        "retrain.normal_dirs": names,
        "retrain.defect_dirs": names,
        "retrain.labeled_dirs": names,
        "retrain.members": Key(list[str], members),
        "retrain.image_size": Key(int | list),
        "retrain.metric": Key(choices=CRITERIA),
        "retrain.promote_on": Key(choices=PROMOTE_ON),
        "tiling_benchmark.member": Key(choices=members),
    }
    return types.MappingProxyType(table)  # cached: read-only


def _key(where: str) -> Key:
    table = key_table()
    if where in table:
        return table[where]
    parts = where.split(".")
    if parts[0] == "members" and len(parts) > 2:
        if parts[2] == MEMBER_TRAINER_KEY:  # a member's own trainer section
            return table.get(".".join(parts[2:]), Key())
        return table.get(".".join(["members", "*", *parts[2:]]), Key())
    return Key()


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


def _type_name(value: Any) -> str:
    return {
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


def _type_text(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_text(option) for option in get_args(expected))
    if get_origin(expected) is list:
        return f"list of {_type_text(get_args(expected)[0])}"
    return {dict: "mapping"}.get(expected, getattr(expected, "__name__", str(expected)))


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, datetime.date) else repr(value)


def _one_of(choices: tuple[Any, ...]) -> str:
    names = ["null" if c is None else str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _default_type(default: Any) -> Any:
    """The type a default stands for; a list of names or of numbers also types its items."""
    if isinstance(default, (list, tuple)):
        kinds = {type(item) for item in default}
        if kinds == {str}:
            return list[str]
        if kinds and kinds <= {int, float}:
            return list[float] if float in kinds else list[int]
        return list
    return type(default)


# What YAML makes of unquoted text such as 01, 1e3, 2024-06-01 or yes.
_YAML_TYPED_TEXT = (bool, int, float, datetime.date)


class _Mismatch(Exception):
    def __init__(self, where: str, expected: Any, value: Any) -> None:
        super().__init__(where)
        self.where, self.expected, self.value = where, expected, value


def _coerce(value: Any, expected: Any, where: str, text: Any = None) -> Any:
    """``value`` as an ``expected``, or ``_Mismatch`` naming where (which item) it is not one.

    ``text`` is the same value as typed (every scalar a string, from ``--set``): where text is
    expected and YAML read a number or a date, the text typed is what the user meant.
    """
    if isinstance(expected, types.UnionType):
        for option in get_args(expected):
            try:
                return _coerce(value, option, where, text)
            except _Mismatch:
                continue
        raise _Mismatch(where, expected, value)
    if get_origin(expected) is list or expected is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(where, expected, value)
        if expected is list:
            return list(value)
        (item_type,) = get_args(expected)
        texts = text if isinstance(text, list) and len(text) == len(value) else [None] * len(value)
        return [
            _coerce(item, item_type, f"{where}[{i}]", item_text)
            for i, (item, item_text) in enumerate(zip(value, texts, strict=True))
        ]
    if expected is str and isinstance(value, _YAML_TYPED_TEXT) and isinstance(text, str):
        return text
    if expected in (int, float):
        kinds = (int, float) if expected is float else int
        ok = isinstance(value, kinds) and not isinstance(value, bool)
    elif expected is dict:
        ok = isinstance(value, Mapping)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise _Mismatch(where, expected, value)
    return value


def _check_type(value: Any, default: Any, where: str, source: str, text: Any = None) -> Any:
    """``value`` checked against the key's declared type and choices, else its default's type.

    A null default without a declared type takes anything. Null is taken where the default is
    null or the key allows it, and by a member's constructor options, whose classes check them.
    """
    key = _key(where)
    expected = key.type
    if expected is None and default is not None:
        expected = _default_type(default)
    nullable = default is None or key.null
    like = f" (like the default {default!r})" if default is not None else ""
    if value is None:
        member_option = where.startswith("members.") and where.count(".") == 2
        if nullable or expected is None or member_option:
            return None
        raise ConfigError(f"{source}: {where} must be {_type_text(expected)}{like}, got null")
    if expected is not None:
        try:
            value = _coerce(value, expected, where, text)
        except _Mismatch as bad:
            whole = bad.where == where
            hint = ""
            if bad.expected is str and isinstance(bad.value, _YAML_TYPED_TEXT):
                hint = "; quote it ('01', '2024-06-01'): unquoted, YAML reads a number or a date"
            raise ConfigError(
                f"{source}: {bad.where} must be {_type_text(bad.expected)}"
                + (" or null" if whole and nullable else "")
                + (like if whole else "")
                + f", got {_type_name(bad.value)} {_shown(bad.value)}{hint}"
            ) from None
        if expected is float:
            value = float(value)
    for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
        if key.choices and item not in key.choices:
            at = where if i is None else f"{where}[{i}]"
            raise ConfigError(f"{source}: {at} must be {_one_of(key.choices)}, got {item!r}")
    return value


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
                    f"{source}: {where} must be a mapping, got {_type_name(value)} {value!r}"
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
            tree[key] = _check_type(value, default, where, source, key_text)


def _check_panel_variation(synthetic: Mapping[str, Any]) -> None:
    """The synthetic panels' spread between panels, in the ranges the generator takes."""
    checks = (
        ("gain_pct", 0 <= synthetic["gain_pct"] < 100, "in [0, 100)"),
        ("panel_variation", 0 <= synthetic["panel_variation"] <= 1, "in [0, 1]"),
        ("background_mura", synthetic["background_mura"] >= 0, "0 or more"),
        (
            "background_mura_semu",
            0 < synthetic["background_mura_semu"] < 1,
            "in (0, 1): within spec, below the just-noticeable difference",
        ),
    )
    for key, ok, text in checks:
        if not ok:
            raise ConfigError(f"synthetic.{key} must be {text}, got {synthetic[key]}")


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
    """Checks across keys and of value ranges that types alone cannot express (types and
    choices are checked as each file and override is merged, against ``key_table``)."""
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
    if "synthetic" in cfg:
        for path in ("synthetic.n_train", "synthetic.n_test", "synthetic.size"):
            _positive(cfg, path)
        _check_panel_variation(cfg["synthetic"])
    if cfg["tiling"]["stride"] > cfg["tiling"]["tile_size"]:
        raise ConfigError(
            f"tiling.stride ({cfg['tiling']['stride']}) is larger than tiling.tile_size "
            f"({cfg['tiling']['tile_size']}): parts of the image would never be inspected"
        )
    if not 0 <= cfg["grading"]["false_alarm_rate"] < 1:
        raise ConfigError(
            f"grading.false_alarm_rate must be in [0, 1), got {cfg['grading']['false_alarm_rate']}"
        )
    if not 0 <= cfg["data"]["val_fraction"] < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg['data']['val_fraction']}")
    from data.images import intensity_settings

    try:  # data.intensity's choices and its percentiles, as the datasets check them
        intensity_settings(cfg["data"]["intensity"], cfg["data"]["intensity_percentiles"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _check_ray(cfg)
    from data.datasets import compile_group_pattern

    try:
        compile_group_pattern(cfg["data"]["group_pattern"])
    except ValueError as exc:
        raise ConfigError(f"data.group_pattern: {exc}") from exc
    if "ensemble" in cfg:
        _positive(cfg, "ensemble.folds")
        _positive(cfg, "ensemble.top_k")
        _positive(cfg, "ensemble.fit_workers", allow_none=True)
        _positive(cfg, "ensemble.max_injected_images", allow_none=True)
    for section in ("ensemble", "retrain"):
        if section in cfg and cfg[section]["supervised_injections"] < 0:
            raise ConfigError(
                f"{section}.supervised_injections must be 0 or more, got "
                f"{cfg[section]['supervised_injections']}"
            )
    if "retrain" in cfg:
        _positive(cfg, "retrain.max_injected_images", allow_none=True)
        if cfg["retrain"]["folds"] < 2:
            raise ConfigError(
                f"retrain.folds must be 2 or more (labeled images are cross-fitted), got "
                f"{cfg['retrain']['folds']}"
            )
    if "benchmark" in cfg:
        _positive(cfg, "benchmark.validation_injections")


def _check_ray(cfg: Mapping[str, Any]) -> None:
    for key in ("cpus_per_job", "chunk_images"):
        _positive(cfg, f"ray.{key}")
    for key in ("num_cpus", "actors"):
        _positive(cfg, f"ray.{key}", allow_none=True)
    ray = cfg["ray"]
    for key in ("gpus_per_job", "max_retries"):
        if ray[key] < 0:
            raise ConfigError(f"ray.{key} must be 0 or more, got {ray[key]}")
    for name, value in ray["env_vars"].items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"ray.env_vars.{name} must be text or a number, got {value!r}")


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

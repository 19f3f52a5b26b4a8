"""The configuration's schema: what each key may hold, and the one place values are checked.

A default says a key's type; where it cannot say it all (a null default, an empty list, a
string that takes one of a few values, a number's range), ``key_table`` declares the type, the
choices and the lowest value. Members declare their own options' choices beside their code
(``members.base.member_choices``), read from the registry here. ``check_type`` checks one value
as a file or an override is merged; ``check_values`` checks the resolved tree across keys.
"""

from __future__ import annotations

import datetime
import functools
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin

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
RUNTIMES = ("torch", "onnx", "openvino")  # graphs.runtime.RUNTIMES
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
    ``minimum``: the lowest number allowed, itself excluded where ``above``.
    """

    type: Any = None
    choices: tuple[Any, ...] = ()
    null: bool = False
    minimum: float | None = None
    above: bool = False

    def out_of_range(self, value: Any) -> str | None:
        """What ``value`` should be where it is below the key's range, else None."""
        if self.minimum is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if value > self.minimum or (value == self.minimum and not self.above):
            return None
        if self.minimum == 0:
            return "a positive number" if self.above else "0 or more"
        return f"{'above' if self.above else 'at least'} {self.minimum:g}"


# Numbers that must be positive, or 0 or more; a count of 1 or more, or null.
POSITIVE = Key(minimum=0, above=True)
NOT_NEGATIVE = Key(minimum=0)
COUNT_OR_NULL = Key(int, null=True, minimum=0, above=True)


def key_table() -> Mapping[str, Key]:
    """Declared types and choices, by dotted key (``members.<name>.<option>``: as the member
    declares them, ``members.base.member_choices``); ``trainer.key`` also types
    ``members.<name>.trainer.key``.

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
    from members.base import member_choices, member_text_options
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
        "ray.num_cpus": COUNT_OR_NULL,
        "ray.cpus_per_job": Key(float, minimum=0, above=True),
        "ray.gpus_per_job": Key(float, minimum=0),
        "ray.actors": COUNT_OR_NULL,
        "ray.chunk_images": POSITIVE,
        "ray.max_retries": NOT_NEGATIVE,
        "data.batch_size": POSITIVE,
        "tiling.tile_size": POSITIVE,
        "tiling.stride": POSITIVE,
        "tiling.batch_size": POSITIVE,
        "trainer.max_epochs": POSITIVE,
        "synthetic.n_train": POSITIVE,
        "synthetic.n_test": POSITIVE,
        "synthetic.size": POSITIVE,
        "ensemble.folds": POSITIVE,
        "ensemble.top_k": POSITIVE,
        "ensemble.supervised_injections": NOT_NEGATIVE,
        "retrain.supervised_injections": NOT_NEGATIVE,
        "benchmark.validation_injections": POSITIVE,
        "predict.batch_size": POSITIVE,
        "predict.batch_megapixels": POSITIVE,
        "predict.read_ahead": NOT_NEGATIVE,
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
        "trainer.max_steps": COUNT_OR_NULL,
        "trainer.gradient_clip_val": number,
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
        "ensemble.fit_workers": COUNT_OR_NULL,  # null: one per CPU
        "ensemble.supervised": Key(choices=SUPERVISED),
        "retrain.supervised": Key(choices=SUPERVISED),
        "ensemble.max_injected_images": COUNT_OR_NULL,  # null: no cap
        "retrain.max_injected_images": COUNT_OR_NULL,
        "ensemble.name": name,
        "predict.hybrid": name,
        "predict.out": name,
        "predict.overlay_max_side": COUNT_OR_NULL,
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
    # Each member's options, as the member declares them beside its code.
    for member in members:
        for option, choices in member_choices(member).items():
            table[f"members.{member}.{option}"] = Key(choices=choices)
        for option in member_text_options(member):
            table[f"members.{member}.{option}"] = name
    return types.MappingProxyType(table)  # cached: read-only


def _key(where: str) -> Key:
    table = key_table()
    if where in table:
        return table[where]
    parts = where.split(".")
    if parts[0] == "members" and len(parts) > 3 and parts[2] == MEMBER_TRAINER_KEY:
        return table.get(".".join(parts[2:]), Key())  # a member's own trainer section
    return Key()


def type_name(value: Any) -> str:
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


def check_type(value: Any, default: Any, where: str, source: str, text: Any = None) -> Any:
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
                + f", got {type_name(bad.value)} {_shown(bad.value)}{hint}"
            ) from None
    wanted = key.out_of_range(value)
    if wanted:
        raise ConfigError(f"{source}: {where} must be {wanted}, got {value!r}")
    if expected is float:
        value = float(value)
    for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
        if key.choices and item not in key.choices:
            at = where if i is None else f"{where}[{i}]"
            raise ConfigError(f"{source}: {at} must be {_one_of(key.choices)}, got {item!r}")
    return value


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


def _image_sizes(cfg: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for path in IMAGE_SIZE_KEYS:
        section, key = path.split(".")
        if section in cfg:
            yield path, cfg[section][key]
    if "benchmark" in cfg:
        for k, size in enumerate(cfg["benchmark"]["image_sizes"]):
            yield f"benchmark.image_sizes[{k}]", size


def check_values(cfg: Mapping[str, Any]) -> None:
    """Checks across keys, and of what ``key_table`` cannot declare (types, choices and lowest
    values are checked as each file and override is merged, by ``check_type``)."""
    from data.images import size_pair

    for path, size in _image_sizes(cfg):
        try:
            size_pair(size)
        except ValueError:
            raise ConfigError(
                f"{path} must be a positive int (square side) or [height, width], got {size!r}"
            ) from None
    if "synthetic" in cfg:
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
    if "retrain" in cfg and cfg["retrain"]["folds"] < 2:
        raise ConfigError(
            f"retrain.folds must be 2 or more (labeled images are cross-fitted), got "
            f"{cfg['retrain']['folds']}"
        )
    if "predict" in cfg:
        _check_predict(cfg["predict"])


def _check_predict(predict: Mapping[str, Any]) -> None:
    if predict["executor"] == "ray" and predict["runtime"] != "torch":
        raise ConfigError(
            f"predict.runtime {predict['runtime']} runs in this process only: the Ray actors run "
            "the members with PyTorch (use predict.executor local, or predict.runtime torch)"
        )


def _check_ray(cfg: Mapping[str, Any]) -> None:
    ray = cfg["ray"]
    for name, value in ray["env_vars"].items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"ray.env_vars.{name} must be text or a number, got {value!r}")

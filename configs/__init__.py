"""Configuration: YAML files in this folder, loaded into one validated tree.

``configs.loader`` reads and merges them (defaults, each member's options, the pipeline's file,
the user's files, ``--set`` overrides and flags); ``configs.schema`` says what each key may hold
and checks every value, in one place.
"""

from configs.loader import (
    CONFIG_DIR,
    PIPELINES,
    Flag,
    add_config_arguments,
    default_tree,
    load_config,
    parse_override,
    read_yaml,
    split_names,
    write_config,
)
from configs.schema import ConfigError, Key, check_values, key_table

__all__ = [
    "CONFIG_DIR",
    "PIPELINES",
    "ConfigError",
    "Flag",
    "Key",
    "add_config_arguments",
    "check_values",
    "default_tree",
    "key_table",
    "load_config",
    "parse_override",
    "read_yaml",
    "split_names",
    "write_config",
]

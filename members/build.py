"""One way to build a member and its trainer from configuration sections.

The benchmark job, retraining and the tiling benchmark all fit members; they build them here so
that every one honours the same keys (the whole ``device`` section, the member's own ``trainer``
overrides, warm starts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from members.base import Member, create_member, load_member
from members.trainer import FabricTrainer

log = logging.getLogger(__name__)


def member_options(members_cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The constructor options of member ``name`` (its config section without ``trainer``)."""
    return {k: v for k, v in members_cfg[name].items() if k != "trainer"}


def trainer_options(
    trainer_cfg: Mapping[str, Any], members_cfg: Mapping[str, Any], name: str
) -> dict[str, Any]:
    """The ``trainer`` section with member ``name``'s own overrides on top."""
    return {**trainer_cfg, **members_cfg[name].get("trainer", {})}


def build_member(
    name: str, options: Mapping[str, Any], init_from: str | os.PathLike | None = None
) -> Member:
    """A fresh member from its options, or one starting from the weights saved in ``init_from``
    (refitted: its fitted flag is cleared)."""
    if init_from:
        init = Path(init_from)
        member = load_member(init)
        if member.member_name != name:
            raise ValueError(f"{init} holds a {member.member_name!r} member, not {name!r}")
        member.fitted.fill_(False)
        log.info("starting %s from the weights in %s", name, init)
        return member
    return create_member(name, **options)


def build_trainer(
    device: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    seed: int,
    out_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> FabricTrainer:
    """A Fabric trainer on the configured device (accelerator, devices, strategy, nodes,
    precision) with the training ``options``; it checkpoints to and resumes from ``out_dir``."""
    options = dict(options)
    if progress is not None:
        options["progress"] = progress
    return FabricTrainer(
        accelerator=device["accelerator"],
        devices=device["devices"],
        strategy=device["strategy"],
        num_nodes=device["num_nodes"],
        precision=device["precision"],
        out_dir=out_dir,
        resume=out_dir is not None,
        seed=seed,
        **options,
    )

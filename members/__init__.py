"""Detectors ("members"): the protocol, the registry, the Fabric trainer and one file per model.

Importing this package registers every member; build one with ``create_member(name, **cfg)``.
"""

from members.base import (
    Member,
    aggregate_scores,
    available_members,
    create_member,
    load_member,
    member_parameters,
    register,
)
from members.member_set import MemberSet
from members.trainer import FabricTrainer

# One module per member; importing them registers them.
from members import (  # noqa: E402,F401  isort: skip
    autoencoder,
    draem,
    efficientad,
    fastflow,
    padim,
    patchcore,
    stfpm,
    supervised,
    vae,
)

__all__ = [
    "FabricTrainer",
    "Member",
    "MemberSet",
    "aggregate_scores",
    "available_members",
    "create_member",
    "load_member",
    "member_parameters",
    "register",
]

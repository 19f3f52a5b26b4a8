"""What a hybrid's members become as graphs, mirroring ``MemberSet``: one graph per shared
backbone (images -> the feature maps of the layers its members use, run once per batch) and one
head graph per member (images, and the shared feature maps where it has them -> the member's
``graph_outputs``). A member that shares no backbone gets one head graph with its own backbone
inside.

Every graph takes ``images`` ``[B, 3, h, w]`` in [0, 1] at the members' input size; only the
batch axis is free. A graph that does not use an input (a head whose backbone is shared) does
not declare it, so a runtime feeds each graph only the inputs it declares.

Also here, what exporting and running share: where an export lives (``export_dir``), its
description file, the members' refusals, the error and the optional imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from members.backbones import FeatureExtractor
from members.base import Member
from members.member_set import MemberSet

IMAGES = "images"
EXPORT_FILE = "export.json"
FORMAT_VERSION = 1


def layer_name(layer: int) -> str:
    """The name of a backbone graph's output (and a head graph's input) for timm layer index
    ``layer``."""
    return f"layer{layer}"


class BackboneGraph(nn.Module):
    """A shared backbone: images -> its feature maps, one per layer."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(images))


class HeadGraph(nn.Module):
    """One member from images and, with ``layers``, the shared backbone's maps of those layers
    (one tensor each, in that order) to its ``graph_outputs``."""

    def __init__(self, member: Member, layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.member = member
        self.layers = layers

    def forward(self, images: torch.Tensor, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shared = dict(zip(self.layers, features)) if self.layers else None
        return tuple(self.member.graph_outputs(images, shared))


@dataclass
class GraphSpec:
    """One graph to export: its name (the file's stem), module, the names of its inputs and,
    for a backbone, of its outputs; for a head, its member and the backbone graph whose outputs
    it takes; for a backbone, the members that take them."""

    name: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)  # a head's: named when it is exported
    member: str | None = None
    backbone: str | None = None
    members: list[str] = field(default_factory=list)


def graph_specs(member_set: MemberSet) -> list[GraphSpec]:
    """The graphs of ``member_set``'s members: its shared backbones first (in its order), then
    one head per member (in the members' order)."""
    specs: list[GraphSpec] = []
    backbone_of: dict[tuple, GraphSpec] = {}
    for index, (key, extractor) in enumerate(zip(member_set.group_keys, member_set.extractors)):
        spec = GraphSpec(
            name=f"backbone{index}-{extractor.name}",
            module=BackboneGraph(extractor),
            inputs=[IMAGES],
            outputs=[layer_name(layer) for layer in extractor.layers],
            members=[n for n in member_set.names if member_set.backbone_keys[n] == key],
        )
        backbone_of[key] = spec
        specs.append(spec)
    for name in member_set.names:
        member = member_set.members[name]
        backbone = backbone_of.get(member_set.backbone_keys[name])
        layers = tuple(member.feature_extractor.layers) if backbone is not None else ()
        specs.append(
            GraphSpec(
                name=f"member-{name}",
                module=HeadGraph(member, layers),
                inputs=[IMAGES, *map(layer_name, layers)],
                member=name,
                backbone=backbone.name if backbone is not None else None,
            )
        )
    return specs


def export_refusals(member_set: MemberSet) -> dict[str, str]:
    """Member name -> why it cannot be exported, for the members that cannot."""
    reasons = {name: member_set.members[name].export_refusal() for name in member_set.names}
    return {name: reason for name, reason in reasons.items() if reason}


class ExportError(RuntimeError):
    """A hybrid cannot be exported, or its export cannot be used; the message says why."""


def require(package: str, purpose: str, install: str | None = None) -> Any:
    """Import the optional ``package`` or fail with what needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        how = install or "pip install -e '.[export]'"
        raise ExportError(
            f"{purpose} needs the {package!r} package, which is not installed ({how})"
        ) from None


def export_dir(hybrid_dir: str | Path, format: str) -> Path:
    """Where a hybrid's export in ``format`` lives: ``<hybrid>/export/<format>``."""
    return Path(hybrid_dir) / "export" / format


def refusal_text(refusals: Mapping[str, str]) -> str:
    reasons = "; ".join(f"{name}: {reason}" for name, reason in refusals.items())
    return f"its members cannot all be exported ({reasons})"

"""Several fitted members run as one: shared backbones run once per batch.

Members that consume the same frozen pretrained backbone (same name, weights) get their feature
maps from one extractor built with the union of their layers, so a hybrid of PatchCore, PaDiM
and FastFlow on efficientnet_lite0 runs efficientnet_lite0 once per batch, not three times.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from torch import nn

from members.backbones import FeatureExtractor, load_backbone
from members.base import Member, ScoreAggregator


def _shared_extractor(group: list[Member]) -> FeatureExtractor:
    """One extractor with the union of the group's layers, weights taken from the member whose
    extractor reaches deepest (features_only keeps everything up to its deepest layer)."""
    extractors = [m.feature_extractor for m in group]
    layers = tuple(sorted({i for e in extractors for i in e.layers}))
    deepest = max(extractors, key=lambda e: max(e.layers))
    shared = load_backbone(deepest.name, layers=layers, pretrained=False, frozen=True)
    shared.body.load_state_dict(deepest.body.state_dict(), strict=True)
    return shared


class MemberSet(nn.Module):
    """Fitted members in a fixed order; ``forward`` returns their raw maps ``[B, M, H, W]`` and
    scores ``[B, M]``."""

    def __init__(self, members: dict[str, Member], share_backbones: bool = True) -> None:
        super().__init__()
        self.names = list(members)
        self.members = nn.ModuleDict(members)
        groups: dict[tuple, list[Member]] = defaultdict(list)
        # Each member's backbone identity, computed once (it digests the weights).
        self.backbone_keys = {name: m.shared_backbone_key() for name, m in members.items()}
        if share_backbones:
            for name, member in members.items():
                if self.backbone_keys[name] is not None:
                    groups[self.backbone_keys[name]].append(member)
        self.group_keys = [key for key, group in groups.items() if len(group) > 1]
        self.extractors = nn.ModuleList(_shared_extractor(groups[k]) for k in self.group_keys)
        self.eval()

    @property
    def device(self) -> torch.device:
        """Where the members' weights are (the CPU for members without any)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        answers = self.member_answers(images)
        scores = torch.stack([answer["pred_score"] for answer in answers], dim=1)
        return scores, torch.stack([answer["anomaly_map"][:, 0] for answer in answers], dim=1)

    def member_answers(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each member's answer to ``images``, in order; a shared backbone runs once."""
        shared: dict[tuple, dict[int, torch.Tensor]] = {}
        for key, extractor in zip(self.group_keys, self.extractors):
            shared[key] = dict(zip(extractor.layers, extractor(images)))
        return [
            self.members[name].predict(images, shared.get(self.backbone_keys[name]))
            for name in self.names
        ]

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The member protocol's answer, one channel per member: ``anomaly_map [B, M, H, W]``,
        ``pred_score [B, M]`` (so tiled inference runs every member on each tile batch)."""
        scores, maps = self(images)
        return {"anomaly_map": maps, "pred_score": scores}

    def compute_anomaly_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Each member's own image score of its channel of ``anomaly_map [B, M, H, W]``."""
        return torch.stack(
            [
                self.compute_channel_score(i, anomaly_map[:, i : i + 1])
                for i in range(len(self.names))
            ],
            dim=1,
        )

    def compute_channel_score(self, channel: int, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Member ``channel``'s own image scores ``[B]`` of its map ``[B, 1, H, W]`` alone (a
        panel's maps are scored one member at a time)."""
        return self.members[self.names[channel]].compute_anomaly_score(anomaly_map)

    def channel_score_aggregator(
        self, channel: int, height: int, width: int
    ) -> ScoreAggregator | None:
        """Member ``channel``'s ``score_aggregator``: its score of a map given in bands."""
        return self.members[self.names[channel]].score_aggregator(height, width)

    @property
    def score_from_tiles(self) -> tuple[str, ...]:
        """Each member's ``score_from_tiles`` (``"map"`` when it declares none), one per channel:
        tiled inference scores every channel as its member alone would be scored."""
        return tuple(getattr(self.members[name], "score_from_tiles", "map") for name in self.names)

"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features (two mid-level backbone layers, each averaged over its 3x3
neighbourhood, the deeper one upsampled to the first's resolution, concatenated and, if wider
than ``feature_dim``, reduced by adaptive average pooling over channels) of every training image
form a memory bank, subsampled to a greedy coreset (``members.coreset``). A test patch scores
its distance to the nearest memory feature; the map is upsampled to the input and smoothed with
a Gaussian of sigma 4. The image score is reweighted as in the paper: the most anomalous
patch's score is scaled by ``1 - softmax(d)[0]`` over its distances ``d`` to its nearest memory
feature and that feature's ``num_neighbors - 1`` nearest neighbours in the bank, so a patch
whose nearest memory feature sits in a sparse region counts less.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from members.backbones import load_backbone
from members.base import Member, gaussian_blur, register, upsample_map
from members.coreset import coreset_indices


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    query_chunk: int = 4096,
    bank_chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest rows of ``bank`` for each row of ``queries``,
    computed in chunks so memory stays at ``query_chunk x bank_chunk`` floats."""
    bank_sq = (bank * bank).sum(1)
    all_dist, all_index = [], []
    for q in queries.split(query_chunk):
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = torch.full((q.shape[0], 0), float("inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], bank_chunk):
            part = bank[start : start + bank_chunk]
            d = (q_sq - 2 * q @ part.T + bank_sq[start : start + bank_chunk]).clamp_min_(0)
            kk = min(k, d.shape[1])
            d, i = d.topk(kk, dim=1, largest=False)
            best_d = torch.cat([best_d, d], 1)
            best_i = torch.cat([best_i, i + start], 1)
            if best_d.shape[1] > k:
                best_d, order = best_d.topk(k, dim=1, largest=False)
                best_i = best_i.gather(1, order)
        all_dist.append(best_d.sqrt())
        all_index.append(best_i)
    return torch.cat(all_dist), torch.cat(all_index)


@register("patchcore")
class PatchCore(Member):
    trainable = False

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[int, ...] = (2, 3),
        pretrained: bool = True,
        weights_dir: str = "backbones",
        feature_dim: int = 1024,
        coreset_ratio: float = 0.1,
        coreset_method: str = "chunked",
        projection_dim: int = 128,
        coreset_chunk_size: int = 16384,
        num_neighbors: int = 9,
        reweight: bool = True,
        blur_sigma: float = 4.0,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.feature_extractor = load_backbone(backbone, tuple(layers), pretrained, weights_dir)
        self.feature_dim = feature_dim
        self.coreset_ratio = coreset_ratio
        self.coreset_method = coreset_method
        self.projection_dim = projection_dim
        self.coreset_chunk_size = coreset_chunk_size
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.register_buffer("memory_bank", torch.zeros(0, 1))
        self.fit_stats: dict[str, float] = {}

    def patch_features(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Locally aware patch features ``[B, D, h, w]``."""
        maps = [
            F.avg_pool2d(m.float(), 3, stride=1, padding=1)
            for m in self.backbone_features(images, features)
        ]
        size = maps[0].shape[-2:]
        maps = [
            m
            if m.shape[-2:] == size
            else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        embedding = torch.cat(maps, dim=1)
        if embedding.shape[1] > self.feature_dim:
            b, c, h, w = embedding.shape
            flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, c)
            embedding = (
                F.adaptive_avg_pool1d(flat, self.feature_dim)
                .reshape(b, h, w, -1)
                .permute(0, 3, 1, 2)
            )
        return embedding

    def fit_features(self, trainer, train_loader) -> None:
        started = time.perf_counter()
        features = trainer.gather(
            lambda batch: self.patch_features(batch["image"]).permute(0, 2, 3, 1).flatten(1, 2),
            train_loader,
        )
        features = features.reshape(-1, features.shape[-1])
        collected = time.perf_counter()
        index = coreset_indices(
            features.cpu(),
            self.coreset_ratio,
            self.coreset_method,
            self.projection_dim,
            self.coreset_chunk_size,
            self.seed,
        )
        self.memory_bank = features[index.to(features.device)].contiguous()
        self.fit_stats = {
            "patches": float(features.shape[0]),
            "memory_bank": float(self.memory_bank.shape[0]),
            "feature_seconds": collected - started,
            "coreset_seconds": time.perf_counter() - collected,
        }

    def _scores(self, images, features) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.patch_features(images, features)
        b, d, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        distances, nearest = nearest_neighbours(queries, self.memory_bank)
        patch_scores = distances[:, 0].reshape(b, 1, h, w)
        weights = torch.ones(b, device=queries.device)
        if self.reweight and self.memory_bank.shape[0] > 1:
            per_image = distances[:, 0].reshape(b, -1)
            top = per_image.argmax(1) + torch.arange(b, device=queries.device) * h * w
            worst, anchor = queries[top], nearest[top, 0]
            k = min(self.num_neighbors, self.memory_bank.shape[0])
            _, support = nearest_neighbours(self.memory_bank[anchor], self.memory_bank, k=k)
            gaps = torch.linalg.vector_norm(worst[:, None, :] - self.memory_bank[support], dim=-1)
            weights = 1 - torch.softmax(gaps, dim=1)[:, 0]
        anomaly_map = upsample_map(patch_scores, tuple(images.shape[-2:]))
        return gaussian_blur(anomaly_map, self.blur_sigma), weights

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self._scores(images, features)[0]

    def forward(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        anomaly_map, weights = self._scores(images, features)
        return {
            "pred_score": self.compute_anomaly_score(anomaly_map) * weights,
            "anomaly_map": anomaly_map,
        }

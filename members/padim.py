"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Each position of the feature map (the first three backbone layers, upsampled to the first's
resolution and concatenated) gets a multivariate Gaussian over a seeded random subset of
``n_features`` channels: mean and covariance regularized by ``eps * I``. A test patch scores its
Mahalanobis distance to its position's Gaussian; the map is upsampled and smoothed (sigma 4).

Memory stays bounded: training accumulates per-position sums and outer products batch by batch
(in float64; never all embeddings at once), and inference evaluates distances in chunks of
positions. PaDiM keeps statistics per position, so it needs the input size it was fitted at;
other sizes are an error (tiled inference resizes tiles for it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from members.base import BackboneMember, gaussian_blur, register, upsample_map


@register("padim")
class PaDiM(BackboneMember):
    trainable = False
    default_layers = (1, 2, 3)

    def __init__(
        self,
        n_features: int = 100,
        eps: float = 0.01,
        blur_sigma: float = 4.0,
        position_chunk: int = 1024,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        total = sum(self.feature_extractor.channels)
        if not 0 < n_features <= total:
            raise ValueError(
                f"n_features must be in [1, {total}] for these layers, got {n_features}"
            )
        self.eps = eps
        self.blur_sigma = blur_sigma
        self.position_chunk = position_chunk
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "channel_index", torch.randperm(total, generator=generator)[:n_features].sort().values
        )
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("inv_covariance", torch.zeros(0))
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.long))

    def embedding(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B, P, D]``: the selected channels at each of the P = h x w positions; and (h, w)."""
        maps = [m.float() for m in self.backbone_features(images, features)]
        size = maps[0].shape[-2:]
        maps = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest") for m in maps
        ]
        selected = torch.cat(maps, dim=1)[:, self.channel_index]
        return selected.flatten(2).transpose(1, 2), tuple(size)

    def fit_features(self, trainer, train_loader) -> None:
        def statistics(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            x = self.embedding(batch["image"])[0].double()
            return {
                "count": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                "sum": x.sum(0),
                "outer": torch.einsum("bpd,bpe->pde", x, x),
            }

        first = next(iter(train_loader))["image"]
        totals = trainer.accumulate(statistics, train_loader)
        n = totals["count"]
        if n < 2:
            raise ValueError("PaDiM needs at least two training images")
        mean = totals["sum"] / n
        covariance = (totals["outer"] - n * torch.einsum("pd,pe->pde", mean, mean)) / (n - 1)
        covariance += self.eps * torch.eye(
            covariance.shape[-1], dtype=covariance.dtype, device=covariance.device
        )
        self.mean = mean.float()
        # Row-major (a batched inverse comes column-major): the distances read it per position.
        self.inv_covariance = torch.linalg.inv(covariance).float().contiguous()
        self.input_size = torch.tensor(first.shape[-2:], dtype=torch.long)

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        # An export traces one fixed size (checked by deploy against the hybrid's input size);
        # the buffer is a graph input there, so the comparison cannot run inside the trace.
        exporting = torch.compiler.is_exporting()
        if not exporting and tuple(images.shape[-2:]) != tuple(self.input_size.tolist()):
            raise ValueError(
                f"PaDiM was fitted on {tuple(self.input_size.tolist())} images and keeps "
                f"statistics per position; got {tuple(images.shape[-2:])} "
                "(resize, or tile with resize_to)"
            )
        x, (h, w) = self.embedding(images, features)
        # Positions first, contiguous: one [B, D] x [D, D] product per position (bmm). The
        # batch-major einsum it replaces gave the same distances three times slower on a CPU.
        positions = x.transpose(0, 1)
        distances = []
        for start in range(0, positions.shape[0], self.position_chunk):
            stop = start + self.position_chunk
            delta = (positions[start:stop] - self.mean[start:stop, None]).contiguous()
            projected = torch.bmm(delta, self.inv_covariance[start:stop])
            distances.append((projected * delta).sum(-1).clamp_min(0).sqrt())
        patch_map = torch.cat(distances).T.reshape(images.shape[0], 1, h, w)
        return gaussian_blur(upsample_map(patch_map, tuple(images.shape[-2:])), self.blur_sigma)

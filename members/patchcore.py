"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Patch features, as the reference implementation (amazon-science/patchcore-inspection) builds
them: each backbone layer's map is made locally aware (averaged over its 3x3 neighbourhood),
brought to the first layer's resolution, and projected per patch to a common width
``feature_dim`` by adaptive average pooling over its channels (a 40-channel layer is spread over
1024 values by repetition, as the reference does); the layers' projections are stacked and
pooled to ``target_dim``. Every layer thus weighs the same in the distance, whatever its number
of channels.

That whole projection is one linear map ``A`` (``target_dim x C``) of a patch's ``C`` smoothed
channels. Where ``C < target_dim`` (efficientnet_lite0's 40 + 112 channels against 1024) the
features are stored as ``R x`` with ``A = QR``: ``||R z|| = ||A z||`` for every ``z``, so every
distance (nearest neighbours, reweighting, coreset coverage) is exactly the published one, at
``C`` instead of ``target_dim`` values per patch (7x less memory and search work for lite0).

The patch features of every training image form a memory bank, subsampled to a greedy coreset
(``members.coreset``; with ``chunked``, ``fit_stats`` also reports its coverage radius against
an exact greedy coreset's). A test patch scores its Euclidean distance to the nearest memory
feature (``members.nearest_neighbours``: exact by chunked matrix products, or faiss's HNSW
graph).

- Image score (``pred_score``), the paper's eq. 7, on the raw patch distances: the largest patch
  distance ``s*`` (patch ``m_test``, nearest memory feature ``m*``) times
  ``1 - exp(s*) / sum(exp(||m_test - m||))`` over the ``num_neighbors`` nearest memory features
  ``m`` of ``m*`` (``m*`` among them), so a patch whose nearest memory feature sits in a sparse
  region of the bank counts less. ``reweight=False`` (or ``num_neighbors=1``): ``s*`` itself.
- Anomaly map: the patch distances upsampled to the input and smoothed with a Gaussian of
  sigma ``blur_sigma``. The blur is for the map only: a one-patch defect keeps its full score.

Exported (``deploy``), the graph stops at the patch features; the search, the reweighting, the
upsampling and the blur run in PyTorch on the graph's output (``finish_graph_outputs``), the same
code as ``forward`` runs.

With a ``score_aggregation`` other than ``max``, the image score is that aggregation of the map,
as for other members. Tiled inference (``tiling.inference``) takes the largest per-tile image
score of a PatchCore (``score_from_tiles = "max"``), since its score is not a function of its map.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from members.base import BackboneMember, gaussian_blur, register, upsample_map
from members.coreset import METHODS, coreset_indices, coverage_comparison
from members.nearest_neighbours import SEARCH_METHODS, NearestNeighbourIndex


@register("patchcore")
class PatchCore(BackboneMember):
    trainable = False
    default_layers = (2, 3)
    option_choices = {"coreset_method": METHODS, "search": SEARCH_METHODS}

    def __init__(
        self,
        feature_dim: int = 1024,
        target_dim: int = 1024,
        coreset_ratio: float = 0.1,
        coreset_method: str = "chunked",
        projection_dim: int = 128,
        coreset_chunk_size: int = 16384,
        coverage_sample: int = 2000,
        num_neighbors: int = 9,
        reweight: bool = True,
        search: str = "hnsw",
        hnsw_m: int = 32,
        hnsw_ef_search: int = 16,
        blur_sigma: float = 4.0,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if feature_dim < 1 or target_dim < 1:
            raise ValueError(
                f"feature_dim and target_dim must be >= 1, got {feature_dim}, {target_dim}"
            )
        if coreset_method not in METHODS:
            raise ValueError(f"coreset_method must be one of {METHODS}, got {coreset_method!r}")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
        self.feature_dim = feature_dim
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.coreset_method = coreset_method
        self.projection_dim = projection_dim
        self.coreset_chunk_size = coreset_chunk_size
        self.coverage_sample = coverage_sample
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.neighbours = NearestNeighbourIndex(search, hnsw_m, hnsw_ef_search)
        self.blur_sigma = blur_sigma
        self.seed = seed
        projection = self._projection(self.feature_extractor.channels)
        # Recomputed from the options at construction, so not part of the saved state.
        self.register_buffer("projection", projection, persistent=False)
        self.register_buffer("memory_bank", torch.zeros(0, projection.shape[1]))
        self.fit_stats: dict[str, float] = {}

    def _pool(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """The reference's projection of per-layer patch rows ``[N, c_l]`` to ``[N, target_dim]``:
        each layer pooled over channels to ``feature_dim``, then all pooled to ``target_dim``."""
        pooled = [F.adaptive_avg_pool1d(x[:, None, :], self.feature_dim) for x in layers]
        return F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), self.target_dim)[:, 0]

    def _projection(self, channels: list[int]) -> torch.Tensor:
        """``[C, D]``: patch rows of concatenated channels times this give distances equal to the
        reference's ``target_dim``-wide features (``D = min(C, target_dim)``)."""
        basis = torch.eye(sum(channels), dtype=torch.float64)
        columns = basis.split(channels, dim=1)
        matrix = self._pool([c.float() for c in columns]).double()  # [C, target_dim] = A^T
        if matrix.shape[0] >= matrix.shape[1]:
            return matrix.float()
        # A = QR with R [C, C]: ||R z|| = ||A z||, so rows times R^T keep every distance.
        r = torch.linalg.qr(matrix.T, mode="r").R
        return r.T.float()

    @property
    def score_from_tiles(self) -> str:
        """How tiled inference forms the image score (see ``tiling.inference``): the largest
        per-tile ``pred_score`` when that is the paper's score, else the merged map's."""
        return "max" if self.score_aggregation == "max" else "map"

    def patch_features(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Locally aware patch features ``[B, D, h, w]`` at the first layer's resolution, every
        layer projected to ``feature_dim`` before they are pooled together (see the module
        docstring for ``D``)."""
        maps = self.backbone_features(images, features)
        size = maps[0].shape[-2:]
        smoothed = []
        for layer_map in maps:
            layer_map = F.avg_pool2d(layer_map.float(), 3, stride=1, padding=1)
            if layer_map.shape[-2:] != size:
                layer_map = F.interpolate(
                    layer_map, size=size, mode="bilinear", align_corners=False
                )
            smoothed.append(layer_map)
        patches = torch.cat(smoothed, dim=1).permute(0, 2, 3, 1)
        return (patches @ self.projection).permute(0, 3, 1, 2)

    def fit_features(self, trainer, train_loader) -> None:
        """The memory bank: every rank's patch features gathered on rank 0, which picks the
        coreset once, then shared with every rank (under DDP the others wait for it)."""
        started = time.perf_counter()
        features = trainer.gather_to_zero(
            lambda batch: self.patch_features(batch["image"]).permute(0, 2, 3, 1).flatten(1, 2),
            train_loader,
        )
        bank = None
        if features is not None:
            bank = self._coreset(features.reshape(-1, features.shape[-1]), started)
        self.memory_bank = trainer.broadcast_tensor(bank)

    def _coreset(self, features: torch.Tensor, started: float) -> torch.Tensor:
        """The coreset of ``features`` (its figures in ``fit_stats``)."""
        collected = time.perf_counter()
        # Exact greedy runs where the features are (the GPU, when there is one); the chunked
        # approximation is the CPU option.
        source = features if self.coreset_method == "greedy" else features.cpu()
        ratio, chunk_size, dim = self.coreset_ratio, self.coreset_chunk_size, self.projection_dim
        index = coreset_indices(source, ratio, self.coreset_method, dim, chunk_size, self.seed)
        bank = features[index.to(features.device)].contiguous()
        picked = time.perf_counter()
        self.fit_stats = {
            "patches": float(features.shape[0]),
            "memory_bank": float(bank.shape[0]),
            "feature_seconds": collected - started,
            "coreset_seconds": picked - collected,
        }
        if self.coreset_method == "chunked" and ratio < 1 and self.coverage_sample > 0:
            self.fit_stats.update(
                coverage_comparison(source, ratio, dim, chunk_size, self.coverage_sample, self.seed)
            )
            self.fit_stats["coverage_seconds"] = time.perf_counter() - picked
        return bank

    def _score_patches(
        self, embedding: torch.Tensor, image_scores: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw patch distances ``[B, 1, h, w]`` of patch features ``[B, D, h, w]`` and, if asked,
        the paper's image scores ``[B]``."""
        b, d, h, w = embedding.shape
        bank = self.memory_bank
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        distances, nearest = self.neighbours.search(bank, queries, k=1)
        patch_scores = distances[:, 0].reshape(b, h * w)
        if not image_scores:
            return patch_scores.reshape(b, 1, h, w), None
        top = patch_scores.argmax(1)
        scores = patch_scores.gather(1, top[:, None])[:, 0]  # s*
        k = min(self.num_neighbors, bank.shape[0])
        if self.reweight and k > 1:
            rows = top + torch.arange(b, device=top.device) * (h * w)
            worst, anchor = queries[rows], nearest[rows, 0]  # m_test, index of m*
            _, support = self.neighbours.search(bank, bank[anchor], k=k)  # N_b(m*)
            gaps = torch.linalg.vector_norm(worst[:, None, :] - bank[support], dim=-1)
            scores = scores * -torch.expm1(scores - torch.logsumexp(gaps, dim=1))
        return patch_scores.reshape(b, 1, h, w), scores

    def _map(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return gaussian_blur(upsample_map(patch_scores, size), self.blur_sigma)

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        patch_scores, _ = self._score_patches(self.patch_features(images, features), False)
        return self._map(patch_scores, tuple(images.shape[-2:]))

    def forward(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return self._answer(self.patch_features(images, features), tuple(images.shape[-2:]))

    def _answer(self, embedding: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Score and map of images of ``size`` from their patch features."""
        paper_score = self.score_aggregation == "max"
        patch_scores, scores = self._score_patches(embedding, image_scores=paper_score)
        anomaly_map = self._map(patch_scores, size)
        if scores is None:
            scores = self.compute_anomaly_score(anomaly_map)
        return {"pred_score": scores, "anomaly_map": anomaly_map}

    # The exported graph stops at the patch features: the search runs here, on the member's own
    # bank and index (exact or HNSW), and so do the reweighting, upsampling and blur.
    def graph_outputs(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        return (self.patch_features(images, features),)

    def finish_graph_outputs(
        self, outputs: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        (embedding,) = outputs
        return self._answer(embedding.to(self.memory_bank.device), size)

"""Greedy coreset subsampling (PatchCore, Roth et al. 2022, section 3.2).

The greedy rule picks, again and again, the point farthest from everything picked so far
(minimax facility location), on features reduced by a Johnson-Lindenstrauss random projection.
Exact greedy over N points costs N x M x d for M picks: for 780k patch features and a 10 %
coreset that is hours on a CPU. ``chunked`` splits the points into random chunks of at most
``chunk_size`` and runs exact greedy in each with a proportional budget: the cost falls by the
number of chunks, and since the chunks are random samples of the same distribution, each
covers the whole feature space at the same density (measured against exact greedy in the
README's PatchCore figures).
"""

from __future__ import annotations

import math

import torch

METHODS = ("greedy", "chunked")


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Features projected to ``dim`` dimensions (unchanged if they already have fewer)."""
    if features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features.device, features.dtype)


def greedy_indices(points: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` points chosen by exact greedy farthest-point selection."""
    n = points.shape[0]
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    squared = (points * points).sum(1)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = start
    nearest = squared - 2 * points @ points[start] + squared[start]
    for i in range(1, count):
        pick = int(torch.argmax(nearest))
        chosen[i] = pick
        distance = squared - 2 * points @ points[pick] + squared[pick]
        torch.minimum(nearest, distance, out=nearest)
    return chosen


def coreset_indices(
    features: torch.Tensor,
    ratio: float,
    method: str = "chunked",
    projection_dim: int = 128,
    chunk_size: int = 16384,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a ``ratio`` coreset of ``features [N, D]``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if method not in METHODS:
        raise ValueError(f"coreset method must be one of {METHODS}, got {method!r}")
    n = features.shape[0]
    if ratio == 1:
        return torch.arange(n)
    points = random_projection(features.float(), projection_dim, seed)
    if method == "greedy" or n <= chunk_size:
        return greedy_indices(points, max(1, round(n * ratio)), seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = math.ceil(n / chunk_size)
    picked = []
    for k, part in enumerate(order.tensor_split(chunks)):
        local = greedy_indices(points[part], max(1, round(len(part) * ratio)), seed + k)
        picked.append(part[local])
    return torch.cat(picked)

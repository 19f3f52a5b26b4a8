"""Greedy coreset subsampling (PatchCore, Roth et al. 2022, section 3.2).

The greedy rule picks, again and again, the point farthest from everything picked so far
(minimax facility location), on features reduced by a Johnson-Lindenstrauss random projection.

- ``greedy``: exact greedy over all N points, on the features' device. It costs N x M x d for
  M picks: for 780k patch features and a 10 % coreset that is hours on a CPU, so run it where
  the features are when that is a GPU: every step stays on the device (no host synchronisation
  per pick).
- ``chunked``: the CPU option. The points are split into random chunks of at most
  ``chunk_size`` and exact greedy runs in each with a proportional budget: the cost falls by the
  number of chunks, and since the chunks are random samples of the same distribution, each
  covers the whole feature space at about the same density.

``coverage_comparison`` measures what chunking costs on the data at hand: from one random pool of
two chunks it picks a chunked and an exact greedy coreset of the same size and reports each
one's coverage radius (PatchCore puts the figures into ``fit_stats``).
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
    """Indices (on ``points``' device) of ``count`` points chosen by exact greedy
    farthest-point selection, starting from a seeded random point."""
    n = points.shape[0]
    count = min(count, n)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    squared = (points * points).sum(1)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    chosen[0] = start
    nearest = squared - 2 * points @ points[start] + squared[start]
    for i in range(1, count):
        # index_select with a device tensor: no host round trip per pick on a GPU.
        pick = torch.argmax(nearest).view(1)
        chosen[i : i + 1] = pick
        distance = squared - 2 * (points @ points.index_select(0, pick)[0])
        distance += squared.index_select(0, pick)
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
    """Indices (on the features' device) of a ``ratio`` coreset of ``features [N, D]``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if method not in METHODS:
        raise ValueError(f"coreset method must be one of {METHODS}, got {method!r}")
    n = features.shape[0]
    if ratio == 1:
        return torch.arange(n, device=features.device)
    points = random_projection(features.float(), projection_dim, seed)
    if method == "greedy" or n <= chunk_size:
        return greedy_indices(points, max(1, round(n * ratio)), seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(features.device)
    picked = []
    for k, part in enumerate(order.tensor_split(math.ceil(n / chunk_size))):
        local = greedy_indices(points[part], max(1, round(len(part) * ratio)), seed + k)
        picked.append(part[local])
    return torch.cat(picked)


def coverage_radius(points: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> float:
    """Largest distance from a row of ``points`` to its nearest row of ``centers``."""
    radius = 0.0
    for part in points.split(chunk):
        radius = max(radius, float(torch.cdist(part, centers).amin(1).amax()))
    return radius


def coverage_comparison(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int = 128,
    chunk_size: int = 16384,
    sample: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """What the ``chunked`` approximation costs in coverage, measured fairly at bounded cost.

    A random pool of twice the full run's chunk size (``ceil(N / chunks)`` for
    ``chunks = ceil(N / chunk_size)``; the whole of ``features [N, D]`` when it holds one or two
    chunks) is drawn, and from that pool both a ``chunked`` coreset (two chunks of the full run's
    size, so each chunk is picked exactly as in the full run) and an exact ``greedy`` coreset of
    the same size are picked, with the same projection. Their coverage radii are the largest
    distance from ``sample`` random pool rows to the nearest coreset row, in the original
    feature space (the units of PatchCore's patch scores). Same points, same budget, same metric
    and chunks like the full run's: the only difference is the chunking. Cost: about six chunks'
    worth of exact greedy, whatever N.

    A full run of more than two chunks loses somewhat more than this two-chunk figure shows: on
    Gaussian-mixture features the excess radius grew about with the logarithm of the number of
    chunks (about 4 % for 2 chunks, 10 % for 8, at 2,500 points a chunk).

    Returns ``coverage_radius_chunked``, ``coverage_radius_greedy``, ``coverage_pool`` (rows
    both were picked from), ``coverage_pool_chunks`` (1 when no chunking happens, then the two
    radii are equal) and ``coverage_chunks`` (the full run's chunks).
    """
    n = features.shape[0]
    chunks = math.ceil(n / chunk_size)
    per_chunk = math.ceil(n / chunks)
    generator = torch.Generator().manual_seed(seed)
    pool = features[torch.randperm(n, generator=generator)[: 2 * per_chunk].to(features.device)]
    pool = pool.float()
    probes = pool[torch.randperm(len(pool), generator=generator)[:sample].to(features.device)]
    greedy = coreset_indices(pool, ratio, "greedy", projection_dim, per_chunk, seed)
    chunked = greedy
    if len(pool) > per_chunk:
        chunked = coreset_indices(pool, ratio, "chunked", projection_dim, per_chunk, seed)
    return {
        "coverage_radius_chunked": coverage_radius(probes, pool[chunked]),
        "coverage_radius_greedy": coverage_radius(probes, pool[greedy]),
        "coverage_pool": float(len(pool)),
        "coverage_pool_chunks": float(math.ceil(len(pool) / per_chunk)),
        "coverage_chunks": float(chunks),
    }

"""Spherical (cosine) k-means with k-means++ seeding, deterministic for a seed.

Rows are compared by cosine, so they are scaled to unit length first and a centroid is the
normalised sum of its members. Assignment runs in row chunks whose (rows, k) similarity block stays
near 64 MiB whatever k is, so a million rows of D=512 never need an (N, k) matrix. Random draws come
from a CPU ``torch.Generator``; the arithmetic runs on the input's device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipx.errors import ClipxError

# One similarity block holds at most this many float32 values (64 MiB), and never more than
# MAX_CHUNK_ROWS rows, so memory stays flat in both N and k.
BLOCK_ELEMENTS = 1 << 24
MAX_CHUNK_ROWS = 65536
# k-means++ makes one pass over its points per centre: over a pool of a million rows with a
# thousand clusters that outweighs the iterations. It seeds from a seeded sample of this many rows
# per centre instead (faiss trains its k-means on 256 per centre); the iterations then use every row.
SEEDING_ROWS_PER_CENTRE = 64


def unit_rows(x: torch.Tensor, where: str) -> torch.Tensor:
    """``x`` (N, D), any float dtype, as float32 rows of unit length (zero rows stay zero). # (N, D)"""
    if x.dim() != 2:
        raise ClipxError(f"{where}: expected embeddings of shape (N, D), got shape {tuple(x.shape)}; "
                         "pass one row per sample")
    return F.normalize(x.float(), dim=1)


def chunk_rows(columns: int) -> int:
    """How many rows of a (rows, columns) float32 block fit the block budget."""
    return max(1, min(MAX_CHUNK_ROWS, BLOCK_ELEMENTS // max(1, columns)))


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label (N,) int64, cosine to that centroid (N,) float32) of unit ``points`` (N, D) against unit
    ``centroids`` (k, D), in row chunks; ties go to the lower centroid index."""
    n = points.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=points.device)
    best = torch.empty(n, dtype=torch.float32, device=points.device)
    rows = chunk_rows(centroids.shape[0])
    for start in range(0, n, rows):
        best[start:start + rows], labels[start:start + rows] = (points[start:start + rows] @ centroids.T).max(dim=1)
    return labels, best


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional to
    the squared distance to the nearest centre so far (2 - 2 cos for unit rows). # (k, D)"""
    n = points.shape[0]
    taken = torch.zeros(n, dtype=torch.bool, device=points.device)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = points @ points[chosen[0]]  # (N,) best cosine to any chosen centre
    taken[chosen[0]] = True
    for _ in range(1, k):
        weights = (2 - 2 * closest.double()).clamp_(min=0).masked_fill_(taken, 0)
        cumulative = weights.cumsum(0)
        draw = torch.rand((), generator=generator, dtype=torch.float64).to(points.device)
        if cumulative[-1] > 0:
            pick = int(torch.searchsorted(cumulative, draw * cumulative[-1], right=True).clamp(max=n - 1))
        else:  # every point sits on a chosen centre: take the first free one, an empty cluster to re-seed
            pick = int((~taken).nonzero()[0])
        chosen.append(pick)
        taken[pick] = True
        closest = torch.maximum(closest, points @ points[pick])
    return points[chosen].clone()


def _fill_empty(labels: torch.Tensor, best: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the point farthest from its own centroid (lowest cosine, ties by index),
    never emptying the cluster that point leaves. # (N,) int64"""
    counts = torch.bincount(labels, minlength=k).tolist()
    empty = [cluster for cluster, count in enumerate(counts) if count == 0]
    if not empty:
        return labels
    labels = labels.clone()
    # A point is skipped only when it is the last of its cluster, which happens at most k times.
    order = torch.sort(best, stable=True).indices[: len(empty) + k]
    candidates = iter(zip(order.tolist(), labels[order].tolist()))
    for cluster in empty:
        for index, owner in candidates:
            if counts[owner] > 1:
                break
        else:
            raise RuntimeError("spherical_kmeans: no point left to re-seed an empty cluster")
        counts[owner] -= 1
        counts[cluster] += 1
        labels[index] = cluster
    return labels


def _centroids(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised sum of each cluster's members. # (k, D)"""
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
    return F.normalize(sums.index_add_(0, labels, points), dim=1)


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 25) -> tuple[torch.Tensor, np.ndarray]:
    """Cosine k-means of the rows of ``x`` (N, D) into k' = min(k, N) clusters.

    Returns (centroids (k', D) float32 unit rows on x's device, labels (N,) int64 numpy): each label is
    its row's most similar centroid (ties to the lower index). Seeded by k-means++ (on a sample of
    SEEDING_ROWS_PER_CENTRE rows per centre when there are more) from
    ``torch.Generator().manual_seed(seed)``; a cluster left empty is re-seeded with the point farthest
    from its centroid; stops early when no assignment changes. Same input, seed and device -> the
    same output, bitwise (on a GPU, ``index_add_``'s atomics may reorder float sums).
    """
    points = unit_rows(x, "spherical_kmeans")
    n = points.shape[0]
    if n == 0:
        raise ClipxError("spherical_kmeans: no rows to cluster; give at least one embedding")
    if k < 1 or iterations < 0:
        raise ClipxError(f"spherical_kmeans: need k >= 1 and iterations >= 0, got k={k}, iterations={iterations}")
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    seeding = points
    if n > SEEDING_ROWS_PER_CENTRE * k:
        seeding = points[torch.randperm(n, generator=generator)[: SEEDING_ROWS_PER_CENTRE * k].to(points.device)]
    centroids = _kmeans_plus_plus(seeding, k, generator)
    labels, best = nearest_centroids(points, centroids)
    for _ in range(iterations):
        labels = _fill_empty(labels, best, k)
        centroids = _centroids(points, labels, k)
        new_labels, best = nearest_centroids(points, centroids)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels.cpu().numpy().astype(np.int64)

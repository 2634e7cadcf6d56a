"""Duplicate removal: exact (by content hash) and semantic (SemDeDup, Abbas et al. 2023)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from clipx.curation.kmeans import BLOCK_ELEMENTS, spherical_kmeans, unit_rows
from clipx.errors import ClipxError


def exact_duplicates(hashes: Sequence[Optional[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(keep (N,) bool, duplicate_of (N,) int64): the first sample with a hash is kept, each later one
    dropped with duplicate_of the index of that first one (-1 for kept samples). A sample whose hash
    is None (unknown) is always kept."""
    keep = np.ones(len(hashes), dtype=bool)
    duplicate_of = np.full(len(hashes), -1, dtype=np.int64)
    first: dict[str, int] = {}
    for index, digest in enumerate(hashes):
        if digest is None:
            continue
        seen = first.setdefault(digest, index)
        if seen != index:
            keep[index] = False
            duplicate_of[index] = seen
    return keep, duplicate_of


def _earlier_match(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row j of unit ``members`` (C, D), in order: (its highest cosine to a row before it, that
    row's position), -inf and 0 for the first. Row chunks keep each block near BLOCK_ELEMENTS. # (C,), (C,)"""
    count = members.shape[0]
    best = torch.empty(count, dtype=torch.float32, device=members.device)
    where = torch.empty(count, dtype=torch.int64, device=members.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, count))
    for start in range(0, count, rows):
        stop = min(count, start + rows)
        block = members[start:stop] @ members[:stop].T  # only rows before stop can come earlier
        positions = torch.arange(stop, device=members.device)
        later = positions[None, :] >= positions[start:stop, None]
        best[start:stop], where[start:stop] = block.masked_fill_(later, float("-inf")).max(dim=1)
    return best, where


def semantic_duplicates(embeddings: torch.Tensor, threshold: float, clusters: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup on ``embeddings`` (N, D): (keep (N,) bool, duplicate_of (N,) int64, -1 for kept).

    Spherical k-means into ``clusters``; within each cluster the members are ordered by cosine to
    their centroid, least similar first (ties by index), and a member is dropped when its highest
    cosine to any member before it in that order exceeds ``threshold`` (the paper's
    ``triu(S, 1).max(dim=0) > 1 - eps``, eps = 1 - threshold). So of each group of near-duplicates the
    member least similar to the centroid survives, as the paper keeps. ``duplicate_of`` is that most
    similar earlier member (which may itself be dropped: every earlier member counts, as in the
    paper). Duplicates split across two clusters are not found, as in the paper.
    """
    if not 0 < threshold <= 1:
        raise ClipxError(f"semantic_duplicates: threshold must be a cosine in (0, 1], got {threshold}; "
                         "e.g. 0.95 drops pairs more similar than that")
    points = unit_rows(embeddings, "semantic_duplicates")
    keep = np.ones(points.shape[0], dtype=bool)
    duplicate_of = np.full(points.shape[0], -1, dtype=np.int64)
    if points.shape[0] == 0:
        return keep, duplicate_of
    centroids, labels = spherical_kmeans(points, clusters, seed)
    by_cluster = np.argsort(labels, kind="stable")  # members of each cluster, in index order
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=centroids.shape[0]))])
    for cluster in range(centroids.shape[0]):
        members = torch.from_numpy(by_cluster[bounds[cluster]:bounds[cluster + 1]]).to(points.device)
        if len(members) < 2:
            continue
        to_centroid = points[members] @ centroids[cluster]
        ordered = members[torch.sort(to_centroid, stable=True).indices]
        best, where = _earlier_match(points[ordered])
        dropped = best > threshold
        ordered_np, where_np, dropped_np = ordered.cpu().numpy(), where.cpu().numpy(), dropped.cpu().numpy()
        keep[ordered_np[dropped_np]] = False
        duplicate_of[ordered_np[dropped_np]] = ordered_np[where_np[dropped_np]]
    return keep, duplicate_of

"""Score filters of DataComp's baselines (Gadre et al. 2023): CLIP score, top fraction, Otsu's automatic
threshold, and the image-based filter (keep the pool's clusters that a target set's images fall in)."""

from __future__ import annotations

import numpy as np
import torch

from clipx.curation.kmeans import chunk_rows, spherical_kmeans, unit_rows
from clipx.errors import ClipxError


def clip_scores(image: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Cosine of each (image, text) pair: ``image`` (N, D), ``text`` (N, D) -> (N,) float32."""
    images, texts = unit_rows(image, "clip_scores: image"), unit_rows(text, "clip_scores: text")
    if images.shape != texts.shape:
        raise ClipxError(f"clip_scores: image embeddings {tuple(images.shape)} and text embeddings "
                         f"{tuple(texts.shape)} differ in shape; pass one (image, text) pair per row")
    return (images * texts).sum(dim=1).cpu().numpy().astype(np.float32)


def keep_above(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Keep mask (N,) bool: score >= threshold; a NaN score is never kept."""
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, dtype=np.float64) >= threshold


def keep_top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Keep mask (N,) bool of the ``round(fraction * V)`` highest scores, V the number of non-NaN scores
    (Python's ``round``, halves to even). Equal scores rank by lower index first; NaN is never kept."""
    if not 0 < fraction <= 1:
        raise ClipxError(f"keep_top_fraction: fraction must be in (0, 1], got {fraction}; "
                         "e.g. 0.3 keeps the top 30% of the scores")
    values = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(values))
    count = round(fraction * len(valid))
    # A stable sort of the negated scores puts the highest first and keeps index order among ties.
    ranked = valid[np.argsort(-values[valid], kind="stable")]
    keep = np.zeros(len(values), dtype=bool)
    keep[ranked[:count]] = True
    return keep


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the non-NaN scores: the histogram split that maximises the between-class
    variance, as the value where the upper class starts (use with ``keep_above``).

    When several splits tie (empty bins between two clumps), the threshold is the middle of the
    first tied run, so it lands in the middle of the gap rather than at its lower end.
    """
    values = np.asarray(scores, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        raise ClipxError("otsu_threshold: every score is NaN; there is nothing to threshold")
    if bins < 2:
        raise ClipxError(f"otsu_threshold: bins must be at least 2, got {bins}")
    low, high = float(values.min()), float(values.max())
    if low == high:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centers = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1].astype(np.float64)  # split after bin t: bins 0..t below
    above = len(values) - below
    mass_below = np.cumsum(counts * centers)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_gap = mass_below / below - (np.sum(counts * centers) - mass_below) / above
        between = np.where((below > 0) & (above > 0), below * above * mean_gap ** 2, -1.0)
    best = int(np.argmax(between))
    last = best
    while last + 1 < len(between) and between[last + 1] == between[best]:
        last += 1
    return float((edges[best + 1] + edges[last + 1]) / 2)


def image_based_filter(pool: torch.Tensor, target: torch.Tensor, clusters: int, seed: int,
                       nearest: int = 1) -> np.ndarray:
    """DataComp's image-based filter: cluster the ``pool`` image embeddings (N, D) with spherical
    k-means into ``clusters``; every ``target`` image (M, D) votes for its ``nearest`` most similar
    centroids; a pool sample is kept when its cluster got a vote. Returns the keep mask (N,) bool."""
    if nearest < 1:
        raise ClipxError(f"image_based_filter: nearest must be at least 1, got {nearest}")
    targets = unit_rows(target, "image_based_filter: target")
    if targets.shape[1] != pool.shape[-1]:
        raise ClipxError(f"image_based_filter: target embeddings have {targets.shape[1]} dimensions but the pool's "
                         f"have {pool.shape[-1]}; embed both with the same model")
    centroids, labels = spherical_kmeans(pool, clusters, seed)
    nearest = min(nearest, centroids.shape[0])
    voted = torch.zeros(centroids.shape[0], dtype=torch.bool, device=centroids.device)
    rows = chunk_rows(centroids.shape[0])
    for start in range(0, targets.shape[0], rows):
        similarity = targets[start:start + rows].to(centroids.device) @ centroids.T
        # argmax for one vote: its ties go to the lower centroid index, topk's are unspecified.
        picked = similarity.argmax(dim=1) if nearest == 1 else similarity.topk(nearest, dim=1).indices.flatten()
        voted[picked] = True
    return voted.cpu().numpy()[labels]

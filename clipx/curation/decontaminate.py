"""Decontamination: find training samples that nearly copy an evaluation sample, by embedding cosine."""

from __future__ import annotations

import numpy as np
import torch

from clipx.curation.kmeans import BLOCK_ELEMENTS, unit_rows
from clipx.errors import ClipxError


def near_duplicates_of(train: torch.Tensor, reference: torch.Tensor, threshold: float,
                       chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of ``train`` (N, D), its highest cosine to any row of ``reference`` (M, D) (the
    evaluation set) and which row that is (the lower index on ties).

    Returns (contaminated (N,) bool = similarity >= threshold, nearest (N,) int64, similarity (N,)
    float32). Runs over ``chunk`` training rows at a time, and over the reference in column blocks
    when M is large, so no (N, M) matrix is formed.
    """
    if chunk < 1:
        raise ClipxError(f"near_duplicates_of: chunk must be at least 1 row, got {chunk}")
    rows, columns = unit_rows(train, "near_duplicates_of: train"), unit_rows(reference, "near_duplicates_of: reference")
    if columns.shape[0] == 0:
        raise ClipxError("near_duplicates_of: the reference (evaluation) set is empty; give it at least one embedding")
    if rows.shape[1] != columns.shape[1]:
        raise ClipxError(f"near_duplicates_of: train embeddings have {rows.shape[1]} dimensions but the reference's "
                         f"have {columns.shape[1]}; embed both with the same model")
    columns = columns.to(rows.device)
    similarity = torch.full((rows.shape[0],), float("-inf"), device=rows.device)
    nearest = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    width = max(1, BLOCK_ELEMENTS // chunk)
    for start in range(0, rows.shape[0], chunk):
        stop = min(rows.shape[0], start + chunk)
        for left in range(0, columns.shape[0], width):
            best, where = (rows[start:stop] @ columns[left:left + width].T).max(dim=1)
            better = best > similarity[start:stop]  # strict: an earlier block wins ties
            similarity[start:stop] = torch.where(better, best, similarity[start:stop])
            nearest[start:stop] = torch.where(better, where + left, nearest[start:stop])
    scores = similarity.cpu().numpy().astype(np.float32)
    return scores >= threshold, nearest.cpu().numpy(), scores

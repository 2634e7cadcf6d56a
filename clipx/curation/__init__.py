"""The pure stages of ``clipx curate``: functions of embeddings, hashes and captions already in memory
(numpy and torch only, no files), deterministic for a seed. The command reads shards, calls these and
writes the sidecars.

- ``kmeans``: spherical k-means (k-means++ seeding, chunked assignment), shared by the others.
- ``filtering``: DataComp's CLIP-score filters (threshold, top fraction, Otsu) and image-based filter.
- ``dedup``: exact duplicates by hash, semantic duplicates (SemDeDup).
- ``balance``: MetaCLIP's entry matching and per-entry cap t.
- ``decontaminate``: training samples that nearly copy an evaluation sample.
"""

from clipx.curation.balance import BalanceResult, balance, default_entries, match_entries, read_entries
from clipx.curation.decontaminate import near_duplicates_of
from clipx.curation.dedup import exact_duplicates, semantic_duplicates
from clipx.curation.filtering import clip_scores, image_based_filter, keep_above, keep_top_fraction, otsu_threshold
from clipx.curation.kmeans import spherical_kmeans

__all__ = [
    "BalanceResult", "balance", "clip_scores", "default_entries", "exact_duplicates", "image_based_filter",
    "keep_above", "keep_top_fraction", "match_entries", "near_duplicates_of", "otsu_threshold", "read_entries",
    "semantic_duplicates", "spherical_kmeans",
]

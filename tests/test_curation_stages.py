"""The pure curation stages (clipx/curation/) on hand-made cases with known answers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipx.curation import (
    balance,
    clip_scores,
    default_entries,
    exact_duplicates,
    image_based_filter,
    keep_above,
    keep_top_fraction,
    match_entries,
    near_duplicates_of,
    otsu_threshold,
    read_entries,
    semantic_duplicates,
    spherical_kmeans,
)
from clipx.curation import decontaminate as decontaminate_module
from clipx.curation import dedup as dedup_module
from clipx.curation import kmeans as kmeans_module
from clipx.errors import ClipxError


def blobs(per_blob=30, dim=8, noise=0.05, seed=0):
    """Three tight blobs around the first three axes: (points (3 * per_blob, dim), blob label of each)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3]
    points = centres.repeat_interleave(per_blob, dim=0) + noise * torch.randn(3 * per_blob, dim, generator=generator)
    return points, np.repeat(np.arange(3), per_blob)


def same_partition(labels, truth):
    """Labels equal the truth up to renaming the clusters."""
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len({a for a, _ in pairs})


# ---- k-means

@pytest.mark.parametrize("block", [kmeans_module.BLOCK_ELEMENTS, 2])  # 2: one row per assignment chunk
def test_kmeans_finds_three_separated_blobs(monkeypatch, block):
    monkeypatch.setattr(kmeans_module, "BLOCK_ELEMENTS", block)
    points, truth = blobs()
    centroids, labels = spherical_kmeans(points.to(torch.bfloat16), k=3, seed=1)
    assert centroids.shape == (3, 8) and centroids.dtype == torch.float32
    assert labels.dtype == np.int64 and same_partition(labels, truth)
    for cluster in range(3):  # each centroid sits on its blob's axis
        blob = int(truth[labels == cluster][0])
        assert centroids[cluster, blob] > 0.99


def test_kmeans_seeded_from_a_sample_still_finds_the_blobs(monkeypatch):
    monkeypatch.setattr(kmeans_module, "SEEDING_ROWS_PER_CENTRE", 4)  # 12 of the 300 rows seed it
    drawn = []
    seeding = kmeans_module._kmeans_plus_plus
    monkeypatch.setattr(kmeans_module, "_kmeans_plus_plus", lambda rows, k, g: drawn.append(len(rows)) or seeding(rows, k, g))
    points, truth = blobs(per_blob=100)
    _, labels = spherical_kmeans(points, k=3, seed=2)
    assert drawn == [12] and same_partition(labels, truth)


def test_kmeans_is_bitwise_repeatable_for_a_seed():
    points = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    first, second = spherical_kmeans(points, 7, seed=5), spherical_kmeans(points, 7, seed=5)
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    other = spherical_kmeans(points, 7, seed=6)
    assert not torch.equal(first[0], other[0])


def test_kmeans_clips_k_to_the_number_of_rows():
    points = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    centroids, labels = spherical_kmeans(points, k=10, seed=0)
    assert centroids.shape == (4, 3)
    assert sorted(labels.tolist()) == [0, 1, 2, 3]  # four distinct points, four clusters: one each
    with pytest.raises(ClipxError):
        spherical_kmeans(points, k=0, seed=0)
    with pytest.raises(ClipxError):
        spherical_kmeans(torch.zeros(0, 3), k=2, seed=0)


def test_an_empty_cluster_takes_the_farthest_point_that_is_not_alone():
    labels = torch.tensor([0, 0, 0, 1])
    best = torch.tensor([0.9, 0.5, 0.7, 1.0])
    assert kmeans_module._fill_empty(labels, best, 3).tolist() == [0, 2, 0, 1]
    # The farthest point (index 2) is its cluster's only member, so the next farthest moves.
    labels, best = torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.8, 0.1])
    assert kmeans_module._fill_empty(labels, best, 3).tolist() == [0, 2, 1]


# ---- score filters

def test_clip_scores_are_the_cosine_of_each_pair():
    image = torch.tensor([[1.0, 0], [0, 2.0], [3.0, 4.0]])
    text = torch.tensor([[2.0, 0], [1.0, 1.0], [4.0, -3.0]])
    scores = clip_scores(image, text.half())
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.0, 1 / math.sqrt(2), 0.0], atol=1e-3)
    with pytest.raises(ClipxError):
        clip_scores(image, text[:2])


def test_keep_above_never_keeps_nan():
    assert keep_above(np.array([0.1, np.nan, 0.3, 0.2]), 0.2).tolist() == [False, False, True, True]


def test_top_fraction_keeps_exact_indices_with_ties_by_lower_index():
    scores = np.array([0.5, np.nan, 0.9, 0.5, 0.1, 0.5, np.nan, 0.7], dtype=np.float32)
    assert np.flatnonzero(keep_top_fraction(scores, 0.5)).tolist() == [0, 2, 7]  # 3 of 6; 0.5 tie -> index 0
    assert np.flatnonzero(keep_top_fraction(scores, 0.66)).tolist() == [0, 2, 3, 7]  # round(3.96) = 4
    assert np.flatnonzero(keep_top_fraction(scores, 1.0)).tolist() == [0, 2, 3, 4, 5, 7]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ClipxError):
            keep_top_fraction(scores, bad)


def test_otsu_splits_two_clumps_in_the_gap():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.10, 0.01, 300), rng.normal(0.30, 0.01, 100)
    scores = np.concatenate([low, [np.nan], high, [np.nan]])
    threshold = otsu_threshold(scores)
    assert low.max() < threshold < high.min()
    assert abs(threshold - (low.max() + high.min()) / 2) < 0.01  # the middle of the gap, not an edge
    assert np.flatnonzero(keep_above(scores, threshold)).tolist() == list(range(301, 401))
    assert otsu_threshold(np.array([0.25, 0.25, np.nan])) == 0.25
    with pytest.raises(ClipxError):
        otsu_threshold(np.array([np.nan]))


def test_image_based_filter_keeps_the_clusters_the_targets_fall_in():
    pool, truth = blobs()
    near_b = torch.eye(8)[1] + 0.05 * torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    assert np.flatnonzero(image_based_filter(pool, near_b, clusters=3, seed=0)).tolist() == list(range(30, 60))
    # Between B and C, nearer B: one vote keeps B, two votes keep B and C.
    between = F.normalize(torch.eye(8)[1] + 0.5 * torch.eye(8)[2], dim=0)[None]
    assert np.array_equal(image_based_filter(pool, between, 3, seed=0), truth == 1)
    assert np.array_equal(image_based_filter(pool, between, 3, seed=0, nearest=2), truth >= 1)
    with pytest.raises(ClipxError):
        image_based_filter(pool, torch.randn(2, 5), 3, seed=0)


# ---- deduplication

def test_exact_duplicates_point_at_the_first_occurrence():
    keep, duplicate_of = exact_duplicates(["a", "b", "a", None, "b", None])
    assert keep.tolist() == [True, True, False, True, False, True]
    assert duplicate_of.dtype == np.int64 and duplicate_of.tolist() == [-1, -1, 0, -1, 1, -1]


def planted_copies():
    """Ten far-apart unit vectors, then two jittered copies of #3 and one of #7 (cosine > 0.99)."""
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(10, 64, generator=generator), dim=1)
    copies = base[[3, 3, 7]] + 0.01 * torch.randn(3, 64, generator=generator)
    return torch.cat([base, copies]), [{3, 10, 11}, {7, 12}]


@pytest.mark.parametrize("block", [dedup_module.BLOCK_ELEMENTS, 3])  # 3: one row per block
def test_semdedup_drops_all_but_one_of_each_group(monkeypatch, block):
    monkeypatch.setattr(dedup_module, "BLOCK_ELEMENTS", block)
    points, groups = planted_copies()
    keep, duplicate_of = semantic_duplicates(points, threshold=0.95, clusters=4, seed=0)
    dropped = set(np.flatnonzero(~keep).tolist())
    assert len(dropped) == 3 and dropped <= groups[0] | groups[1]
    for group in groups:
        assert len(group - dropped) == 1
        for index in group & dropped:
            assert int(duplicate_of[index]) in group - {index}
    assert (duplicate_of[keep] == -1).all()
    keep, duplicate_of = semantic_duplicates(points, threshold=0.999, clusters=4, seed=0)
    assert keep.all() and (duplicate_of == -1).all()


def test_semdedup_keeps_the_member_least_similar_to_the_centroid():
    # One cluster, centroid ~ (2, 1.05, 0): p0 leans towards it more than its near-copy p1 does,
    # so the order is p2, p1, p0 and p0 (cosine 0.9988 to p1) is the one dropped.
    points = torch.tensor([[1.0, 0.05, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    keep, duplicate_of = semantic_duplicates(points, threshold=0.99, clusters=1, seed=0)
    assert keep.tolist() == [False, True, True] and duplicate_of.tolist() == [1, -1, -1]
    for bad in (0.0, 1.01):
        with pytest.raises(ClipxError):
            semantic_duplicates(points, threshold=bad, clusters=1, seed=0)


# ---- MetaCLIP balancing

def test_entries_match_at_word_boundaries_once_per_caption():
    entries = ["one", "new york", "york", "city", "new-york"]
    captions = ["Someone said one, one thing", "New York City!", None, "", "york-city", "newyork"]
    found = [m.tolist() for m in match_entries(captions, entries)]
    assert found == [[0], [1, 2, 3, 4], [], [], [2, 3], []]
    assert all(m.dtype == np.int32 for m in match_entries(captions, entries))


def test_entry_lists():
    assert read_entries("# concepts\n\n  Dog \ncat\ndog\n#skip\n") == ["dog", "cat"]
    with pytest.raises(ClipxError):
        read_entries("# only a comment\n\n")
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert default_entries(("digits", "digits")) == digits
    both = default_entries()
    assert both[:10] == digits and len(both) == len(set(both)) > 900 and all(e == e.lower() for e in both)


def skewed(head=500, tail=10, tails=4):
    """Entry 0 matched by ``head`` single-entry captions, entries 1.. by ``tail`` each."""
    return [np.array([0])] * head + [np.array([e]) for e in range(1, tails + 1) for _ in range(tail)]


def test_balance_caps_a_head_entry_at_exactly_t():
    result = balance(skewed(), num_entries=5, t=20, seed=0)
    assert result.counts_before.tolist() == [500, 10, 10, 10, 10]
    assert result.counts_after.tolist() == [20, 10, 10, 10, 10]
    assert result.keep[500:].all() and result.keep[:500].sum() == 20
    np.testing.assert_allclose(result.probability, [20 / 500] * 500 + [1.0] * 40)
    again, other = balance(skewed(), 5, 20, seed=0), balance(skewed(), 5, 20, seed=1)
    assert np.array_equal(result.keep, again.keep)
    assert not np.array_equal(result.keep[:500], other.keep[:500]) and other.keep[:500].sum() == 20


def overlapping():
    """Entry 0: 100 samples, entry 1: 40, sample 0 in both; then one unmatched sample."""
    return [np.array([0, 1])] + [np.array([0])] * 99 + [np.array([1])] * 39 + [np.zeros(0, dtype=np.int32)]


def test_balance_probability_of_an_overlapping_sample():
    dropped = balance(overlapping(), 2, t=20, seed=0)
    assert dropped.counts_before.tolist() == [100, 40]
    assert dropped.probability[0] == pytest.approx(1 - (1 - 0.2) * (1 - 0.5))
    assert dropped.probability[1] == pytest.approx(0.2) and dropped.probability[100] == pytest.approx(0.5)
    assert dropped.probability[-1] == 0.0 and not dropped.keep[-1]
    kept = balance(overlapping(), 2, t=20, seed=0, unmatched="keep")
    assert kept.probability[-1] == 1.0 and kept.keep[-1]
    assert np.array_equal(kept.keep[:-1], dropped.keep[:-1])


def test_balance_keeps_an_overlapping_sample_at_metaclips_rate():
    matches, seeds = overlapping(), 300
    hits = sum(bool(balance(matches, 2, t=20, seed=seed).keep[0]) for seed in range(seeds))
    expected = 1 - (1 - 0.2) * (1 - 0.5)
    assert abs(hits / seeds - expected) < 3 * math.sqrt(expected * (1 - expected) / seeds)


def test_balance_refuses_bad_arguments():
    for kwargs in ({"t": 0}, {"unmatched": "maybe"}, {"num_entries": 1}):
        arguments = {"num_entries": 2, "t": 20, "seed": 0, **kwargs}
        with pytest.raises(ClipxError):
            balance(overlapping(), **arguments)


# ---- decontamination

@pytest.mark.parametrize("block", [decontaminate_module.BLOCK_ELEMENTS, 2])  # 2 with chunk 2: one column
def test_near_duplicates_of_flags_the_planted_copy(monkeypatch, block):
    monkeypatch.setattr(decontaminate_module, "BLOCK_ELEMENTS", block)
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(5, 32, generator=generator)
    reference[3] = reference[1]  # two equal rows: the lower index is the nearest
    train = torch.randn(7, 32, generator=generator)
    train[4] = 3 * reference[2] + 0.01 * torch.randn(32, generator=generator)
    train[6] = reference[3]
    contaminated, nearest, similarity = near_duplicates_of(train, reference, threshold=0.95, chunk=2)
    assert np.flatnonzero(contaminated).tolist() == [4, 6]
    assert nearest[4] == 2 and nearest[6] == 1 and similarity.dtype == np.float32
    a, b = train.numpy(), reference.numpy()
    cosine = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(similarity, cosine.max(axis=1), atol=1e-5)
    assert nearest[[0, 1, 2, 3, 5]].tolist() == cosine.argmax(axis=1)[[0, 1, 2, 3, 5]].tolist()
    with pytest.raises(ClipxError):
        near_duplicates_of(train, reference[:, :4], threshold=0.9)

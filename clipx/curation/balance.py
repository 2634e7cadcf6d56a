"""MetaCLIP's balancing (Xu et al. 2023, "Demystifying CLIP data"): match captions against a list of
entries (concepts), then cap every entry at t samples so head concepts stop drowning tail ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from clipx.errors import ClipxError
from clipx.templates import load_templates

UNMATCHED = ("drop", "keep")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def default_entries(template_sets: Sequence[str] = ("digits", "imagenet")) -> list[str]:
    """The class names of clipx's shipped template sets, lower-cased, without repeats, in first-seen order."""
    return _unique(name.strip().lower() for template_set in template_sets
                   for name in load_templates(template_set)[0])


def read_entries(text: str) -> list[str]:
    """Entries from a text file's contents: one per non-blank line, stripped and lower-cased, repeats
    dropped, lines starting with '#' ignored."""
    lines = (line.strip().lower() for line in text.splitlines())
    entries = _unique(line for line in lines if line and not line.startswith("#"))
    if not entries:
        raise ClipxError("the entries file lists no entries; write one entry (a word or phrase) per line")
    return entries


def match_entries(captions: Sequence[Optional[str]], entries: Sequence[str]) -> list[np.ndarray]:
    """Per caption, the sorted int32 ids (positions in ``entries``) of the entries it contains.

    Unlike MetaCLIP, which matches substrings, entries match at word boundaries ("one" does not match
    "someone"): caption and entries are lower-cased and split into words with ``\\w+``, and every word
    n-gram of the caption, up to the longest entry's word count, is looked up. An entry counts once
    per caption; a None caption matches nothing; an entry with no word characters never matches.
    """
    ids: dict[str, list[int]] = {}
    prefixes: set[str] = set()
    for entry_id, entry in enumerate(entries):
        words = _words(entry)
        if words:
            ids.setdefault(" ".join(words), []).append(entry_id)
            prefixes.update(" ".join(words[:n]) for n in range(1, len(words) + 1))
    empty = np.zeros(0, dtype=np.int32)
    return [_caption_matches(caption, ids, prefixes) if caption else empty for caption in captions]


def _caption_matches(caption: str, ids: dict[str, list[int]], prefixes: set[str]) -> np.ndarray:
    words, found = _words(caption), set[int]()
    for start in range(len(words)):
        key = words[start]
        for stop in range(start + 1, len(words) + 1):
            if stop > start + 1:
                key = f"{key} {words[stop - 1]}"
            if key not in prefixes:  # no entry continues this n-gram: longer ones cannot match either
                break
            found.update(ids.get(key, ()))
    return np.array(sorted(found), dtype=np.int32)


@dataclass(frozen=True)
class BalanceResult:
    """What ``balance`` decided: ``keep`` (N,) bool, ``counts_before`` and ``counts_after`` (E,) int64
    (samples matching each entry before and after), ``probability`` (N,) float64 (MetaCLIP's keep
    probability of each sample)."""

    keep: np.ndarray
    counts_before: np.ndarray
    counts_after: np.ndarray
    probability: np.ndarray


def _pairs(matches: Sequence[np.ndarray], num_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample, entry) pairs, each once, sorted by entry then sample. # (L,), (L,)"""
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    entries = np.concatenate([np.asarray(m, dtype=np.int64).ravel() for m in matches] + [np.zeros(0, np.int64)])
    outside = entries[(entries < 0) | (entries >= num_entries)]
    if len(outside):
        raise ClipxError(f"balance: a match names entry {int(outside[0])}, outside 0..{num_entries - 1}; "
                         "pass num_entries = the length of the entry list the matches came from")
    samples = np.repeat(np.arange(len(matches), dtype=np.int64), lengths)
    width = max(1, len(matches))
    pairs = np.unique(entries * width + samples)  # drops repeats, sorts by entry, then sample
    return pairs // width, pairs % width


def balance(matches: Sequence[np.ndarray], num_entries: int, t: int, seed: int,
            unmatched: str = "drop") -> BalanceResult:
    """MetaCLIP's balancing of N samples matched to E = ``num_entries`` entries, at most ``t`` per entry.

    MetaCLIP keeps sample i with probability 1 - prod over its entries e of (1 - p_e),
    p_e = min(1, t / counts_before[e]) (``probability``). Here the draws are exact instead of one coin
    per sample: each entry with more than t samples draws exactly t of them without replacement
    (``np.random.default_rng([seed, e])``), an entry with t or fewer takes all of its own, and a
    sample is kept when any of its entries drew it. Each sample's chance of being kept is MetaCLIP's
    formula exactly, and an entry that shares no sample with another ends with exactly t.
    ``counts_after[e]`` can still exceed t, through samples that another, overlapping entry drew.

    ``unmatched``: samples matching no entry are dropped ("drop", MetaCLIP's pool holds only matched
    texts; probability 0) or kept ("keep"; probability 1). Same inputs and seed -> the same ``keep``.
    """
    if unmatched not in UNMATCHED:
        raise ClipxError(f"balance: unmatched must be one of {', '.join(UNMATCHED)}, got {unmatched!r}")
    if t < 1 or seed < 0 or num_entries < 0:
        raise ClipxError(f"balance: need t >= 1, seed >= 0 and num_entries >= 0, got t={t}, seed={seed}, "
                         f"num_entries={num_entries}")
    entries, samples = _pairs(matches, num_entries)
    counts_before = np.bincount(entries, minlength=num_entries).astype(np.int64)
    chance = np.minimum(1.0, t / np.maximum(counts_before, 1))  # p_e
    missed = np.ones(len(matches))
    np.multiply.at(missed, samples, 1.0 - chance[entries])
    matched = np.bincount(samples, minlength=len(matches)) > 0
    probability = np.where(matched, 1.0 - missed, 1.0 if unmatched == "keep" else 0.0)
    keep = np.zeros(len(matches), dtype=bool)
    keep[samples[counts_before[entries] <= t]] = True
    starts = np.concatenate([[0], np.cumsum(counts_before)])
    for entry in np.flatnonzero(counts_before > t):
        drawn = np.random.default_rng([seed, int(entry)]).choice(counts_before[entry], size=t, replace=False)
        keep[samples[starts[entry] + drawn]] = True
    if unmatched == "keep":
        keep |= ~matched
    counts_after = np.bincount(entries[keep[samples]], minlength=num_entries).astype(np.int64)
    return BalanceResult(keep=keep, counts_before=counts_before, counts_after=counts_after, probability=probability)

"""Sentence-embedding evaluators: semantic textual similarity (STS) and text-to-text retrieval.

Pure functions of an ``encode`` callable, so they serve any text encoder (a SimCSE-trained text
tower, a CLIP text tower, a test's lookup table) and never import clipx's models:

    encode(sentences: list[str]) -> torch.Tensor  # (N, D) float32 on the CPU, rows unit norm

Inputs are tab-separated files:

- STS (``read_sts_tsv``): ``sentence1<TAB>sentence2<TAB>score`` with gold scores on any numeric
  scale (STS-benchmark's 0-5, or ``clipx prep sentences``' 0/1); an optional header line.
  ``sts_metrics`` reports the Spearman correlation of cosine similarity with the gold score (the
  headline number, as in SentEval and the STS benchmarks: only the order of the scores counts) and
  the Pearson correlation.
- Retrieval (``read_pairs_tsv``): ``query<TAB>positive``; ``text_retrieval_metrics`` reports
  Recall@k both ways, each query against every distinct positive text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clipx.errors import ClipxError
from eval.metrics import retrieval_metrics

Encode = Callable[[list[str]], torch.Tensor]
PAIRS_HEADER = ("query", "positive")


def read_sts_tsv(path: str | Path) -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, gold score) rows of an STS file; a first line whose score field is not a
    number is a header and is skipped, blank lines too. Any problem is a one-line ClipxError."""
    rows = []
    for position, (number, fields) in enumerate(_tsv_lines(path, 3)):
        score = _number(fields[2])
        if score is None and position == 0:
            continue  # the header
        if score is None:
            raise ClipxError(f"{path} line {number}: score {fields[2]!r} is not a finite number")
        rows.append((fields[0], fields[1], score))
    if len(rows) < 2:
        raise ClipxError(f"{path} holds {len(rows)} sentence pair(s); a correlation needs at least 2")
    return rows


def read_pairs_tsv(path: str | Path) -> list[tuple[str, str]]:
    """(query, positive) rows of a retrieval file; a first line ``query<TAB>positive`` is a header and
    is skipped, blank lines too. A query may have only one positive text (several queries may share
    one). Any problem is a one-line ClipxError."""
    pairs: list[tuple[str, str]] = []
    seen: dict[str, tuple[str, int]] = {}
    for position, (number, fields) in enumerate(_tsv_lines(path, 2)):
        if position == 0 and tuple(fields) == PAIRS_HEADER:
            continue
        query, positive = fields
        if query in seen and seen[query][0] != positive:
            raise ClipxError(f"{path} line {number}: query {query!r} already has another positive on line "
                             f"{seen[query][1]}; give each query one positive text")
        seen.setdefault(query, (positive, number))
        pairs.append((query, positive))
    if len(pairs) < 2:
        raise ClipxError(f"{path} holds {len(pairs)} query-positive pair(s); retrieval needs at least 2")
    return pairs


def _read_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ClipxError(f"evaluation file {path} not found") from None
    except IsADirectoryError:
        raise ClipxError(f"evaluation file {path} is a folder; pass the .tsv file") from None
    except UnicodeDecodeError as error:
        raise ClipxError(f"evaluation file {path} is not UTF-8 text (byte {error.start})") from None


def _tsv_lines(path: str | Path, width: int) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of each non-blank line, each checked to hold ``width`` non-empty fields."""
    out = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != width:
            raise ClipxError(f"{path} line {number}: expected {width} tab-separated fields, found {len(fields)}")
        if not all(fields[:2]):
            raise ClipxError(f"{path} line {number}: empty sentence")
        out.append((number, fields))
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D tensors of one length; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() < 2:
        raise ValueError(f"a correlation needs at least 2 items; got {x.numel()}")
    x, y = x.double(), y.double()  # float32 sums lose digits over thousands of pairs
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("correlation inputs must be finite (NaN or inf found)")
    return x, y


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (N,), N >= 2.

    A constant side has no defined correlation; this returns 0.0 then, not NaN: an encoder that gives
    every pair the same similarity ranks nothing, "no association" is the honest score, and NaN would
    not survive a JSON report. Raises ValueError on a length mismatch, fewer than 2 items or non-finite values.
    """
    x, y = _check_pair(x, y)
    # Test constancy exactly: a float mean of equal values need not equal them, which would leave
    # rounding noise to be correlated.
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / torch.sqrt((xc @ xc) * (yc @ yc)))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor (N,), tied values sharing the mean of their positions: (N,) float64."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # last 1-based position of each distinct value
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (N,): Pearson of their average ranks (ties share a
    rank). 0.0 when a side is constant, as ``pearson``; same ValueErrors."""
    x, y = _check_pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


def encode_distinct(encode: Encode, sentences: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Embed ``sentences`` (already distinct) in batches: (N, D) float32 rows of unit norm.

    Rows are normalised again here, so cosine similarity is a dot product whatever ``encode`` returns.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = list(sentences[start:start + batch_size])
        features = torch.as_tensor(encode(batch)).detach().float().cpu()
        if features.ndim != 2 or features.shape[0] != len(batch):
            raise ValueError(f"encode must return ({len(batch)}, D) for {len(batch)} sentences; "
                             f"got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("encode returned NaN or inf embeddings (a diverged model?)")
        chunks.append(F.normalize(features, dim=1))
    return torch.cat(chunks)


def sts_metrics(encode: Encode, rows: Sequence[tuple[str, str, float]], batch_size: int = 256) -> dict:
    """{"spearman", "pearson", "pairs"}: correlation of each pair's cosine similarity with its gold score.

    rows: (sentence1, sentence2, score) as ``read_sts_tsv`` returns them, at least 2. Each distinct
    sentence is encoded once.
    """
    sentences = list(dict.fromkeys(s for row in rows for s in row[:2]))
    index = {s: i for i, s in enumerate(sentences)}
    features = encode_distinct(encode, sentences, batch_size)  # (S, D)
    first = features[[index[row[0]] for row in rows]]  # (P, D)
    second = features[[index[row[1]] for row in rows]]  # (P, D)
    predicted = (first * second).sum(dim=1)  # (P,) cosine similarity
    gold = torch.tensor([float(row[2]) for row in rows], dtype=torch.float64)  # (P,)
    return {"spearman": spearman(predicted, gold), "pearson": pearson(predicted, gold), "pairs": len(rows)}


def text_retrieval_metrics(encode: Encode, pairs: Sequence[tuple[str, str]], ks=(1, 5, 10),
                           batch_size: int = 256) -> dict:
    """Recall@k of text-to-text retrieval, both ways, over distinct texts.

    Returns {"query_to_positive": {"R@k": ...}, "positive_to_query": {...}, "queries": N, "candidates": M}
    with N distinct query texts and M distinct positive texts. Identical texts are one candidate, so
    duplicates cannot make a query ambiguous. Query->positive: a query scores a hit at k when its
    positive is among the k positives most similar to it. Positive->query: a positive scores a hit
    when any query it answers is among the k most similar queries. This is the Flickr30k protocol of
    ``eval.metrics.retrieval_metrics`` with positives as images and queries as their captions, hence
    its rule: each query has one positive text (ValueError otherwise; ``read_pairs_tsv`` checks it).
    """
    if not pairs:
        raise ValueError("text retrieval needs at least one (query, positive) pair")
    positive_of: dict[str, str] = {}
    for query, positive in pairs:
        if positive_of.setdefault(query, positive) != positive:
            raise ValueError(f"query {query!r} has two positive texts; each query needs one")
    positives = list(dict.fromkeys(positive for _, positive in pairs))
    column = {p: i for i, p in enumerate(positives)}
    queries = list(positive_of)
    target = torch.tensor([column[positive_of[q]] for q in queries], dtype=torch.long)  # (N,)
    query_features = encode_distinct(encode, queries, batch_size)  # (N, D)
    positive_features = encode_distinct(encode, positives, batch_size)  # (M, D)
    recalls = retrieval_metrics(positive_features, query_features, target, ks=ks)
    return {"query_to_positive": recalls["text_to_image"], "positive_to_query": recalls["image_to_text"],
            "queries": len(queries), "candidates": len(positives)}

"""eval.text_similarity: rank correlations, STS and text retrieval with hand-made encoders, and the
TSV readers' one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipx.errors import ClipxError
from eval.text_similarity import (
    average_ranks,
    pearson,
    read_pairs_tsv,
    read_sts_tsv,
    spearman,
    sts_metrics,
    text_retrieval_metrics,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def lookup_encoder(vectors: dict[str, list[float]], calls: list | None = None):
    """encode() over a table of hand-made vectors (deliberately not unit norm), recording each batch."""
    def encode(sentences: list[str]) -> torch.Tensor:
        if calls is not None:
            calls.append(list(sentences))
        return torch.tensor([vectors[s] for s in sentences], dtype=torch.float32)
    return encode


# --- correlations -------------------------------------------------------------------------------

def test_pearson_hand_computed():
    # x centred (-1.5, -.5, .5, 1.5), y centred (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert pearson(t([1, 2, 3, 4]), t([2, 4, 5, 9])) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    assert pearson(t([1, 2, 3]), t([6, 4, 2])) == pytest.approx(-1.0, abs=1e-12)


def test_average_ranks_share_tied_positions():
    assert average_ranks(t([3, 1, 3, 2, 3])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert average_ranks(t([0.5, 0.5])).tolist() == [1.5, 1.5]


def test_spearman_hand_computed_with_ties():
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman(t([1, 2, 2, 3]), t([1, 3, 2, 4])) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # only the order counts: any increasing map gives 1, a decreasing one -1
    x = t([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(x, x.exp() * 7) == pytest.approx(1.0)
    assert spearman(x, -(x ** 3)) == pytest.approx(-1.0)
    # without ties, the textbook 1 - 6 sum d^2 / (n (n^2 - 1)): d = (0, 1, 1, 0) -> 0.8
    assert spearman(t([4, 3, 2, 1]), t([4, 2, 3, 1])) == pytest.approx(0.8, abs=1e-12)


def test_correlations_match_scipy_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, size=40).astype(np.float32)  # heavy ties, like 0-5 STS gold scores
        y = (x + rng.normal(0, 2, size=40)).astype(np.float32)
        assert spearman(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
            stats.spearmanr(x, y).statistic, abs=1e-6)
        assert pearson(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
            stats.pearsonr(x, y).statistic, abs=1e-6)


def test_constant_side_scores_zero_not_nan():
    # 0.1 three times: a float mean need not equal 0.1 exactly, which must not leave noise to correlate
    assert pearson(t([0.1, 0.1, 0.1]), t([1, 2, 3])) == 0.0
    assert spearman(t([1, 2, 3]), t([7, 7, 7])) == 0.0


@pytest.mark.parametrize("x, y", [([1, 2, 3], [1, 2]), ([1], [1]), ([[1, 2], [3, 4]], [[1, 2], [3, 4]]),
                                  ([1, float("nan"), 3], [1, 2, 3])])
def test_correlations_reject_bad_input(x, y):
    for function in (pearson, spearman):
        with pytest.raises(ValueError):
            function(t(x), t(y))


# --- STS ----------------------------------------------------------------------------------------

def unit(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


def test_sts_metrics_known_correlation_and_each_sentence_encoded_once():
    # cosines of the pairs: 1, cos 30, cos 60, 0; gold swaps the middle two -> Spearman 0.8
    vectors = {"a": unit(0, 3.0), "a twin": unit(0), "b": unit(30, 2.0), "c": unit(60), "d": unit(90, 0.5)}
    rows = [("a", "a twin", 5.0), ("a", "b", 3.0), ("a", "c", 4.0), ("d", "a", 0.0)]
    calls: list = []
    metrics = sts_metrics(lookup_encoder(vectors, calls), rows, batch_size=2)
    cosines = [1.0, math.cos(math.radians(30)), 0.5, 0.0]
    assert metrics["spearman"] == pytest.approx(0.8, abs=1e-6)
    assert metrics["pearson"] == pytest.approx(np.corrcoef(cosines, [5, 3, 4, 0])[0, 1], abs=1e-6)
    assert metrics["pairs"] == 4
    encoded = [s for batch in calls for s in batch]
    assert sorted(encoded) == sorted(vectors) and all(len(batch) <= 2 for batch in calls)


def test_sts_metrics_checks_the_encoder_output():
    with pytest.raises(ValueError, match="encode must return"):
        sts_metrics(lambda sentences: torch.zeros(1, 4), [("a", "b", 1.0), ("a", "c", 0.0)])
    with pytest.raises(ValueError, match="NaN"):
        sts_metrics(lambda sentences: torch.full((len(sentences), 4), float("nan")), [("a", "b", 1.0), ("a", "c", 0.0)])


# --- text retrieval -----------------------------------------------------------------------------

RETRIEVAL_VECTORS = {
    "p1": [1, 0, 0], "p2": [0, 1, 0], "p3": [0, 0, 1],
    "q1": [1, 0, 0],          # nearest p1
    "q2": [0, 0.6, 0.8],      # nearest p3, then its own p2
    "q3": [0.5, 0, 0.6],      # nearest p3 (0.77), but p3 is nearer to q2 (0.8)
    "q4": [0.9, 0.3, 0],      # nearest p1, the positive it shares with q1
}


def test_text_retrieval_known_recalls_with_a_shared_positive():
    # q1 and q4 share the positive text "p1": one candidate, not two; the repeated row counts once.
    pairs = [("q1", "p1"), ("q2", "p2"), ("q3", "p3"), ("q4", "p1"), ("q1", "p1")]
    metrics = text_retrieval_metrics(lookup_encoder(RETRIEVAL_VECTORS), pairs, ks=(1, 2, 3))
    assert metrics["queries"] == 4 and metrics["candidates"] == 3
    assert metrics["query_to_positive"] == pytest.approx({"R@1": 0.75, "R@2": 1.0, "R@3": 1.0})
    # p1 finds q1 (or q4: either answers it), p2 finds q2, p3 finds q2 first and its own q3 second
    assert metrics["positive_to_query"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0, "R@3": 1.0})


def test_text_retrieval_rejects_a_query_with_two_positives():
    with pytest.raises(ValueError, match="two positive"):
        text_retrieval_metrics(lookup_encoder(RETRIEVAL_VECTORS), [("q1", "p1"), ("q1", "p2")])


# --- readers ------------------------------------------------------------------------------------

def write(tmp_path, text: str, name: str = "file.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_sts_tsv_header_blank_lines_and_any_scale(tmp_path):
    path = write(tmp_path, "sentence1\tsentence2\tscore\n\na cat.\ta kitten.\t4.8\r\n a dog. \ta car.\t-1e-1\n\n")
    assert read_sts_tsv(path) == [("a cat.", "a kitten.", 4.8), ("a dog.", "a car.", -0.1)]
    # a numeric first line is data, not a header
    assert len(read_sts_tsv(write(tmp_path, "a\tb\t1\nc\td\t0\n"))) == 2


@pytest.mark.parametrize("text, where", [
    ("s1\ts2\tscore\na\tb\t1\nc\td\n", "line 3: expected 3"),
    ("s1\ts2\tscore\na\tb\t1\nc\td\thigh\n", "line 3: score 'high'"),
    ("a\tb\t1\nsentence1\tsentence2\tscore\n", "line 2: score"),
    ("a\tb\t1\nc\td\tnan\n", "line 2: score 'nan'"),
    ("a\tb\t1\n\n\t d\t0\n", "line 3: empty sentence"),
    ("s1\ts2\tscore\na\tb\t1\n", "1 sentence pair"),
])
def test_read_sts_tsv_one_line_errors(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ClipxError, match=where) as error:
        read_sts_tsv(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_pairs_tsv_header_and_rows(tmp_path):
    path = write(tmp_path, "query\tpositive\na cat.\ta kitten.\n\na dog.\ta puppy.\na cat.\ta kitten.\n")
    assert read_pairs_tsv(path) == [("a cat.", "a kitten."), ("a dog.", "a puppy."), ("a cat.", "a kitten.")]
    # only the exact header is skipped: other first lines are data
    assert read_pairs_tsv(write(tmp_path, "question\tanswer\nx\ty\n"))[0] == ("question", "answer")


@pytest.mark.parametrize("text, where", [
    ("query\tpositive\na\tb\tc\n", "line 2: expected 2"),
    ("a\tb\n \tx\n", "line 2: empty sentence"),
    ("a\tb\nc\td\na\te\n", "line 3: query 'a' already has another positive on line 1"),
    ("query\tpositive\na\tb\n", "1 query-positive pair"),
    ("a\tb\nquery\tpositive\n", None),  # a header past the first line is an ordinary pair
])
def test_read_pairs_tsv_one_line_errors(tmp_path, text, where):
    path = write(tmp_path, text)
    if where is None:
        assert read_pairs_tsv(path)[1] == ("query", "positive")
        return
    with pytest.raises(ClipxError, match=where) as error:
        read_pairs_tsv(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_readers_name_a_missing_or_unreadable_file(tmp_path):
    for reader in (read_sts_tsv, read_pairs_tsv):
        with pytest.raises(ClipxError, match="not found"):
            reader(tmp_path / "absent.tsv")
        with pytest.raises(ClipxError, match="is a folder"):
            reader(tmp_path)
        bad = tmp_path / "latin1.tsv"
        bad.write_bytes("caf\xe9\tb\t1\n".encode("latin-1"))
        with pytest.raises(ClipxError, match="not UTF-8"):
            reader(bad)

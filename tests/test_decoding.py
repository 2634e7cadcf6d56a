"""clipx.models.decoding.generate against toy bigram models whose answers can be worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from clipx.errors import ClipxError
from clipx.models.decoding import generate

V, SOT, EOT, PAD = 10, 8, 9, 0


def bigram(table: torch.Tensor, offsets: torch.Tensor | None = None, calls: list[int] | None = None):
    """next_logits of a bigram model: table[last token] (+ offsets[source], so rows differ)."""

    def next_logits(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        assert tokens.dtype == torch.long and tokens.ndim == 2 and source.shape == (tokens.shape[0],)
        assert bool((tokens[:, 0] == SOT).all())
        if calls is not None:
            calls.append(tokens.shape[0])
        logits = table[tokens[:, -1]]
        return logits if offsets is None else logits + offsets[source]

    return next_logits


def random_model(rows: int, seed: int = 0):
    """A random bigram table plus per-row offsets; eot is likely enough that some rows end early."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 2
    table[:, EOT] += 1.5
    offsets = torch.randn(rows, V, generator=g)
    return table, offsets


def hand_greedy(table: torch.Tensor, offset: torch.Tensor, max_tokens: int, min_tokens: int = 0) -> list[int]:
    """The argmax loop written out for one row: generated tokens, eot included if produced."""
    out, last = [], SOT
    for step in range(max_tokens):
        logits = table[last] + offset
        if step < min_tokens:
            logits = logits.clone()
            logits[EOT] = -math.inf
        last = int(logits.argmax())
        out.append(last)
        if last == EOT:
            break
    return out


def as_lists(out: torch.Tensor) -> list[list[int]]:
    """(rows, L) output -> generated tokens per row (after sot, through eot, without padding);
    also checks the layout: sot first, nothing but pad after an eot."""
    rows = []
    for row in out.tolist():
        assert row[0] == SOT
        gen = row[1:]
        if EOT in gen:
            end = gen.index(EOT) + 1
            assert all(t == PAD for t in gen[end:]), row
            gen = gen[:end]
        rows.append(gen)
    return rows


def logprob(table: torch.Tensor, offset: torch.Tensor, tokens: list[int], min_tokens: int = 0) -> float:
    """Summed log-softmax of a generated sequence under the bigram model, computed independently."""
    total, last = 0.0, SOT
    for step, token in enumerate(tokens):
        logits = (table[last] + offset).double()
        if step < min_tokens:
            logits[EOT] = -math.inf
        total += float(torch.log_softmax(logits, 0)[token])
        last = token
    return total


# --- greedy -----------------------------------------------------------------------------------------


def test_greedy_matches_hand_rolled_argmax_and_pads_after_eot():
    rows, max_tokens = 12, 7
    table, offsets = random_model(rows)
    out = generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens)
    assert out.dtype == torch.long and out.shape[0] == rows and out.shape[1] <= max_tokens + 1
    got = as_lists(out)
    want = [hand_greedy(table, offsets[r], max_tokens) for r in range(rows)]
    assert got == want
    ended = [g for g in got if g[-1] == EOT and len(g) < max_tokens]
    assert ended, "the toy model should end some rows early"
    assert out.shape[1] == 1 + max(len(w) for w in want)


def test_greedy_stops_calling_for_finished_rows_and_when_all_finished():
    table = torch.zeros(V, V)
    table[SOT, 3] = 5.0      # sot -> 3
    table[3, EOT] = 5.0      # 3 -> eot: every row ends after two tokens
    calls: list[int] = []
    out = generate(bigram(table, calls=calls), 3, sot=SOT, eot=EOT, pad=PAD, max_tokens=20)
    assert out.tolist() == [[SOT, 3, EOT]] * 3
    assert calls == [3, 3]

    # row 1 ends at once; only the others are passed on from then on
    offsets = torch.zeros(3, V)
    offsets[1, EOT] = 10.0
    calls.clear()
    out = generate(bigram(table, offsets, calls), 3, sot=SOT, eot=EOT, pad=PAD, max_tokens=20)
    assert out.tolist() == [[SOT, 3, EOT], [SOT, EOT, PAD], [SOT, 3, EOT]]
    assert calls == [3, 2]


# --- batch == alone --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_batch_decodes_like_each_row_alone(method):
    rows, max_tokens = 6, 6
    table, offsets = random_model(rows, seed=1)
    kw = dict(sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens, method=method, beams=3)
    batch = as_lists(generate(bigram(table, offsets), rows, **kw))
    alone = [as_lists(generate(bigram(table, offsets[r:r + 1]), 1, **kw))[0] for r in range(rows)]
    assert batch == alone
    assert len({tuple(b) for b in batch}) > 1, "rows should differ, else the test proves little"


def test_sample_batch_is_reproducible_with_the_same_seed():
    rows = 16
    table, offsets = random_model(rows, seed=2)
    def run(seed):
        return generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=8, method="sample",
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# --- beam search -----------------------------------------------------------------------------------


def test_beam_with_one_beam_and_no_length_penalty_is_greedy():
    rows, max_tokens = 10, 7
    table, offsets = random_model(rows, seed=3)
    for min_tokens in (0, 2):
        kw = dict(sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens, min_tokens=min_tokens)
        greedy = generate(bigram(table, offsets), rows, **kw)
        beam = generate(bigram(table, offsets), rows, method="beam", beams=1, length_penalty=0.0, **kw)
        assert torch.equal(beam, greedy)


def test_beam_finds_a_sequence_greedy_misses():
    # From sot, token 1 is likeliest but its continuations are all flat (about 1/8 each);
    # token 2 is a bit less likely but is followed by eot almost surely.
    table = torch.full((V, V), -20.0)
    table[SOT, 1], table[SOT, 2] = 2.0, 1.8
    table[1, :8] = 0.0
    table[2, EOT] = 10.0
    offset = torch.zeros(V)
    greedy = as_lists(generate(bigram(table), 1, sot=SOT, eot=EOT, pad=PAD, max_tokens=2))[0]
    beam = as_lists(generate(bigram(table), 1, sot=SOT, eot=EOT, pad=PAD, max_tokens=2, method="beam", beams=2))[0]
    assert greedy[0] == 1 and len(greedy) == 2
    assert beam == [2, EOT]
    greedy_lp, beam_lp = logprob(table, offset, greedy), logprob(table, offset, beam)
    # by hand: log p(1|sot) + log(1/8) ~ -0.60 - 2.08 vs log p(2|sot) + ~0 ~ -0.80
    assert greedy_lp == pytest.approx(math.log(1 / (1 + math.exp(-0.2))) + math.log(1 / 8), abs=1e-3)
    assert beam_lp == pytest.approx(math.log(1 / (1 + math.exp(0.2))), abs=1e-3)
    assert beam_lp > greedy_lp + 1.5


def exhaustive_best(table, offset, max_tokens, length_penalty, min_tokens):
    """The best-scoring ended sequence of all of them: those ended by eot, and those of max_tokens."""
    best, best_score = None, -math.inf
    for length in range(1, max_tokens + 1):
        for body in itertools.product([t for t in range(V) if t != EOT], repeat=length - 1):
            ends = [list(body) + [EOT]] + ([list(body) + [t] for t in range(V) if t != EOT]
                                           if length == max_tokens else [])
            for seq in ends:
                score = logprob(table, offset, seq, min_tokens) / length ** length_penalty
                if score > best_score:
                    best, best_score = seq, score
    return best, best_score


@pytest.mark.parametrize("length_penalty,min_tokens", [(0.0, 0), (1.0, 0), (2.0, 1), (-0.5, 0)])
def test_wide_beam_finds_the_exhaustive_optimum(length_penalty, min_tokens):
    # With more beams than there are prefixes, beam search (early stopping included) must be exact.
    rows, max_tokens = 3, 3
    table, offsets = random_model(rows, seed=4)
    table[:, EOT] -= 1.0  # make long sequences competitive
    out = generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens, method="beam",
                   beams=(V - 1) ** 2 + 1, length_penalty=length_penalty, min_tokens=min_tokens)
    got = as_lists(out)
    for r in range(rows):
        want, want_score = exhaustive_best(table, offsets[r], max_tokens, length_penalty, min_tokens)
        got_score = logprob(table, offsets[r], got[r], min_tokens) / len(got[r]) ** length_penalty
        assert got_score == pytest.approx(want_score, abs=1e-4), (got[r], want)


def test_length_penalty_trades_log_probability_for_length():
    # [eot] alone has log-prob about -1.0; [4, eot] about -1.2 in total: the raw sum prefers the short
    # one, dividing by the length (-1.0 vs -0.6) prefers the long one.
    table = torch.full((V, V), -30.0)
    p_eot, p_4 = math.exp(-1.0), math.exp(-1.2)
    table[SOT, EOT], table[SOT, 4], table[SOT, 5] = math.log(p_eot), math.log(p_4), math.log(1 - p_eot - p_4)
    table[4, EOT] = 0.0
    table[5, :] = 0.0  # 5 leads nowhere in particular
    kw = dict(sot=SOT, eot=EOT, pad=PAD, max_tokens=4, method="beam", beams=2)
    assert as_lists(generate(bigram(table), 1, length_penalty=0.0, **kw)) == [[EOT]]
    assert as_lists(generate(bigram(table), 1, length_penalty=1.0, **kw)) == [[4, EOT]]


def reference_beam(table, offset, beams, max_tokens, length_penalty, min_tokens):
    """Plain beam search over Python lists, no early stop: every live beam runs until max_tokens, every
    ended hypothesis is kept. Same float32 arithmetic as a model would give, so rankings agree."""
    live: list[tuple[list[int], torch.Tensor]] = [([], torch.tensor(0.0))]
    ended: list[tuple[float, list[int]]] = []
    for step in range(max_tokens):
        cands = []
        for seq, score in live:
            logits = table[seq[-1] if seq else SOT] + offset
            if step < min_tokens:
                logits = logits.clone()
                logits[EOT] = -math.inf
            logp = torch.log_softmax(logits, 0)
            cands += [(score + logp[t], seq + [t]) for t in range(V)]
        cands.sort(key=lambda c: -float(c[0]))
        live = []
        for score, seq in cands:
            if len(live) == beams or float(score) == -math.inf:
                break
            if seq[-1] == EOT or step == max_tokens - 1:
                ended.append((float(score) / len(seq) ** length_penalty, seq))
            else:
                live.append((seq, score))
    return max(ended, key=lambda e: e[0])[1]


@pytest.mark.parametrize("beams", [2, 3])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_equals_a_plain_reference_search(beams, length_penalty):
    # Rows whose eot ranges from rare to likely, so hypotheses end at various lengths and rows stop
    # early at various steps: early stopping must never change the answer.
    rows, max_tokens = 24, 6
    table, offsets = random_model(rows, seed=10)
    offsets[:, EOT] += torch.linspace(-3.0, 3.0, rows)
    out = generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens, method="beam",
                   beams=beams, length_penalty=length_penalty, min_tokens=1)
    want = [reference_beam(table, offsets[r], beams, max_tokens, length_penalty, 1) for r in range(rows)]
    assert as_lists(out) == want
    assert len({len(w) for w in want}) > 2, "answers of several lengths, else early stopping goes untested"


def test_beam_calls_once_per_step_starting_from_one_beam_per_row():
    rows, beams, max_tokens = 4, 3, 6
    table, offsets = random_model(rows, seed=5)
    calls: list[int] = []
    generate(bigram(table, offsets, calls), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens,
             method="beam", beams=beams)
    assert calls[0] == rows  # one live beam per row at the start, not `beams` copies of it
    assert len(calls) <= max_tokens and all(n <= rows * beams for n in calls)


# --- sampling --------------------------------------------------------------------------------------


# temperature=1e-39 overflows float32 logits / temperature to inf (NaN probabilities); float64 copes
@pytest.mark.parametrize("kw", [dict(temperature=1e-4), dict(temperature=1e-39), dict(top_k=1),
                                dict(top_k=1, temperature=5.0)])
def test_sample_degenerates_to_greedy(kw):
    rows = 12
    table, offsets = random_model(rows, seed=6)
    common = dict(sot=SOT, eot=EOT, pad=PAD, max_tokens=7)
    greedy = generate(bigram(table, offsets), rows, **common)
    sample = generate(bigram(table, offsets), rows, method="sample", generator=torch.Generator().manual_seed(0),
                      **common, **kw)
    assert torch.equal(sample, greedy)


def test_sample_top_k_draws_only_among_the_k_largest():
    rows, k = 64, 2
    table, offsets = random_model(rows, seed=7)
    out = generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=6, method="sample",
                   top_k=k, generator=torch.Generator().manual_seed(1))
    seen_second = False
    for r, seq in enumerate(as_lists(out)):
        last = SOT
        for token in seq:
            top = (table[last] + offsets[r]).topk(k).indices.tolist()
            assert token in top
            seen_second |= token == top[1]
            last = token
    assert seen_second, "top_k=2 should sometimes draw the second-best token"


def test_sample_frequencies_follow_the_tempered_softmax():
    rows, temperature = 4000, 2.0
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -3.0, -3.0, -3.0, -3.0, -3.0, 0.2])
    table = logits.expand(V, V).clone()
    out = generate(bigram(table), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=1, method="sample",
                   temperature=temperature, generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(out[:, 1], minlength=V).double() / rows
    want = torch.softmax(logits.double() / temperature, 0)
    assert (freq - want).abs().max() < 0.03


# --- lengths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_min_tokens_prevents_an_early_eot(method):
    table, _ = random_model(1, seed=8)
    table[:, EOT] = 10.0  # eot is by far the likeliest token after anything
    kw = dict(sot=SOT, eot=EOT, pad=PAD, max_tokens=6, method=method, generator=torch.Generator().manual_seed(0))
    assert generate(bigram(table), 2, **kw).tolist() == [[SOT, EOT]] * 2
    out = as_lists(generate(bigram(table), 2, min_tokens=3, **kw))
    for seq in out:
        assert EOT not in seq[:3] and seq[3] == EOT and len(seq) == 4


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_max_tokens_bounds_the_length(method):
    rows, max_tokens = 5, 4
    table, offsets = random_model(rows, seed=9)
    table[:, EOT] = -math.inf  # eot is never produced: every row runs to the limit
    out = generate(bigram(table, offsets), rows, sot=SOT, eot=EOT, pad=PAD, max_tokens=max_tokens, method=method,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (rows, max_tokens + 1)
    assert not bool((out == EOT).any())


def test_zero_rows():
    out = generate(bigram(torch.zeros(V, V)), 0, sot=SOT, eot=EOT, max_tokens=3, method="beam")
    assert out.shape == (0, 1) and out.dtype == torch.long


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,words", [
    (dict(method="nucleus"), "unknown method"),
    (dict(method="beam", beams=0), "beams"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(min_tokens=-1), "min_tokens"),
])
def test_bad_arguments_raise_clipx_error(kw, words):
    calls: list[int] = []
    args = dict(sot=SOT, eot=EOT, max_tokens=3) | kw
    with pytest.raises(ClipxError, match=words) as info:
        generate(bigram(torch.zeros(V, V), calls=calls), 2, **args)
    assert "\n" not in str(info.value)
    assert calls == []  # rejected before the model is called

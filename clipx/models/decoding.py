"""Autoregressive text generation for captioning decoders (CoCa, LocCa-style), independent of the model.

The model is reached through one callable, ``next_logits(tokens, source) -> logits``:

* ``tokens`` is a LongTensor (n, t) of n partial sequences of equal length t, each starting with ``sot``;
* ``source`` is a LongTensor (n,): ``source[i]`` is which of the ``rows`` inputs (images) sequence i
  continues, so a caller indexes its per-image context with it (``context[source]``);
* it returns the logits (n, V) of the next token of every sequence.

``generate`` returns a LongTensor (rows, L), L <= max_tokens + 1: per row ``sot``, the generated tokens,
``eot`` if one was produced, then ``pad`` up to the common length. ``max_tokens`` counts generated
tokens, the eot included; ``min_tokens`` forbids eot (logit -inf) until that many were generated.

Methods:

* ``greedy``: the argmax at every step; a row stops at its eot.
* ``sample``: a draw from softmax(logits / temperature), over the ``top_k`` largest logits when
  top_k > 0. Draws are made on the CPU from float64 probabilities with ``generator`` (a CPU
  torch.Generator), so a seed gives the same captions on any device.
* ``beam``: ``beams`` hypotheses per row scored by their summed log-softmax. A hypothesis ends with
  eot or at max_tokens and is then ranked by sum_logprob / length ** length_penalty (length: generated
  tokens, eot included). Each row keeps its ``beams`` best ended hypotheses and stops once no live beam
  can still beat the worst of them; the best ended one is returned.

Only sequences still being extended are passed to ``next_logits``: a finished greedy/sampled row, or a
finished beam row, costs nothing, and every step is a single call for all rows together. The model's
cache-free interface means each call re-reads the whole prefix; that keeps the contract simple and is
cheap at caption lengths.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import torch

from clipx.errors import ClipxError

NextLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Chooser = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("greedy", "beam", "sample")


def generate(next_logits: NextLogits, rows: int, *, sot: int, eot: int, pad: int = 0, max_tokens: int,
             method: str = "greedy", beams: int = 4, length_penalty: float = 1.0,
             temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
             min_tokens: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Generate one token sequence per input row; see the module docstring for the contract."""
    _check(rows, method, beams, max_tokens, temperature, top_k, min_tokens, generator)
    dev = torch.device("cpu") if device is None else torch.device(device)
    with torch.no_grad():
        if method == "beam":
            search = _BeamSearch(next_logits, rows, beams, sot=sot, eot=eot, max_tokens=max_tokens,
                                 min_tokens=min_tokens, length_penalty=length_penalty, device=dev)
            out = _pack(search.run(), sot, pad)
        else:
            def choose(logits: torch.Tensor) -> torch.Tensor:
                if method == "greedy":
                    return logits.argmax(dim=-1)
                return _sample(logits, temperature, top_k, generator)

            out = _stepwise(next_logits, rows, choose, sot=sot, eot=eot, pad=pad, max_tokens=max_tokens,
                            min_tokens=min_tokens, device=dev)
    return out.to(dev)


def _check(rows: int, method: str, beams: int, max_tokens: int, temperature: float, top_k: int,
           min_tokens: int, generator: torch.Generator | None) -> None:
    """Reject bad arguments with one-line ClipxErrors before any model call."""
    if method not in METHODS:
        raise ClipxError(f"generate: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    problems = [
        (rows < 0, f"rows must be >= 0, got {rows}"),
        (beams < 1, f"beams must be >= 1, got {beams}"),
        (max_tokens < 1, f"max_tokens must be >= 1, got {max_tokens}"),
        (not temperature > 0, f"temperature must be > 0, got {temperature}"),
        (top_k < 0, f"top_k must be >= 0 (0: no restriction), got {top_k}"),
        (min_tokens < 0, f"min_tokens must be >= 0, got {min_tokens}"),
        (generator is not None and generator.device.type != "cpu",
         "generator must be a CPU torch.Generator (draws are made on the CPU)"),
    ]
    for bad, message in problems:
        if bad:
            raise ClipxError(f"generate: {message}")


def _forbid_eot(logits: torch.Tensor, step: int, min_tokens: int, eot: int) -> torch.Tensor:
    """``logits`` (float) with eot at -inf while fewer than ``min_tokens`` tokens were generated."""
    if step < min_tokens:
        logits = logits.clone()  # the caller's tensor may be a view of model state: never write into it
        logits[:, eot] = -math.inf
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_k: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature), over the top_k logits when top_k > 0."""
    # float64 on the CPU: the same probabilities and the same generator stream whatever device the
    # model ran on, and a tiny temperature neither overflows nor underflows to an all-zero row.
    scaled = logits.detach().to("cpu", torch.float64) / temperature
    if 0 < top_k < scaled.shape[-1]:
        # scatter exactly k kept values (a threshold compare would keep every tie with the k-th)
        values, index = scaled.topk(top_k, dim=-1)
        scaled = torch.full_like(scaled, -math.inf).scatter_(-1, index, values)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _stepwise(next_logits: NextLogits, rows: int, choose: Chooser, *, sot: int, eot: int, pad: int,
              max_tokens: int, min_tokens: int, device: torch.device) -> torch.Tensor:
    """Greedy or sampled decoding: one token per live row per step, ``choose`` picking it."""
    # The history lives on the CPU (it is small); only the live rows' prefixes travel to the model.
    out = torch.full((rows, max_tokens + 1), pad, dtype=torch.long)
    out[:, 0] = sot
    live = torch.arange(rows)
    used = 1
    for step in range(max_tokens):
        if live.numel() == 0:
            break
        logits = next_logits(out[live, :step + 1].to(device), live.to(device)).float()
        token = choose(_forbid_eot(logits, step, min_tokens, eot)).cpu()
        out[live, step + 1] = token
        used = step + 2
        live = live[token != eot]  # a row that produced eot is finished: drop it from later calls
    return out[:, :used]


def _pack(sequences: list[list[int]], sot: int, pad: int) -> torch.Tensor:
    """Generated-token lists -> (rows, 1 + longest) LongTensor: sot, the tokens, then pad."""
    longest = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), longest + 1), pad, dtype=torch.long)
    out[:, 0] = sot
    for row, seq in enumerate(sequences):
        out[row, 1:len(seq) + 1] = torch.tensor(seq, dtype=torch.long)
    return out


class _BeamSearch:
    """Beam search over ``rows`` inputs, ``beams`` hypotheses each, all rows batched per step.

    State: ``hist`` (rows * beams, t) prefixes on the CPU, ``scores`` (rows, beams) their summed
    log-probabilities, -inf for an empty slot (at the start every row has one live beam, so no two
    beams are the same sequence), ``finished[row]`` a min-heap of (normalised score, -order, tokens)
    holding the row's best ended hypotheses, and ``done[row]``.
    """

    def __init__(self, next_logits: NextLogits, rows: int, beams: int, *, sot: int, eot: int, max_tokens: int,
                 min_tokens: int, length_penalty: float, device: torch.device) -> None:
        self.next_logits, self.rows, self.beams, self.device = next_logits, rows, beams, device
        self.eot, self.max_tokens, self.min_tokens, self.length_penalty = eot, max_tokens, min_tokens, length_penalty
        self.hist = torch.full((rows * beams, 1), sot, dtype=torch.long)
        self.scores = torch.full((rows, beams), -math.inf)
        self.scores[:, 0] = 0.0
        self.finished: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.order = 0  # insertion counter: among equal scores the earlier hypothesis wins

    def run(self) -> list[list[int]]:
        """The best ended hypothesis of every row, as generated-token lists."""
        for step in range(self.max_tokens):
            if all(self.done):
                break
            self._step(step)
        return [max(heap)[2] if heap else [] for heap in self.finished]

    def _logprobs(self, step: int) -> torch.Tensor:
        """(rows, beams, V) next-token log-probabilities; -inf for empty slots and finished rows."""
        done = torch.tensor(self.done, dtype=torch.bool).repeat_interleave(self.beams)
        live = ((self.scores.flatten() > -math.inf) & ~done).nonzero().squeeze(1)
        logits = self.next_logits(self.hist[live].to(self.device), (live // self.beams).to(self.device)).float()
        logits = _forbid_eot(logits, step, self.min_tokens, self.eot)
        logp = torch.full((self.rows * self.beams, logits.shape[-1]), -math.inf, device=logits.device)
        logp[live.to(logits.device)] = torch.log_softmax(logits, dim=-1)
        return logp.view(self.rows, self.beams, -1)

    def _step(self, step: int) -> None:
        """Extend every live row by one token: rank beams x V candidates, end some, keep ``beams``."""
        logp = self._logprobs(step)
        vocab = logp.shape[-1]
        candidates = (self.scores.to(logp.device)[:, :, None] + logp).flatten(1)
        # 2 * beams candidates always leave `beams` non-eot continuations, however many of them end
        values, index = candidates.topk(min(2 * self.beams, candidates.shape[1]), dim=1)
        values_l, index_l = values.tolist(), index.tolist()
        source: list[int] = []
        tokens: list[int] = []
        scores: list[float] = []
        for row in range(self.rows):
            kept = [] if self.done[row] else self._advance(row, step, values_l[row], index_l[row], vocab)
            kept += [(0, self.eot, -math.inf)] * (self.beams - len(kept))  # empty slots, never extended
            for beam, token, score in kept:
                source.append(row * self.beams + beam)
                tokens.append(token)
                scores.append(score)
        self.hist = torch.cat([self.hist[source], torch.tensor(tokens, dtype=torch.long)[:, None]], dim=1)
        self.scores = torch.tensor(scores, dtype=torch.float32).view(self.rows, self.beams)
        for row in range(self.rows):
            self.done[row] = self.done[row] or self._row_done(row, step)

    def _advance(self, row: int, step: int, values: list[float], index: list[int],
                 vocab: int) -> list[tuple[int, int, float]]:
        """Walk one row's ranked candidates: end those that end, return up to ``beams`` live ones."""
        last = step == self.max_tokens - 1  # every candidate of the last step ends by length
        live: list[tuple[int, int, float]] = []
        for value, flat in zip(values, index):
            if value == -math.inf or len(live) == self.beams:
                break
            beam, token = divmod(flat, vocab)
            if token == self.eot or last:
                prefix = self.hist[row * self.beams + beam, 1:].tolist()
                self._finish(row, prefix + [token], value)
            else:
                live.append((beam, token, value))
        return live

    def _finish(self, row: int, tokens: list[int], logprob: float) -> None:
        """Offer an ended hypothesis to the row's heap of its ``beams`` best."""
        score = logprob / len(tokens) ** self.length_penalty
        self.order += 1
        heap = self.finished[row]
        heapq.heappush(heap, (score, -self.order, tokens))
        if len(heap) > self.beams:
            heapq.heappop(heap)  # the worst (on ties the latest) leaves

    def _row_done(self, row: int, step: int) -> bool:
        """Whether no live beam of ``row`` can still enter its kept set of ended hypotheses."""
        best_live = float(self.scores[row].max())
        if best_live == -math.inf or step + 1 >= self.max_tokens:
            return True
        heap = self.finished[row]
        if len(heap) < self.beams:
            return False
        # A descendant's summed log-prob is <= best_live (log-probs are <= 0) and it ends with a length
        # between step + 2 and max_tokens; best_live / length ** penalty is monotonic in the length, so
        # the larger of the two ends bounds every future score exactly, whatever the penalty's sign.
        bound = max(best_live / length ** self.length_penalty for length in (step + 2, self.max_tokens))
        return bound <= heap[0][0]

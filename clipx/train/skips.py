"""Per-epoch accounts of skipped training inputs, summed over ranks, and the data.max_skip_fraction stop.

The data stream hands over each epoch's local counts once that epoch's loader is exhausted (see
``TrainStream``); every rank does so at the same step, because every rank reads the same number
of batches per epoch, so the sums over ranks happen at the same step everywhere. Finished epochs
are stored in checkpoints. The epoch in progress travels differently: each loader worker's counts
up to its saved data position are in the checkpoint (clipx.data.position), and a resumed run
starts its counters from them, which gives exactly the figures of an unbroken run.
"""

from __future__ import annotations

import torch

from clipx import dist
from clipx.data.skips import SkipCounter
from clipx.errors import ClipxError

USED = SkipCounter.USED  # samples that decoded and went into batches
# Judge the epoch in progress only past this many inputs: the first few shards say little.
MIN_INPUTS_TO_JUDGE = 1000


def summed_over_ranks(counts: dict[str, int], device) -> dict[str, int]:
    """``counts`` (reasons plus "used") summed over ranks, in the fixed order of SkipCounter.REASONS."""
    names = [*SkipCounter.REASONS, USED]
    totals = dist.all_reduce_sum_(torch.tensor([float(counts.get(n, 0)) for n in names], dtype=torch.float64,
                                               device=device))
    return dict(zip(names, (int(v) for v in totals.tolist())))


def skipped_fraction(counts: dict[str, int]) -> float:
    """Skipped inputs over all inputs (an unreadable or truncated shard counts as one input)."""
    skipped = sum(v for k, v in counts.items() if k != USED)
    return skipped / max(skipped + counts.get(USED, 0), 1)


class SkipLedger:
    """Finished epochs' skip counts (global), and the check against ``max_fraction``."""

    def __init__(self, max_fraction: float | None):
        self.max_fraction = max_fraction
        self.epochs: dict[str, dict[str, int]] = {}  # str(epoch) -> counts; JSON keys are strings

    def settle(self, finished: list[tuple[int, dict[str, int]]], device) -> None:
        """Sum the epochs the stream finished since the last call over ranks, record and judge them."""
        for epoch, counts in finished:
            total = summed_over_ranks(counts, device)
            self.epochs[str(epoch)] = total
            self.judge(epoch, total, finished_epoch=True)

    def judge_running(self, epoch: int, counts: dict[str, int], device) -> None:
        """Judge the epoch in progress (call at the same step on every rank: it all-reduces)."""
        if self.max_fraction is None:
            return
        total = summed_over_ranks(counts, device)
        if sum(total.values()) >= MIN_INPUTS_TO_JUDGE:
            self.judge(epoch, total, finished_epoch=False)

    def judge(self, epoch: int, counts: dict[str, int], finished_epoch: bool) -> None:
        fraction = skipped_fraction(counts)
        if self.max_fraction is None or fraction <= self.max_fraction:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != USED)
        when = f"epoch {epoch}" if finished_epoch else f"epoch {epoch} so far"
        raise ClipxError(f"{when}: {fraction:.1%} of training inputs were skipped ({reasons}; {counts[USED]} used), "
                         f"above data.max_skip_fraction={self.max_fraction}; repair or drop the bad shards "
                         "(skips by reason are in summary.json), or raise the limit")

    def totals(self) -> dict[str, int]:
        """Counts summed over the finished epochs."""
        out: dict[str, int] = {}
        for counts in self.epochs.values():
            for name, value in counts.items():
                out[name] = out.get(name, 0) + value
        return out

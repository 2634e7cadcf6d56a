"""The training data stream: (epoch, batch) pairs for this rank, replayable to any position, and
the account of the inputs it skipped."""

from __future__ import annotations

from clipx.data.pipeline import SharedEpoch, build_train_loader, worker_error_message
from clipx.data.skips import SkipCounter
from clipx.errors import ClipxError
from clipx.train.skips import SkipLedger, summed_over_ranks


class TrainStream:
    """Endless (epoch, batch) pairs for this rank, re-entering the loader once per epoch."""

    def __init__(self, data_cfg, transform, batch_size: int, seed: int, collate, rank: int, world: int):
        self.epoch = SharedEpoch()
        self.skipped = SkipCounter()
        self.finished: list[tuple[int, dict[str, int]]] = []  # (epoch, this rank's counts), not yet taken
        self.ledger = SkipLedger(data_cfg.max_skip_fraction)  # finished epochs, summed over ranks
        self.loader, self.batches_per_epoch = build_train_loader(
            data_cfg, batch_size, transform, collate, seed, rank, world, self.epoch, self.skipped)

    def batches(self, already_consumed: int = 0):
        """Yield (epoch, batch), starting after ``already_consumed`` batches of this run.

        Shard order and shuffle buffers are seeded by (seed, epoch, rank, worker), so replaying the
        current epoch and dropping the consumed batches restores the exact batch sequence on resume.
        """
        epoch, skip = divmod(already_consumed, self.batches_per_epoch)
        while True:
            self.epoch.set(epoch)
            self.skipped.reset()  # the workers are idle between epochs
            held = None
            try:
                for index, batch in enumerate(self.loader):
                    if held is not None:
                        yield epoch, held
                    held = batch if index >= skip else None
            except ClipxError as error:  # raised in a worker: keep the user's one line, drop the traceback
                raise ClipxError(worker_error_message(error)) from None
            # The loader is exhausted, so the epoch's counts are final. Record them before handing
            # over its last batch: a checkpoint saved at that step then includes the whole epoch.
            self.finished.append((epoch, self.skipped.counts()))
            if held is not None:
                yield epoch, held
            epoch, skip = epoch + 1, 0

    def take_finished(self) -> list[tuple[int, dict[str, int]]]:
        taken, self.finished = self.finished, []
        return taken

    def account_skips(self, epoch: int, device, judge_running: bool) -> None:
        """Sum the epochs finished since the last call over ranks, record them and judge them against
        data.max_skip_fraction; with ``judge_running``, the epoch in progress too. Every rank calls
        this at the same step (it all-reduces)."""
        self.ledger.settle(self.take_finished(), device)
        if judge_running:
            self.ledger.judge_running(epoch, self.skipped.counts(), device)

    def skipped_overall(self, device) -> dict[str, int]:
        """Finished epochs' counts plus the epoch in progress, summed over ranks (an all-reduce)."""
        running = summed_over_ranks(self.skipped.counts(), device)
        finished = self.ledger.totals()
        return {name: finished.get(name, 0) + value for name, value in running.items()}


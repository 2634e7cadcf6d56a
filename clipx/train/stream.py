"""The training data stream: (epoch, batch) pairs for this rank, replayable to any position."""

from __future__ import annotations

from clipx.data.pipeline import SharedEpoch, SkipCounter, build_train_loader, worker_error_message
from clipx.errors import ClipxError


class TrainStream:
    """Endless (epoch, batch) pairs for this rank, re-entering the loader once per epoch."""

    def __init__(self, data_cfg, transform, batch_size: int, seed: int, tokenizer, rank: int, world: int):
        self.epoch = SharedEpoch()
        self.skipped = SkipCounter()
        self.finished: list[tuple[int, dict[str, int]]] = []  # (epoch, this rank's counts), not yet taken
        self.loader, self.batches_per_epoch = build_train_loader(
            data_cfg, batch_size, transform, tokenizer, seed, rank, world, self.epoch, self.skipped)

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

"""The training data stream: (epoch, batch) pairs for this rank, resumable at any position, and
the account of the inputs it skipped."""

from __future__ import annotations

import collections
from typing import Iterator

from clipx import dist
from clipx.data.pipeline import POSITION_KEY, SharedEpoch, build_train_loader, worker_error_message
from clipx.data.remote import RemoteOptions
from clipx.data.shards import count_samples, expand_shards
from clipx.data.skips import SkipCounter
from clipx.errors import ClipxError
from clipx.train.skips import SkipLedger, summed_over_ranks


class TrainStream:
    """Endless (epoch, batch) pairs for this rank, re-entering the loader once per epoch.

    ``positions`` holds, per loader worker, the data position after the last batch handed to
    training in the current epoch: what a checkpoint saves (``state_dict``) and a resumed run starts
    from, without reading or decoding anything that came before.
    """

    def __init__(self, data_cfg, transform, batch_size: int, seed: int, collate, rank: int, world: int):
        self.epoch = SharedEpoch()
        self.skipped = SkipCounter()
        self.finished: list[tuple[int, dict[str, int]]] = []  # (epoch, this rank's counts), not yet taken
        self.ledger = SkipLedger(data_cfg.max_skip_fraction)  # finished epochs, summed over ranks
        self.workers = max(data_cfg.workers, 1)
        self.positions: dict[int, dict] = {}
        self.loader, self.batches_per_epoch = build_train_loader(
            data_cfg, batch_size, transform, collate, seed, rank, world, self.epoch, self.skipped,
            num_samples=epoch_samples(data_cfg))

    def state_dict(self) -> dict:
        return {"positions": {str(worker): p for worker, p in self.positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(worker): p for worker, p in state.get("positions", {}).items()}

    def batches(self, already_consumed: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield (epoch, batch), starting after ``already_consumed`` batches of this run.

        Mid-epoch, each worker starts from its saved position (``load_state_dict``), and batches are
        handed on in the order an unbroken run had them (round robin over workers, from the worker
        whose turn was next). A checkpoint without positions (written by clipx before they existed)
        replays the epoch and drops the consumed batches: slower, the same batches.
        """
        epoch, skip = divmod(already_consumed, self.batches_per_epoch)
        saved = self.positions if skip and self.positions and all(
            p["epoch"] == epoch for p in self.positions.values()) else {}
        if saved:
            self.loader.dataset.resume_at(epoch, saved)
        while True:
            self.epoch.set(epoch)
            self.skipped.reset()  # the workers are idle between epochs
            self.positions = dict(saved)
            for position in saved.values():  # what the epoch skipped before the resume point
                self.skipped.add_counts(position["skips"])
            held = None
            try:
                source = in_worker_order(iter(self.loader), skip % self.workers, self.workers) if saved \
                    else iter(self.loader)
                for index, batch in enumerate(source):
                    if held is not None:
                        yield from self._hand_over(epoch, held)
                    held = batch if saved or index >= skip else None
            except ClipxError as error:  # raised in a worker: keep the user's one line, drop the traceback
                raise ClipxError(worker_error_message(error)) from None
            # The loader is exhausted, so the epoch's counts are final. Record them before handing
            # over its last batch: a checkpoint saved at that step then includes the whole epoch.
            self.finished.append((epoch, self.skipped.counts()))
            if held is not None:
                yield from self._hand_over(epoch, held)
            epoch, skip, saved = epoch + 1, 0, {}

    def _hand_over(self, epoch: int, batch: dict):
        position = batch.pop(POSITION_KEY)
        self.positions[position["worker"]] = position  # before the yield: training has it once it is saved
        yield epoch, batch

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


def epoch_samples(data_cfg) -> int:
    """Samples per epoch: the config's, or counted from sizes.json by rank 0 and broadcast (one
    read of a remote store, not one per rank)."""
    if data_cfg.train_num_samples:
        return data_cfg.train_num_samples
    counted: int | ClipxError | None = None
    if dist.rank() == 0:
        options = RemoteOptions.from_config(data_cfg)
        try:
            counted = count_samples(expand_shards(data_cfg.train, "data.train", data_cfg.allow_pipe_urls, options),
                                    options)
        except ClipxError as error:
            counted = error
    counted = dist.broadcast_object(counted)
    if isinstance(counted, ClipxError):
        raise ClipxError(str(counted))
    return int(counted)


def in_worker_order(batches: Iterator[dict], first: int, workers: int) -> Iterator[dict]:
    """``batches`` (worker 0's first, as a fresh loader gives them) reordered into the round robin
    that starts at worker ``first``, as the run being resumed had them."""
    waiting: dict[int, collections.deque] = {w: collections.deque() for w in range(workers)}
    turn = first
    for batch in batches:
        waiting[batch[POSITION_KEY]["worker"]].append(batch)
        while waiting[turn]:
            yield waiting[turn].popleft()
            turn = (turn + 1) % workers
    while any(waiting.values()):  # workers that finished early: the rest, still in turn
        if waiting[turn]:
            yield waiting[turn].popleft()
        turn = (turn + 1) % workers

"""The training data stream: (epoch, batch) pairs for this rank, resumable at any position, and
the account of the inputs it skipped."""

from __future__ import annotations

import collections
from typing import Iterator

from clipx import dist
from clipx.data.keep import KeepList, load_keep
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
        self.data_cfg, self.seed, self.batch_size, self.rank, self.world = data_cfg, seed, batch_size, rank, world
        self.workers = max(data_cfg.workers, 1)
        self.positions: dict[int, dict] = {}
        self.current, self.in_epoch = 0, 0  # the epoch of the last batch handed over, and its batches so far
        self.resume_point: tuple[int, int] | None = None  # (epoch, batches consumed in it), from a checkpoint
        self.remainder: dict | None = None  # an epoch finished after a change of world size (``elastic``)
        # The epoch in progress's skips before an elastic resume (rank 0 holds them, counted once):
        # {"epoch": e, "counts": {...}}, saved in checkpoints until that epoch ends.
        self.carried: dict | None = None
        # data.keep: every rank reads it whole, since a later pass may deal any shard to any rank.
        self.keep = load_keep(data_cfg)
        self.num_samples = epoch_samples(data_cfg, self.keep)
        self.loader, self.batches_per_epoch = build_train_loader(
            data_cfg, batch_size, transform, collate, seed, rank, world, self.epoch, self.skipped,
            num_samples=self.num_samples, keep=self.keep)

    def layout(self) -> dict:
        """What the saved positions depend on besides the world size: another value needs the
        elastic path (``load_elastic``), which redistributes what the epoch left unread."""
        return {"workers": self.workers, "shuffle_buffer": self.data_cfg.shuffle_buffer,
                "batch_size": self.batch_size, "world": self.world}

    def state_dict(self) -> dict:
        return {"epoch": self.current, "in_epoch": self.in_epoch, **self.layout(),
                "positions": {str(worker): p for worker, p in self.positions.items()},
                "remainder": self.remainder, "carried": self.carried, "keep": self.keep_fingerprint()}

    def keep_fingerprint(self) -> str | None:
        return self.keep.fingerprint() if self.keep is not None else None

    def check_keep(self, state: dict) -> None:
        """Positions count the samples of one keep-list (data.keep): refuse them under another."""
        if "epoch" in state and state.get("keep") != self.keep_fingerprint():
            raise ClipxError("this checkpoint's data positions count the samples of another keep-list than "
                             f"data.keep={self.data_cfg.keep}; resume with the data.keep it was written with, "
                             "or start a new run")

    def needs_elastic(self, state: dict) -> bool:
        """Whether ``state`` (a checkpoint's, written by another run) cannot be resumed as it is."""
        return "epoch" in state and any(state.get(k, v) != v for k, v in self.layout().items())

    def load_state_dict(self, state: dict) -> None:
        self.check_keep(state)
        self.positions = {int(worker): p for worker, p in state.get("positions", {}).items()}
        if "epoch" in state:
            self.resume_point = (state["epoch"], state["in_epoch"])
        self.remainder, self.carried = state.get("remainder"), state.get("carried")
        if self.remainder is not None:
            self.remainder["pieces"] = {int(w): p for w, p in self.remainder["pieces"].items()}

    def load_elastic(self, old_states: list[dict]) -> None:
        """Continue the epoch that ``len(old_states)`` processes (their stream states, in rank order)
        were in: this rank's workers read their share of what those left unread (clipx.train.elastic)."""
        from clipx.train.elastic import continue_epoch

        self.check_keep(old_states[0])
        self.resume_point, self.remainder, counts = continue_epoch(self, old_states)
        self.positions = {}
        if self.rank == 0 and counts:  # counted once, not once per new rank
            self.carried = {"epoch": self.resume_point[0], "counts": counts}

    def epoch_length(self, epoch: int) -> int:
        if self.remainder is not None and epoch == self.remainder["epoch"]:
            return self.remainder["batches"] * self.workers
        return self.batches_per_epoch

    def batches(self, already_consumed: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield (epoch, batch), starting after ``already_consumed`` batches of this run (or at the
        point ``load_state_dict`` gave).

        Mid-epoch, each worker starts from its saved position (``load_state_dict``), and batches are
        handed on in the order an unbroken run had them (round robin over workers, from the worker
        whose turn was next). A checkpoint without positions (written by clipx before they existed)
        replays the epoch and drops the consumed batches: slower, the same batches.
        """
        epoch, skip = self.resume_point or divmod(already_consumed, self.batches_per_epoch)
        if skip >= self.epoch_length(epoch):
            epoch, skip = epoch + 1, 0
        self.resume_point = None
        saved = self.positions if skip and self.positions and all(
            p["epoch"] == epoch for p in self.positions.values()) else {}
        if saved:
            self.loader.dataset.resume_at(epoch, saved)
        if self.remainder is not None:
            self.loader.dataset.finish_epoch_elsewhere(self.remainder)
        # A replay (no saved positions) hands its dropped batches to _drop, which counts them.
        self.current, self.in_epoch = epoch, skip if saved else 0
        while True:
            self.epoch.set(epoch)
            self.skipped.reset()  # the workers are idle between epochs
            self.positions = dict(saved)
            for position in saved.values():  # what the epoch skipped before the resume point
                self.skipped.add_counts(position["skips"])
            if self.carried is not None and self.carried["epoch"] == epoch:
                self.skipped.add_counts(self.carried["counts"])
            if self.remainder is not None and epoch > self.remainder["epoch"]:
                self.remainder = None  # that epoch is over: the plan deals whole shards again
            held = None
            try:
                source = in_worker_order(iter(self.loader), skip % self.workers, self.workers) if saved \
                    else iter(self.loader)
                for index, batch in enumerate(source):
                    if held is not None:
                        yield from self._hand_over(epoch, held)
                    held = batch if saved or index >= skip else self._drop(epoch, batch)  # type: ignore[func-returns-value]
            except ClipxError as error:  # raised in a worker: keep the user's one line, drop the traceback
                raise ClipxError(worker_error_message(error)) from None
            # The loader is exhausted, so the epoch's counts are final. Record them before handing
            # over its last batch: a checkpoint saved at that step then includes the whole epoch.
            self.finished.append((epoch, self.skipped.counts()))
            if held is not None:
                yield from self._hand_over(epoch, held)
            epoch, skip, saved = epoch + 1, 0, {}

    def _drop(self, epoch: int, batch: dict) -> None:
        """A replayed batch (a checkpoint without positions): not trained on again, but its
        position is recorded, so the next checkpoint has every worker's."""
        for _ in self._hand_over(epoch, batch):
            pass

    def _hand_over(self, epoch: int, batch: dict):
        position = batch.pop(POSITION_KEY)
        if epoch != self.current:
            self.current, self.in_epoch, self.positions = epoch, 0, {}
            if self.carried is not None and self.carried["epoch"] < epoch:
                self.carried = None
        # Before the yield: training has this batch once a checkpoint is saved.
        self.positions[position["worker"]] = position
        self.in_epoch += 1
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


def epoch_samples(data_cfg, keep: KeepList | None = None) -> int:
    """Samples per epoch: the config's, the samples ``keep`` (data.keep) keeps, or counted from
    sizes.json by rank 0 and broadcast (one read of a remote store, not one per rank)."""
    if data_cfg.train_num_samples:
        return data_cfg.train_num_samples

    def count() -> int:
        options = RemoteOptions.from_config(data_cfg)
        urls = expand_shards(data_cfg.train, "data.train", data_cfg.allow_pipe_urls, options)
        return keep.total(keep.shards(urls)) if keep is not None else count_samples(urls, options)

    return int(dist.on_rank0(count))


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

"""Resuming on a different number of processes: the epoch in progress is finished by the new ranks,
each sample the old ranks left unread read exactly once.

The old ranks' saved data positions say, for every loader worker, which samples of its shards it
had read and which still sat in its shuffle buffer (clipx.data.position). What remains of the
epoch is, per old worker, the samples its buffer held, the rest of the shard it was reading and
the shards after it. Those pieces, in an order shuffled with the run's seed, are cut into equal
runs of samples, one per new (rank, worker); each new worker shuffles its run and makes the same
number of batches. The order after the switch is therefore new (seeded, reproducible); the set of
samples is the epoch's. From the next epoch on, the new ranks deal whole shards as usual.
"""

from __future__ import annotations

import random

from clipx.data.keep import KeepList
from clipx.data.pipeline import steps_per_epoch
from clipx.data.position import Piece, Position, ShardPlan, ShuffleBuffer, replay_shuffle
from clipx.data.remote import RemoteOptions
from clipx.data.shards import expand_shards, shard_sizes
from clipx.data.skips import SkipCounter
from clipx.dist import on_rank0
from clipx.errors import ClipxError


def continue_epoch(stream, old_states: list[dict]) -> tuple[tuple[int, int], dict | None, dict[str, int]]:
    """(resume point, remainder for ``stream``'s rank or None, the epoch's skip counts so far)."""
    first = old_states[0]
    if "epoch" not in first:
        raise ClipxError("this checkpoint has no data positions (written by an older clipx); resume it with the "
                         f"{len(old_states)} process(es) and the data settings that wrote it")
    epoch, in_epoch = first["epoch"], first["in_epoch"]
    if in_epoch == 0 or in_epoch >= _old_epoch_length(stream, first):
        return (epoch + 1, 0) if in_epoch else (epoch, 0), None, {}  # the next epoch starts on the new ranks
    if first.get("remainder"):
        raise ClipxError(f"this checkpoint is inside epoch {epoch}, which an earlier change of the number of "
                         f"processes or data settings already split; resume with the same ones until it ends")
    counts = summed_skips(old_states)
    if stream.data_cfg.resampled:  # shards drawn with replacement: no "rest of the epoch" to finish
        return (epoch + 1, 0), None, {}
    urls, sizes = stream_shard_sizes(stream.data_cfg, stream.keep)
    pieces = []
    for old_rank, state in enumerate(old_states):
        plan = ShardPlan(tuple(urls), stream.seed, old_rank, len(old_states), False)
        for worker in range(state["workers"]):
            saved = state["positions"].get(str(worker), state["positions"].get(worker))
            pieces += unread(plan, epoch, worker, state["workers"], saved, state["shuffle_buffer"])
    random.Random(f"{stream.seed}-{epoch}-remainder").shuffle(pieces)
    runs = cut(pieces, sizes, stream.world * stream.workers)
    per_run = min(sum(p.size(sizes[p.url]) for p in run) for run in runs)
    mine = {w: [p.to_dict() for p in runs[stream.rank * stream.workers + w]] for w in range(stream.workers)}
    carried = first.get("carried")  # skips carried from an earlier elastic resume in this epoch
    if carried and carried["epoch"] == epoch:
        counts = {k: counts.get(k, 0) + carried["counts"].get(k, 0) for k in {*counts, *carried["counts"]}}
    return (epoch, 0), {"epoch": epoch, "pieces": mine, "batches": per_run // stream.batch_size}, counts


def _old_epoch_length(stream, first: dict) -> int:
    """Batches per rank in the old run's current epoch (a split epoch's own length, if it was one)."""
    remainder = first.get("remainder")
    if remainder and remainder["epoch"] == first["epoch"]:
        return remainder["batches"] * first["workers"]
    world = first.get("world", 1)
    return steps_per_epoch(stream.num_samples, first.get("batch_size", stream.batch_size) * world, first["workers"])[0]


def stream_shard_sizes(data_cfg, keep: KeepList | None = None) -> tuple[list[str], dict[str, int]]:
    """The shard list and each shard's sample count, read by rank 0 and broadcast (every rank
    deals the same pieces, and a failure is the same one-line error on every rank). With ``keep``
    (data.keep): the shards it keeps samples of, as the loader's plan deals them, and their kept
    counts, the sizes of the views that pieces number samples in."""
    def read():
        options = RemoteOptions.from_config(data_cfg)
        urls = expand_shards(data_cfg.train, "data.train", data_cfg.allow_pipe_urls, options)
        if keep is not None:
            urls = keep.shards(urls)
            return urls, keep.sizes(urls)
        return urls, shard_sizes(urls, options)

    return on_rank0(read)


def unread(plan: ShardPlan, epoch: int, worker: int, workers: int, saved: dict | None,
           buffer_size: int) -> list[Piece]:
    """What one old worker had not handed on in ``epoch``: its buffered samples and unread shards."""
    pieces = plan.pieces(epoch, worker, workers)
    if saved is None:
        return pieces
    position = Position.from_dict(saved)
    if position.pass_index > epoch:  # it read its whole pass and went on into the next
        return []
    rng = plan.shuffle_rng(position.epoch, position.pass_index, worker)
    buffer = replay_shuffle(position, ShuffleBuffer(buffer_size, rng))
    held: dict[int, list[int]] = {}
    for number in buffer.held():
        piece, k = position.locate(number)
        held.setdefault(piece, []).append(pieces[piece].index_of(k))
    out = [Piece(pieces[p].url, wanted=tuple(sorted(indices))) for p, indices in sorted(held.items())]
    if not position.draining:
        out.append(Piece(pieces[position.shard].url, start=position.in_shard))
        out += pieces[position.shard + 1:]
    return out


def cut(pieces: list[Piece], sizes: dict[str, int], runs: int) -> list[list[Piece]]:
    """``pieces`` split into ``runs`` consecutive runs of (as nearly as possible) equal sample counts."""
    total = sum(p.size(sizes[p.url]) for p in pieces)
    bounds = [total * i // runs for i in range(runs + 1)]
    out: list[list[Piece]] = [[] for _ in range(runs)]
    offset = 0
    for piece in pieces:
        size = piece.size(sizes[piece.url])
        for run in range(runs):
            lo, hi = max(bounds[run], offset), min(bounds[run + 1], offset + size)
            if lo < hi:
                out[run].append(_slice(piece, lo - offset, hi - offset))
        offset += size
    return out


def _slice(piece: Piece, a: int, b: int) -> Piece:
    if piece.wanted is not None:
        return Piece(piece.url, wanted=piece.wanted[a:b])
    return Piece(piece.url, start=piece.start + a, stop=piece.start + b)


def summed_skips(old_states: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in old_states:
        for position in state["positions"].values():
            for name, value in position["skips"].items():
                counts[name] = counts.get(name, 0) + value
    return {name: counts.get(name, 0) for name in (*SkipCounter.REASONS, SkipCounter.USED) if name in counts}

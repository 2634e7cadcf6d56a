"""Where a data-loader worker stands in its stream, and how to stand there again without replaying it.

A worker's stream is a function of the run's seed: pass ``p`` deals the shard list, shuffled with
(seed, p), to ranks and then to workers (``ShardPlan``); its samples, numbered in read order, go
through a shuffle buffer whose random draws depend only on how many samples it has seen
(``ShuffleBuffer``, seeded per epoch, pass and worker); then decoding and augmentation, seeded per sample
by the sample's place in the stream. So a handful of counters (``Position``) pin down the whole
state: the shard being read and how many of its samples were read, the samples the shuffle took in
and handed on, the items decoding took, the batches made.

Every batch carries its worker's position when it was made. A checkpoint stores, per worker, the
position of the last batch training consumed, and a resumed worker rebuilds its state from it in
time that does not grow with how deep into the epoch it stopped: the shuffle buffer's draws are
replayed on sample numbers (a microsecond each, no data), the samples still in the buffer are read
back by number, and the reader seeks to the next unread sample.
"""

from __future__ import annotations

import collections
import random
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Piece:
    """Samples of one shard a stream reads: those numbered in [start, stop), or only ``wanted``."""

    url: str
    start: int = 0
    stop: int | None = None
    wanted: tuple[int, ...] | None = None

    def index_of(self, k: int) -> int:
        """The shard index of the piece's ``k``-th sample (assuming each of them was readable)."""
        return self.wanted[k] if self.wanted is not None else self.start + k

    def size(self, shard_size: int) -> int:
        if self.wanted is not None:
            return len(self.wanted)
        return min(shard_size, self.stop if self.stop is not None else shard_size) - self.start

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Piece":
        wanted = data.get("wanted")
        return cls(data["url"], data["start"], data["stop"], tuple(wanted) if wanted is not None else None)


@dataclass(frozen=True)
class ShardPlan:
    """Which shards each worker of each rank reads in pass ``p``."""

    urls: tuple[str, ...]
    seed: int
    rank: int
    world: int
    resampled: bool

    def shards(self, pass_index: int, worker: int, workers: int) -> list[str]:
        if self.resampled:  # each worker draws with replacement from its own seeded generator
            rng = random.Random(f"{self.seed}-{pass_index}-{self.rank}-{worker}")
            return [rng.choice(self.urls) for _ in range(len(self.urls))]
        order = list(self.urls)
        random.Random(f"{self.seed}-{pass_index}").shuffle(order)
        return order[self.rank::self.world][worker::workers]

    def pieces(self, pass_index: int, worker: int, workers: int) -> list[Piece]:
        return [Piece(url) for url in self.shards(pass_index, worker, workers)]

    def shuffle_rng(self, epoch: int, pass_index: int, worker: int, tag: str = "") -> random.Random:
        """The shuffle buffer's generator for a pass read in ``epoch``: a worker that runs out of
        shards starts the next pass inside the epoch, and that pass, read again when the next epoch
        begins, must not come out in the same order."""
        return random.Random(f"{self.seed}-{epoch}-{pass_index}-{self.rank}-{worker}{tag}")


class ShuffleBuffer:
    """A shuffle buffer of ``size`` items whose draws depend only on the number of items pushed.

    Full, each push hands on a random item; at the end of a pass the rest is shuffled and handed on
    in order (``drain``), so a pass never mixes with the next.
    """

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = max(size, 1), rng
        self.items: list = []
        self.drained: collections.deque = collections.deque()

    def push(self, item):
        """Take ``item``; return the item handed on, or None while the buffer fills."""
        self.items.append(item)
        if len(self.items) < self.size:
            return None
        index = self.rng.randrange(len(self.items))
        self.items[index], self.items[-1] = self.items[-1], self.items[index]
        return self.items.pop()

    def drain(self) -> None:
        self.rng.shuffle(self.items)
        self.drained.extend(self.items)
        self.items = []

    def next_drained(self):
        return self.drained.popleft()

    def held(self) -> list:
        """Items taken and not yet handed on, in the order they sit."""
        return [*self.items, *self.drained]


@dataclass
class Position:
    """One worker's place in its stream in an epoch (all counts since the epoch's iteration began,
    except where a field says per pass)."""

    epoch: int
    worker: int
    pass_index: int  # the pass being read (epoch + the passes this worker finished in the epoch)
    shard: int = 0  # index into the pass's list of pieces (shards, or parts of shards) being read
    in_shard: int = 0  # the next sample index to read in that piece's shard
    shard_sizes: list = field(default_factory=list)  # samples read from each finished piece of the pass
    taken: int = 0  # samples read from the piece being read
    read: int = 0  # samples the shuffle buffer took in this pass
    emitted: int = 0  # samples the shuffle buffer handed on this pass
    draining: bool = False  # the pass is read: the buffer is handing on what it holds
    decoded: int = 0  # items decoding took (pass ends included): each sample's augmentation seed
    batches: int = 0  # batches this worker made in the epoch
    skips: dict = field(default_factory=dict)  # this worker's skip counts in the epoch, "used" included

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Position":
        return cls(**{**data, "shard_sizes": list(data["shard_sizes"]), "skips": dict(data["skips"])})

    def start_pass(self, pass_index: int) -> None:
        self.pass_index, self.shard, self.in_shard, self.shard_sizes, self.taken = pass_index, 0, 0, [], 0
        self.read = self.emitted = 0
        self.draining = False

    def next_shard(self) -> None:
        self.shard_sizes.append(self.taken)
        self.shard, self.in_shard, self.taken = self.shard + 1, 0, 0

    def locate(self, number: int) -> tuple[int, int]:
        """(piece in the pass, k: the piece's k-th sample read) of the pass's ``number``-th sample."""
        for shard, size in enumerate(self.shard_sizes):
            if number < size:
                return shard, number
            number -= size
        return len(self.shard_sizes), number


def replay_shuffle(position: Position, buffer: ShuffleBuffer) -> ShuffleBuffer:
    """``buffer`` brought to ``position``'s state, with sample numbers for items: the same draws
    as the pass made, without its data. Raises ValueError when the position is inconsistent."""
    emitted = 0
    for number in range(position.read):
        if buffer.push(number) is not None:
            emitted += 1
    if position.draining:
        buffer.drain()
        while emitted < position.emitted:
            buffer.next_drained()
            emitted += 1
    if emitted != position.emitted:
        raise ValueError(f"data position says {position.emitted} samples left the shuffle buffer after "
                         f"{position.read} went in; a replay gives {emitted}")
    return buffer

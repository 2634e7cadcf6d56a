"""Streaming webdataset pipelines: shards -> samples -> decoded, transformed, tokenized batches.

We do not hand these loaders to ``accelerator.prepare``: Accelerate would shard the batches across
ranks a second time. Instead ``ShardPlan`` deals shards to ranks and data-loader workers itself, and
every worker makes the same number of batches per epoch whatever the shard sizes. Each batch carries
its worker's ``Position`` (clipx.data.position), from which a resumed run starts again without
replaying the epoch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import multiprocessing as mp
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipx.data.captions import CaptionChooser
from clipx.data.keep import KeepList, load_keep
from clipx.data.opener import ShardOpener, read_shard
from clipx.data.position import Piece, Position, ShardPlan, ShuffleBuffer, replay_shuffle
from clipx.data.remote import RemoteOptions
from clipx.data.shards import count_samples, expand_shards
from clipx.data.skips import SkipCounter
from clipx.data.transforms import ImageTooLarge, decode_image
from clipx.errors import ClipxError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SharedEpoch:
    """The current epoch, readable by data-loader workers forked after it was set."""

    def __init__(self, epoch: int = 0):
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


# Follows the last shard of each pass through the training pipeline, so that stages can act at a
# pass boundary (drain the shuffle buffer, check the pass gave something) without reading ahead.
END_OF_PASS = {"__end_of_pass__": True}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# The batch key under which the training pipeline hands each batch's Position to the main process
# (clipx.train.stream takes it off before training sees the batch).
POSITION_KEY = "__position__"
# Stands in a restored shuffle buffer for a sample that could not be read back after a resume.
LOST = {"__lost__": True}


class PassGuard:
    """Fails loudly when a whole pass over a worker's shards yields nothing usable.

    The shard stream is endless, so without this a data set of only corrupt or wrongly named
    members would not end training: it would wait forever for a first batch.
    """

    def __init__(self, what: str, counter: SkipCounter, seen: int = 0):
        self.what, self.counter = what, counter
        self.seen = seen

    def count(self) -> None:
        self.seen += 1

    def end_of_pass(self) -> None:
        if self.seen == 0:
            raise ClipxError(f"a full pass over the training shards gave no {self.what} (skipped: "
                             f"{self.counter.snapshot()}); check that samples hold .jpg/.png/.webp and .txt")
        self.seen = 0


def read_passes(pieces_of: Callable[[int], list[Piece]], position: Position, opener: ShardOpener,
                counter: SkipCounter, keep: KeepList | None = None) -> Iterator[dict]:
    """This worker's samples, pass after pass, each pass followed by END_OF_PASS, from ``position``
    on (a fresh position starts at its pass's first shard).

    Not resampled: pass p shuffles the shard list with (seed, p), then deals it to ranks and then to
    workers, so no two workers read the same shard in a pass. Resampled: each worker draws shards
    with replacement from its own seeded generator. The stream never ends on its own; the loader
    decides how many batches make an epoch. ``pieces_of(pass_index)``: what the pass reads, whole
    shards (``ShardPlan.pieces``) or, after a resume on another number of processes, parts of them.
    ``position`` is kept current as samples are read; with ``keep`` (data.keep) it counts in the
    shards' views (clipx.data.keep), as the pieces do.
    """
    if position.draining:  # the pass was read to its end before the resume point
        position.start_pass(position.pass_index + 1)
    guard = PassGuard("readable sample", counter, seen=position.read)
    first = position.in_shard
    while True:
        pieces = pieces_of(position.pass_index)
        while position.shard < len(pieces):
            if position.shard + 1 < len(pieces):
                opener.prefetch(pieces[position.shard + 1].url)
            for index, sample in read_shard(opener, pieces[position.shard], counter, first, keep):
                position.in_shard, position.taken = index + 1, position.taken + 1
                guard.count()
                yield sample
            first = 0
            position.next_shard()
        guard.end_of_pass()
        yield END_OF_PASS
        position.start_pass(position.pass_index + 1)


def restore_shuffle_buffer(pieces: list[Piece], position: Position, buffer: ShuffleBuffer, opener: ShardOpener,
                           counter: SkipCounter, keep: KeepList | None = None) -> ShuffleBuffer:
    """The worker's shuffle buffer as it was at ``position`` (``buffer``: a fresh one with the pass's
    generator): its draws replayed on sample numbers, then the samples it held read back from their
    shards (only those, by index)."""
    buffer = replay_shuffle(position, buffer)
    wanted: dict[int, dict[int, int]] = {}  # piece -> {index in its shard: sample number}
    for number in buffer.held():
        piece, k = position.locate(number)
        wanted.setdefault(piece, {})[pieces[piece].index_of(k)] = number
    samples: dict[int, dict] = {}
    for piece, numbers in wanted.items():
        held = Piece(pieces[piece].url, wanted=tuple(sorted(numbers)))
        for index, sample in read_shard(opener, held, counter, keep=keep):
            samples[numbers[index]] = sample
    buffer.items = [samples.get(n, LOST) for n in buffer.items]
    buffer.drained = collections.deque(samples.get(n, LOST) for n in buffer.drained)
    return buffer


def sample_image_bytes(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


@contextlib.contextmanager
def sample_rng(seed: int, epoch: int, rank: int, worker: int, index: int):
    """Torch's RNG seeded by the sample's place in the stream, (seed, epoch, rank, worker, index),
    for the length of the block; the caller's RNG state is put back afterwards.

    Random crops and colour jitter then depend only on where a sample sits in the data stream, not
    on when a worker started or what the model drew before: a resumed run sees the very same
    augmented images from its saved position on, with or without loader workers (with ``data.workers: 0``
    the transforms run in the training process, whose global RNG belongs to the model).
    """
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also queue a seed for every accelerator
        # backend, recording a Python stack each time (a third of a 64 px sample's loading time).
        torch.default_generator.manual_seed(sample_seed(seed, epoch, rank, worker, index))
        yield


def sample_seed(seed: int, epoch: int, rank: int, worker: int, index: int) -> int:
    """The seed of a sample's draws, from its place in the stream (a hash of integers: the same in
    every process, unlike hashes of strings)."""
    return hash((seed, epoch, rank, worker, index)) & 0x7FFF_FFFF_FFFF_FFFF


def decode_or_reason(sample: dict, transform):
    """(transformed image, None), or (None, the skip reason) when the sample's image is unusable."""
    data = sample_image_bytes(sample)
    if data is None:
        return None, "missing_image"
    try:
        # A transform that takes the bytes decodes them itself, only as far as its crop needs; one
        # that takes the sample (clipx.data.reinforce.ReplayedViews) also reads its stored views.
        if getattr(transform, "takes_sample", False):
            return transform(sample), None
        return (transform(data) if getattr(transform, "takes_bytes", False) else transform(decode_image(data))), None
    except ImageTooLarge:
        return None, "oversized_image"
    except Exception:  # any other decoder failure (garbage, HTML, truncated file) spoils this one sample
        return None, "undecodable_image"


def shuffle_samples(src: Iterable[dict], buffer: ShuffleBuffer | None, new_buffer, position: Position) -> Iterator[dict]:
    """Samples through a shuffle buffer (``new_buffer(pass_index)`` makes one per pass), so the
    samples of nearby shards mix; END_OF_PASS drains it (then passes on): a pass never overtakes the
    previous one, and the draining needs no peek into the next pass. ``buffer``: restored at a resume."""
    if buffer is not None and position.draining:
        while buffer.drained:
            position.emitted += 1
            yield buffer.next_drained()
        buffer = None
        yield END_OF_PASS
    for sample in src:
        if buffer is None:
            buffer = new_buffer(position.pass_index)
        if sample is END_OF_PASS:
            buffer.drain()
            position.draining = True
            while buffer.drained:
                position.emitted += 1
                yield buffer.next_drained()
            buffer = None
            yield END_OF_PASS
            continue
        position.read += 1
        out = buffer.push(sample)
        if out is not None:
            position.emitted += 1
            yield out


def decode_train_samples(src: Iterable[dict], transform, counter: SkipCounter, seed: int, position: Position,
                         rank: int = 0, needs_text: bool = True,
                         choose_caption: CaptionChooser = CaptionChooser(), members: tuple[str, ...] = (),
                         labels: Optional[Callable[[dict], Optional[int]]] = None) -> Iterator[dict]:
    """Raw samples -> {"image": transform's output, "text": str or None, "negative": str or None,
    "positive": str or None, "key": str}, plus the raw bytes of each of ``members`` (a sample without
    one is skipped as missing_member) and, with ``labels`` (clipx.data.labels.LabelReader), the sample's "label": its classifier row
    (a sample it gives None for is skipped as no_class_label).

    Bad samples are counted and skipped; without ``needs_text`` (image-only objectives) a sample
    needs no caption, and ``transform`` may return a list of augmented views; without ``transform``
    (text-only objectives) no image is decoded or needed, and "image" is None. Each sample's
    augmentation draws from its own generator, seeded by its place in the stream (``sample_rng``);
    so does the choice among its captions (``choose_caption``, data.caption_keys), apart from it.
    """
    usable = "usable caption" if transform is None else "usable image-caption pair" if needs_text else "usable image"
    guard = PassGuard(usable, counter, seen=position.decoded)
    for sample in src:
        index = position.decoded
        position.decoded += 1
        if sample is END_OF_PASS:
            guard.end_of_pass()
            continue
        if sample is LOST:
            continue
        # Its own generator (Python's), so the image's draws below are those of a run without it.
        seed_of_sample = sample_seed(seed, position.epoch, rank, position.worker, index)
        caption = choose_caption(sample, seed_of_sample)
        if caption is None and needs_text:
            counter.add("missing_caption")
            continue
        if any(sample.get(member) is None for member in members):
            counter.add("missing_member")
            continue
        label = labels(sample) if labels is not None else None
        if labels is not None and label is None:
            counter.add("no_class_label")
            continue
        image, reason = None, None
        if transform is not None:
            with sample_rng(seed, position.epoch, rank, position.worker, index):
                image, reason = decode_or_reason(sample, transform)
        if reason is not None:
            counter.add(reason)
            continue
        guard.count()
        counter.add_used()
        yield {"image": image, "text": caption, "negative": choose_caption.negative(sample, seed_of_sample),
               "positive": choose_caption.positive(sample, seed_of_sample), "key": sample["__key__"],
               **{member: sample[member] for member in members},
               **({"label": label} if labels is not None else {})}


def collate_train(src: Iterable[dict], batch_size: int, collate, position: Position,
                  counter: SkipCounter) -> Iterator[dict]:
    """Samples -> batches of ``batch_size`` made by ``collate`` (clipx.data.batch), each carrying the
    worker's position after it; the last partial one is dropped."""
    buffer: list[dict] = []
    for sample in src:
        buffer.append(sample)
        if len(buffer) == batch_size:
            position.batches += 1
            position.skips = counter.local_counts()
            yield {**collate(buffer), POSITION_KEY: position.to_dict()}
            buffer = []

def steps_per_epoch(num_samples: int, global_batch: int, workers: int) -> tuple[int, int]:
    """(batches per rank per epoch, batches per worker): a multiple of the worker count, like open_clip."""
    workers = max(workers, 1)
    per_worker = max(1, math.ceil(math.ceil(num_samples / global_batch) / workers))
    return per_worker * workers, per_worker


class TrainPipeline(IterableDataset):
    """One rank's training stream: each iteration yields one epoch of this worker's batches, from
    the start of the epoch or, once after a resume, from the worker's saved position."""

    def __init__(self, plan: ShardPlan, data_cfg, batch_size: int, transform, collate, epoch: SharedEpoch,
                 counter: SkipCounter, per_worker: int, keep: KeepList | None = None):
        self.plan, self.batch_size, self.transform, self.collate = plan, batch_size, transform, collate
        self.keep = keep  # data.keep's KeepList: pieces and positions count in its shard views
        self.shuffle_buffer, self.epoch, self.counter, self.per_worker = data_cfg.shuffle_buffer, epoch, counter, per_worker
        self.opener = ShardOpener.from_config(data_cfg)
        # The collation says what a sample must provide beyond its image: its caption (and how to
        # choose it), raw members, its label.
        self.choose_caption = getattr(collate, "choose_caption", CaptionChooser())
        self.resume_epoch, self.resume_positions = -1, dict[int, dict]()
        self.remainder: dict | None = None

    def resume_at(self, epoch: int, positions: dict[int, dict]) -> None:
        """Start ``epoch`` from these workers' positions (worker -> Position.to_dict()); call before
        the loader's first iteration, which is when the workers start and copy this object."""
        self.resume_epoch, self.resume_positions = epoch, positions

    def finish_epoch_elsewhere(self, remainder: dict) -> None:
        """Make epoch ``remainder["epoch"]`` read, instead of the plan's shards, what other processes
        left unread: worker w reads ``remainder["pieces"][w]`` (Piece dicts), for
        ``remainder["batches"]`` batches. Call before the loader's first iteration."""
        self.remainder = remainder

    def __iter__(self):
        worker, workers = _worker()
        epoch = self.epoch.get()
        saved = self.resume_positions.get(worker) if epoch == self.resume_epoch else None
        position = Position.from_dict(saved) if saved else Position(epoch, worker, pass_index=epoch)
        self.counter.start_local(position.skips)
        per_worker, tag = self.per_worker, ""
        pieces_of: Callable[[int], list[Piece]] = functools.partial(self.plan.pieces, worker=worker, workers=workers)
        if self.remainder is not None and epoch == self.remainder["epoch"]:
            mine = [Piece.from_dict(p) for p in self.remainder["pieces"][worker]]
            pieces_of, per_worker, tag = (lambda pass_index: mine), self.remainder["batches"], "-remainder"
        new_buffer = lambda p: ShuffleBuffer(self.shuffle_buffer, self.plan.shuffle_rng(epoch, p, worker, tag))  # noqa: E731
        buffer = (restore_shuffle_buffer(pieces_of(position.pass_index), position, new_buffer(position.pass_index),
                                         self.opener, self.counter, self.keep) if saved else None)
        samples = read_passes(pieces_of, position, self.opener, self.counter, self.keep)
        samples = shuffle_samples(samples, buffer, new_buffer, position)
        samples = decode_train_samples(samples, self.transform, self.counter, self.plan.seed, position,
                                       self.plan.rank, self.collate.needs_caption, self.choose_caption,
                                       getattr(self.collate, "members", ()), getattr(self.collate, "labels", None))
        batches = collate_train(samples, self.batch_size, self.collate, position, self.counter)
        yield from itertools.islice(batches, max(per_worker - position.batches, 0))


def build_train_loader(data_cfg, batch_size: int, transform, collate, seed: int, rank: int, world: int,
                       epoch: SharedEpoch, counter: SkipCounter, num_samples: int | None = None,
                       keep: KeepList | None = None):
    """The training loader for this rank and the number of batches it yields per epoch.

    ``transform`` (PIL image -> what a sample holds) and ``collate`` (samples -> batch, with its
    ``needs_caption``) come from the training method. ``num_samples``: the epoch's sample count when
    the caller already knows it (rank 0 reads it and broadcasts it); otherwise from the config or the
    shards' sizes.json. ``keep``: data.keep's keep-list when the caller read it (else read here); the
    plan then deals only the shards it keeps samples of, and an epoch is its kept samples.
    The loader's dataset is a ``TrainPipeline`` (``loader.dataset.resume_at``).
    """
    options = RemoteOptions.from_config(data_cfg)
    keep = keep if keep is not None else load_keep(data_cfg)
    urls = expand_shards(data_cfg.train, "data.train", allow_pipe=data_cfg.allow_pipe_urls, options=options)
    urls = keep.shards(urls) if keep is not None else urls
    workers = data_cfg.workers
    if not data_cfg.resampled and len(urls) < world * max(workers, 1):
        raise ClipxError(
            f"data.train has {len(urls)} shards{' with kept samples' if keep else ''} but {world} rank(s) x "
            f"{max(workers, 1)} worker(s) need at least {world * max(workers, 1)}; write more, smaller shards, "
            "lower data.workers, or set data.resampled=true")
    num_samples = num_samples or data_cfg.train_num_samples or (
        keep.total(urls) if keep is not None else count_samples(urls, options))
    batches, per_worker = steps_per_epoch(num_samples, batch_size * world, workers)
    plan = ShardPlan(tuple(urls), seed, rank, world, data_cfg.resampled)
    pipeline = TrainPipeline(plan, data_cfg, batch_size, transform, collate, epoch, counter, per_worker, keep)
    # Persistent workers: re-entering the loader each epoch would otherwise fork and re-import every
    # worker (seconds per epoch on small data). Workers read the epoch from shared memory when the
    # next epoch's iteration starts, after TrainStream has set it. The loader draws its workers' base
    # seed from its own generator, not the global RNG, so starting an iteration (as a resumed run
    # does) leaves the model's random stream (MoCo's shuffles, dropout) exactly as an unbroken run has it.
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers > 0 else None, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, batches

def worker_error_message(error: ClipxError) -> str:
    """The one-line message of a ClipxError, also when a DataLoader worker re-raised it.

    Re-raised worker errors carry "Caught ClipxError in DataLoader worker ..." and the worker's
    traceback; the original message is the last line, after the exception's qualified name.
    """
    last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    return last.split("ClipxError: ", 1)[-1]

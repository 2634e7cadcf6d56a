"""Streaming webdataset pipelines: shards -> samples -> decoded, transformed, tokenized batches.

We do not hand these loaders to ``accelerator.prepare``: Accelerate would shard the batches across
ranks a second time. Instead ``shard_stream`` splits shards by rank and by data-loader worker itself,
and ``with_epoch`` gives every rank the same number of batches per epoch whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
import random
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipx.data.shards import PIPE_PREFIX, count_samples, expand_shards
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


def shard_stream(urls: list[str], rank: int, world: int, seed: int, epoch: SharedEpoch,
                 resampled: bool) -> Iterator[dict]:
    """Endless stream of {"url": shard} for this rank and worker, pass after pass, each pass
    followed by an END_OF_PASS marker.

    Not resampled: each epoch shuffles the shard list with (seed, epoch), then deals it to ranks and
    then to workers, so no two workers read the same shard in an epoch. Resampled: each worker draws
    shards with replacement from its own seeded generator. The stream never ends on its own; the
    loader's ``with_epoch`` decides how many batches make an epoch.
    """
    worker, workers = _worker()
    current = epoch.get()
    while True:
        if resampled:
            rng = random.Random(f"{seed}-{current}-{rank}-{worker}")
            mine = [rng.choice(urls) for _ in range(len(urls))]
        else:
            order = list(urls)
            random.Random(f"{seed}-{current}").shuffle(order)
            mine = order[rank::world][worker::workers]
        for url in mine:
            yield {"url": url}
        yield END_OF_PASS
        current += 1


def open_shards(src: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Open shards from the local filesystem, or run their ``pipe:`` command.

    The URLs come from ``expand_shards``, which is where ``pipe:`` URLs (a shell command each)
    are refused unless ``data.allow_pipe_urls`` is set.
    """
    for item in src:
        if item is END_OF_PASS:
            yield item
            continue
        url = item["url"]
        try:
            stream = wds.gopen(url, "rb") if url.startswith(PIPE_PREFIX) else open(url, "rb")
        except OSError:
            counter.add("unreadable_shard")
            continue
        try:
            yield {**item, "stream": stream}
        finally:
            try:
                stream.close()
            except OSError:  # a pipe: command that exited non-zero reports it on close
                counter.add("unreadable_shard")


class PassGuard:
    """Fails loudly when a whole pass over a worker's shards yields nothing usable.

    The shard stream is endless, so without this a data set of only corrupt or wrongly named
    members would not end training: it would wait forever for a first batch.
    """

    def __init__(self, what: str, counter: SkipCounter):
        self.what, self.counter = what, counter
        self.seen = 0

    def count(self) -> None:
        self.seen += 1

    def end_of_pass(self) -> None:
        if self.seen == 0:
            raise ClipxError(f"a full pass over the training shards gave no {self.what} (skipped: "
                             f"{self.counter.snapshot()}); check that samples hold .jpg/.png/.webp and .txt")
        self.seen = 0


def tar_samples(src: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Opened tar streams -> samples grouped by key (END_OF_PASS markers pass through).

    Truncated or unreadable tars are counted once and the samples read before the damage still
    count. A key seen earlier in the same shard is a duplicate: the first sample wins. (Keys are
    only checked within a shard: webdataset writers, clipx prep and img2dataset included, make
    keys unique per shard.)
    """
    handler = counter.handler("corrupt_tar")
    guard = PassGuard("readable sample", counter)
    for shard in src:
        if shard is END_OF_PASS:
            guard.end_of_pass()
            yield shard
            continue
        seen: set[str] = set()
        for sample in group_by_keys(tar_file_expander([shard], handler=handler), handler=handler):
            if sample["__key__"] in seen:
                counter.add("duplicate_key")
                continue
            seen.add(sample["__key__"])
            guard.count()
            yield sample


def first_caption(sample: dict) -> str | None:
    """The first non-empty line of the sample's .txt member, or None."""
    captions = all_captions(sample)
    return captions[0] if captions else None


def all_captions(sample: dict) -> list[str]:
    """Every non-empty line of the .txt member (retrieval sets store several captions per image)."""
    raw = sample.get("txt")
    if raw is None:
        return []
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return [line.strip() for line in text.splitlines() if line.strip()]


def sample_image_bytes(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


@contextlib.contextmanager
def sample_rng(seed: int, epoch: int, rank: int, worker: int, index: int):
    """Torch's RNG seeded by the sample's place in the stream, (seed, epoch, rank, worker, index),
    for the length of the block; the caller's RNG state is put back afterwards.

    Random crops and colour jitter then depend only on where a sample sits in the data stream, not
    on when a worker started or what the model drew before: a resumed run that replays its epoch
    sees the very same augmented images, with or without loader workers (with ``data.workers: 0``
    the transforms run in the training process, whose global RNG belongs to the model).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, rank, worker, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        yield


def decode_train_samples(src: Iterable[dict], transform, counter: SkipCounter, seed: int = 0,
                         epoch: SharedEpoch | None = None, rank: int = 0, needs_text: bool = True) -> Iterator[dict]:
    """Raw samples -> {"image": transform's output, "text": str or None, "key": str}.

    Bad samples are counted and skipped; without ``needs_text`` (image-only objectives) a sample
    needs no caption, and ``transform`` may return a list of augmented views. Each sample's
    augmentation draws from its own seeded generator (``sample_rng``).
    """
    current_epoch = epoch.get() if epoch is not None else 0
    worker, _ = _worker()
    guard = PassGuard("usable image-caption pair" if needs_text else "usable image", counter)
    for index, sample in enumerate(src):
        if sample is END_OF_PASS:
            guard.end_of_pass()
            continue
        caption = first_caption(sample)
        if caption is None and needs_text:
            counter.add("missing_caption")
            continue
        with sample_rng(seed, current_epoch, rank, worker, index):
            image, reason = decode_or_reason(sample, transform)
        if reason is not None:
            counter.add(reason)
            continue
        guard.count()
        counter.add_used()
        yield {"image": image, "text": caption, "key": sample["__key__"]}


def decode_or_reason(sample: dict, transform):
    """(transformed image, None), or (None, the skip reason) when the sample's image is unusable."""
    data = sample_image_bytes(sample)
    if data is None:
        return None, "missing_image"
    try:
        return transform(decode_image(data)), None
    except ImageTooLarge:
        return None, "oversized_image"
    except Exception:  # any other decoder failure (garbage, HTML, truncated file) spoils this one sample
        return None, "undecodable_image"


def shuffle_samples(src: Iterable[dict], bufsize: int, seed: int, rank: int, epoch: SharedEpoch) -> Iterator[dict]:
    """A shuffle buffer of ``bufsize`` samples seeded per (seed, epoch, rank, worker): reproducible runs.

    The buffer drains at each END_OF_PASS marker (then passed on): the next pass never overtakes
    this one, and draining needs no peek into the next pass, whose reads would be counted too early.
    """
    worker, _ = _worker()
    rng = random.Random(f"{seed}-{epoch.get()}-{rank}-{worker}")
    buffer: list[dict] = []
    for sample in src:
        if sample is END_OF_PASS:
            rng.shuffle(buffer)
            yield from buffer
            yield sample
            buffer = []
            continue
        buffer.append(sample)
        if len(buffer) >= bufsize:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate_train(src: Iterable[dict], batch_size: int, collate) -> Iterator[dict]:
    """Samples -> batches of ``batch_size`` made by ``collate`` (clipx.data.batch); the last partial
    one is dropped."""
    buffer: list[dict] = []
    for sample in src:
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield collate(buffer)
            buffer = []


def steps_per_epoch(num_samples: int, global_batch: int, workers: int) -> tuple[int, int]:
    """(batches per rank per epoch, batches per worker): a multiple of the worker count, like open_clip."""
    workers = max(workers, 1)
    per_worker = max(1, math.ceil(math.ceil(num_samples / global_batch) / workers))
    return per_worker * workers, per_worker


def build_train_loader(data_cfg, batch_size: int, transform, collate, seed: int, rank: int, world: int,
                       epoch: SharedEpoch, counter: SkipCounter):
    """The training loader for this rank and the number of batches it yields per epoch.

    ``transform`` (PIL image -> what a sample holds) and ``collate`` (samples -> batch, with its
    ``needs_caption``) come from the training method.
    """
    urls = expand_shards(data_cfg.train, "data.train", allow_pipe=data_cfg.allow_pipe_urls)
    workers = data_cfg.workers
    if not data_cfg.resampled and len(urls) < world * max(workers, 1):
        raise ClipxError(
            f"data.train has {len(urls)} shards but {world} rank(s) x {max(workers, 1)} worker(s) need at least "
            f"{world * max(workers, 1)}; write more, smaller shards, lower data.workers, or set data.resampled=true"
        )
    num_samples = data_cfg.train_num_samples or count_samples(urls)
    batches, per_worker = steps_per_epoch(num_samples, batch_size * world, workers)
    pipeline = wds.DataPipeline(
        functools.partial(shard_stream, urls, rank, world, seed, epoch, data_cfg.resampled),
        functools.partial(open_shards, counter=counter),
        functools.partial(tar_samples, counter=counter),
        functools.partial(shuffle_samples, bufsize=data_cfg.shuffle_buffer, seed=seed, rank=rank, epoch=epoch),
        functools.partial(decode_train_samples, transform=transform, counter=counter, seed=seed, epoch=epoch,
                          rank=rank, needs_text=collate.needs_caption),
        functools.partial(collate_train, batch_size=batch_size, collate=collate),
    ).with_epoch(per_worker)
    # Persistent workers: re-entering the loader each epoch would otherwise fork and re-import every
    # worker (seconds per epoch on small data). Workers read the epoch from shared memory when the
    # next epoch's iteration starts, after TrainStream has set it. The loader draws its workers' base
    # seed from its own generator, not the global RNG, so starting an iteration (as a resumed run
    # does) leaves the model's random stream (MoCo's shuffles, dropout) exactly as an unbroken run has it.
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
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

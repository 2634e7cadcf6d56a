"""Shared prep loop: re-encode images in worker processes, skip bad samples, write shards."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, NamedTuple

from tqdm import tqdm

from clipx.errors import ClipxError
from data_prep.images import encode_image
from data_prep.writer import PrepSummary, ShardWriter

# Images per worker task: large enough to amortise pickling, small enough to keep all busy.
CHUNKSIZE = 32


class Sample(NamedTuple):
    """One input row before encoding. `source` is anything `encode_image` takes, or None."""

    source: object
    caption: object
    meta: dict


def write_samples(
    samples: Iterable[Sample],
    out_dir,
    *,
    image_size: int,
    shard_size: int,
    workers: int,
    total: int | None = None,
    desc: str = "prep",
) -> PrepSummary:
    """Encode `samples` in order and write them as shards plus `sizes.json` under `out_dir`.

    Keys are the zero-padded input position, so a skipped row leaves a gap rather than shifting
    later keys. Bad rows are counted by reason (`missing_caption`, `missing_image`,
    `undecodable_image`), never fatal. `workers` <= 1 encodes in this process.
    """
    if image_size < 1:
        raise ClipxError(f"image size must be at least 1, got {image_size}")
    start = time.perf_counter()
    skipped: Counter = Counter()
    with ShardWriter(out_dir, shard_size) as writer, tqdm(
        total=total, desc=desc, unit="samples", dynamic_ncols=True
    ) as bar:
        for index, caption, meta, jpg, reason in _encoded(samples, image_size, workers):
            bar.update(1)
            if reason is not None:
                skipped[reason] += 1
                continue
            writer.add(f"{index:09d}", jpg, caption, meta)
    return PrepSummary(
        written=writer.written,
        skipped=dict(sorted(skipped.items())),
        shards=len(writer.sizes),
        seconds=time.perf_counter() - start,
        out_dir=str(out_dir),
    )


def check_columns(available, wanted: dict[str, str], where: str) -> None:
    """Raise one ClipxError line if a wanted column is absent; `wanted` maps CLI flag -> column."""
    available = [str(c) for c in available]
    for flag, column in wanted.items():
        if column not in available:
            listed = ", ".join(available) or "none"
            raise ClipxError(f"{where} has no column '{column}' (columns: {listed}); pass {flag}")


def is_missing(value) -> bool:
    """True for None, NaN (pandas' empty cell) and blank strings."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def clean_caption(value) -> str | None:
    """The caption as stripped text, or None when it is missing or blank."""
    if is_missing(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return str(value).strip() or None


def _encoded(samples: Iterable[Sample], size: int, workers: int) -> Iterator[tuple]:
    """Yield (index, caption, meta, jpg, reason) in input order."""
    windows = _windows(samples, window=max(1, workers) * CHUNKSIZE * 4)
    if workers <= 1:
        for window in windows:
            yield from _merge(window, map(_encode_task, _tasks(window, size)))
        return
    # spawn, not fork: the parent may hold threads (tqdm, torch, datasets) that a fork
    # would copy mid-lock; workers import only PIL and numpy, so start-up stays cheap. An executor,
    # not a Pool: a worker that dies (e.g. a script without a __main__ guard, which spawned workers
    # re-run) breaks the executor with an error, where a Pool would respawn it forever and hang.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(min(workers, os.cpu_count() or workers), mp_context=context) as pool:
            # map() submits a whole window at once; feeding it window by window, with one window
            # queued ahead, bounds memory while keeping the workers busy.
            pending: deque = deque()
            for window in windows:
                pending.append((window, pool.map(_encode_task, _tasks(window, size), chunksize=CHUNKSIZE)))
                if len(pending) > 1:
                    yield from _merge(*pending.popleft())
            while pending:
                yield from _merge(*pending.popleft())
    except BrokenProcessPool:
        raise ClipxError("a prep worker process died; from a script, call prep under `if __name__ == "
                         "\"__main__\":` (spawned workers re-run the script), or use workers=0") from None


def _windows(samples: Iterable[Sample], window: int) -> Iterator[list]:
    """Group samples into lists of (index, caption, sample); caption None means missing."""
    batch = []
    for index, sample in enumerate(samples):
        batch.append((index, clean_caption(sample.caption), sample))
        if len(batch) == window:
            yield batch
            batch = []
    if batch:
        yield batch


def _tasks(window: list, size: int) -> list:
    # Rows without a caption are skipped before any image work is spent on them.
    return [(sample.source, size) for _, caption, sample in window if caption is not None]


def _merge(window: list, results: Iterator) -> Iterator[tuple]:
    for index, caption, sample in window:
        if caption is None:
            yield index, None, sample.meta, None, "missing_caption"
            continue
        jpg, reason = next(results)
        yield index, caption, sample.meta, jpg, reason


def _encode_task(task: tuple) -> tuple[bytes | None, str | None]:
    """Worker entry point: (source, size) -> (jpg, None) or (None, skip reason)."""
    source, size = task
    if source is None:
        return None, "missing_image"
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        return None, "missing_image"
    jpg = encode_image(source, size)
    return (jpg, None) if jpg is not None else (None, "undecodable_image")

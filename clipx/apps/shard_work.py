"""Work over a set of shards, shard by shard, in one process, several spawned ones, or one per rank
of a launcher (srun, torchrun, an MPI launcher): what `clipx curate score`, `clipx caption` and
`clipx prep reinforce` share.

A job is a frozen dataclass with ``device`` and ``threads`` fields; a part function
``part(job, urls) -> dict of counts`` does the work of the shards ``urls``. Shards are dealt by
their place in the list (rank r of N takes every N-th from the r-th), and a shard already done is
skipped, so any process count writes what one process writes and a rerun resumes.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Callable, Iterator

import torch

from clipx.data.opener import ShardOpener
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples
from clipx.errors import ClipxError


def run_parts(part: Callable, job, urls: list[str], processes: int, done: Callable[[str], bool]) -> dict:
    """Run ``part`` over the shards of ``urls`` not ``done``: this process's share under a launcher,
    else all of them here (``processes`` 1) or in that many spawned processes; the summed counts."""
    slot = launcher_slot(os.environ)
    if slot is not None:
        rank, world, local_rank = slot
        return part(replace(job, device=device_of(job.device, local_rank)),
                    [url for url in urls[rank::world] if not done(url)]) or {}
    if processes == 1:
        return part(job, [url for url in urls if not done(url)]) or {}
    # spawn, not fork: the parent holds torch's threads. Each process gets an equal share of the cores.
    threads = max(1, (os.cpu_count() or processes) // processes)
    shares = [[url for url in urls[rank::processes] if not done(url)] for rank in range(processes)]
    totals: dict = {}
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(part, replace(job, threads=threads, device=device_of(job.device, rank)), share)
                   for rank, share in enumerate(shares) if share]
        for future in futures:
            for name, value in (future.result() or {}).items():
                totals[name] = totals.get(name, 0) + value
    return totals


def is_writer(env=os.environ) -> bool:
    """Whether this process writes what one process of a launched group writes (rank 0, or alone)."""
    slot = launcher_slot(env)
    return slot is None or slot[0] == 0


def launcher_slot(env) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher started this process among others, else None."""
    from clipx.cluster_env import placement

    if env.get("WORLD_SIZE") and int(env["WORLD_SIZE"]) > 1:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    where = placement(env)
    if where is None or where.world_size <= 1:
        return None
    return where.rank, where.world_size, where.local_rank


def device_of(device: str, local_rank: int) -> str:
    """``device`` for the process of ``local_rank``: a bare "cuda" becomes that process's own GPU."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def shard_samples_of(opener: ShardOpener, url: str) -> Iterator[tuple[int, dict]]:
    """The numbered samples of shard ``url``; an unreadable shard is a one-line error."""
    try:
        with opener.open(url) as stream:
            yield from shard_samples(stream, SkipCounter())
    except OSError as error:
        raise ClipxError(f"cannot read shard {url}: {error}") from None


def batches_of(samples, size: int) -> Iterator[list]:
    """``samples`` in lists of ``size`` (the last one shorter)."""
    iterator = iter(samples)
    while batch := list(itertools.islice(iterator, size)):
        yield batch

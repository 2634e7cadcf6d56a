"""Opening and reading shards wherever they live: a local path, a ``pipe:`` command, or a remote URL
(streamed, or through the local cache). A shard that cannot be opened, or whose ``pipe:`` command
fails, counts as an unreadable shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, cast

import webdataset as wds

from clipx.data.cache import ShardCache
from clipx.data.keep import KeepList
from clipx.data.position import Piece
from clipx.data.remote import RemoteOptions, RemoteShard, is_remote, local_path
from clipx.data.shards import PIPE_PREFIX
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples


@dataclass
class ShardOpener:
    """Opens shards for the readers; picklable (the cache and its prefetch thread are made in the
    process that first uses them)."""

    options: RemoteOptions = field(default_factory=RemoteOptions)
    cache_dir: str | None = None
    cache_bytes: int | None = None
    _cache: ShardCache | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, data_cfg) -> "ShardOpener":
        return cls(RemoteOptions.from_config(data_cfg), data_cfg.cache_dir, data_cfg.cache_bytes)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def cache(self) -> ShardCache | None:
        if self.cache_dir is not None and self._cache is None:
            self._cache = ShardCache(self.cache_dir, self.cache_bytes, self.options)
        return self._cache

    def open(self, url: str) -> IO[bytes]:
        """A readable stream of the shard; raises OSError (ShardUnreadable for remote failures)."""
        if url.startswith(PIPE_PREFIX):
            return wds.gopen(url, "rb")
        if is_remote(url):
            cache = self.cache()
            if cache is not None:
                return cache.open(url)
            return cast(IO[bytes], RemoteShard(url, self.options))
        return open(local_path(url), "rb")

    def prefetch(self, url: str) -> None:
        """Start fetching ``url`` into the cache, if there is one and the shard is remote."""
        cache = self.cache()
        if cache is not None and is_remote(url):
            cache.prefetch(url)


def open_shards(src: Iterable[dict], counter: SkipCounter, opener: ShardOpener | None = None) -> Iterator[dict]:
    """{"url"} items -> {"url", "stream"}; a shard that cannot be opened counts as unreadable.

    The URLs come from ``expand_shards``, which is where ``pipe:`` URLs (a shell command each)
    are refused unless ``data.allow_pipe_urls`` is set.
    """
    opener = opener or ShardOpener()
    for item in src:
        stream = _open_counted(opener, item["url"], counter)
        if stream is None:
            continue
        try:
            yield {**item, "stream": stream}
        finally:
            _close_counted(stream, counter)


def _open_counted(opener: ShardOpener, url: str, counter: SkipCounter | None):
    try:
        return opener.open(url)
    except OSError:  # missing, refused, or a network failure that outlived its retries
        if counter is not None:
            counter.add("unreadable_shard")
        return None


def _close_counted(stream, counter: SkipCounter | None) -> None:
    try:
        stream.close()
    except OSError:  # a pipe: command that exited non-zero reports it on close
        if counter is not None:
            counter.add("unreadable_shard")


def tar_samples(src: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Opened tar streams -> samples grouped by key; see ``clipx.data.tar_reader`` for what counts
    as damage and how it is counted."""
    for shard in src:
        for _, sample in shard_samples(shard["stream"], counter):
            yield sample


def read_shard(opener: ShardOpener, piece: Piece, counter: SkipCounter, first: int = 0,
               keep: KeepList | None = None) -> Iterator[tuple[int, dict]]:
    """(index, sample) of a piece of a shard: its samples from index ``first`` on, up to its stop; or
    only the ``wanted`` ones, uncounted (whatever lies between them was counted by an earlier run).

    With ``keep`` (data.keep), indices, the piece's bounds and ``first`` are numbers in the shard's
    view, its kept samples renumbered 0..n-1 (clipx.data.keep); a shard it keeps nothing of yields
    nothing and is not opened.
    """
    view = keep.of(piece.url) if keep is not None else None
    wanted = {i for i in piece.wanted if i >= first} if piece.wanted is not None else None
    start = max(first, piece.start)
    # Nothing left: an unbroken read returned right after the piece's last sample, counting nothing more.
    if wanted == set() or (keep is not None and view is None) or (piece.stop is not None and start >= piece.stop):
        return
    quiet = wanted is not None
    stream = _open_counted(opener, piece.url, None if quiet else counter)
    if stream is None:
        return
    try:
        if view is not None:
            yield from view.samples(stream, counter, piece.url, start, piece.stop, wanted)
            return
        for index, sample in shard_samples(stream, counter, first=start, wanted=wanted):
            if piece.stop is not None and index >= piece.stop:
                return
            yield index, sample
            if piece.stop is not None and index + 1 >= piece.stop:
                return
    finally:
        _close_counted(stream, None if quiet else counter)

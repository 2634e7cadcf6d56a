"""Opening a shard wherever it lives: a local path, a ``pipe:`` command, or a remote URL (streamed,
or through the local cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

import webdataset as wds

from clipx.data.cache import ShardCache
from clipx.data.remote import RemoteOptions, RemoteShard, is_remote, local_path
from clipx.data.shards import PIPE_PREFIX


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
                return open(cache.local(url), "rb")
            return RemoteShard(url, self.options)
        return open(local_path(url), "rb")

    def prefetch(self, url: str) -> None:
        """Start fetching ``url`` into the cache, if there is one and the shard is remote."""
        cache = self.cache()
        if cache is not None and is_remote(url):
            cache.prefetch(url)

"""A local disk cache of remote shards, bounded in bytes, evicted least recently used.

With ``data.cache_dir`` set, a worker about to read a remote shard reads it from the cache, fetching
it first when absent, and meanwhile fetches the next shard of its list in a background thread, so
the network and the decoding overlap. A second epoch over a bucket then reads local disk.

Several workers and ranks on one machine may share the folder: a shard is written under a temporary
name and renamed into place, so a reader sees a whole shard or none; a use refreshes the file's
modification time, which is the recency that eviction orders by; and deleting a file another
process is reading is harmless on POSIX (the reader keeps its open handle).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from clipx.data.remote import RemoteOptions, RemoteShard, ShardUnreadable

TMP_SUFFIX = ".part"


class ShardCache:
    """Remote shards on local disk, within ``max_bytes`` (None: unbounded)."""

    def __init__(self, folder: str | Path, max_bytes: int | None, options: RemoteOptions):
        self.folder, self.max_bytes, self.options = Path(folder), max_bytes, options
        self._prefetch: threading.Thread | None = None
        self._prefetching: str | None = None  # the URL the background fetch is getting

    def path_of(self, url: str) -> Path:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{url.rsplit('/', 1)[-1]}"

    def open(self, url: str):
        """The cached copy of ``url``, opened for reading (fetched now if it is not there); raises
        ShardUnreadable."""
        if self._prefetching == url:  # being fetched already: wait for it rather than fetch it twice
            self.wait_for_prefetch()
        path = self.path_of(url)
        try:
            stream = open(path, "rb")
            os.utime(path)  # recently used
            return stream
        except FileNotFoundError:  # not cached, or evicted by another worker a moment ago
            return open(self._fetch(url), "rb")

    def prefetch(self, url: str) -> None:
        """Fetch ``url`` in the background if it is not cached (one fetch at a time per worker)."""
        self.wait_for_prefetch()
        if self.path_of(url).is_file():
            return
        self._prefetch = threading.Thread(target=self._fetch_quietly, args=(url,), daemon=True)
        self._prefetching = url
        self._prefetch.start()

    def wait_for_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch, self._prefetching = None, None

    def _fetch_quietly(self, url: str) -> None:
        try:
            self._fetch(url)
        except (ShardUnreadable, OSError):
            pass  # the reader will try again when it needs the shard, and count it if it fails then

    def _fetch(self, url: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_of(url)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
        source = RemoteShard(url, self.options)
        try:
            with open(tmp, "wb") as out:
                while chunk := source.read(self.options.block_bytes):
                    out.write(chunk)
            self.make_room(source.size, keep=path)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def make_room(self, incoming: int, keep: Path) -> None:
        """Delete the least recently used shards until ``incoming`` more bytes fit the budget."""
        if self.max_bytes is None:
            return
        entries = []
        for path in self.folder.iterdir():
            if path.name.endswith(TMP_SUFFIX) or path == keep:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another worker meanwhile
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        used = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if used + incoming <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            used -= size

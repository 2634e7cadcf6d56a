"""Shards in object stores and behind HTTP: s3://, gs://, https://, hf:// through fsspec.

A remote shard is read as a seekable file made of ranged reads (``RemoteShard``): the tar reader
streams it block by block without downloading it first, skips samples by seeking (only the blocks
that hold tar headers are fetched), and a failed read is retried for its own block only, so bytes
already handed on are never fetched again. S3, HTTP and GCS requests have a connect and read
timeout (a stalled connection fails, it never hangs; hf:// keeps huggingface_hub's own),
and transient failures (resets, timeouts, 5xx, throttling) are retried with exponential backoff;
what still fails raises ``ShardUnreadable``, which the readers count as an ``unreadable_shard`` and
step over. Credentials come from each library's standard places (environment variables, profile
files, instance metadata), never from clipx's config; the S3 endpoint may be set for S3-compatible
stores (``data.endpoint_url``, or botocore's own ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from clipx.errors import ClipxError

LOCAL_PROTOCOLS = ("file", "local")
# The package each well-known protocol needs, for the message when it is missing.
PROTOCOL_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
                     "hf": "huggingface_hub"}


class ShardUnreadable(OSError):
    """A shard that could not be read even after the retries: counted as an unreadable shard."""


def protocol_of(url: str) -> str | None:
    """"s3" for "s3://bucket/x.tar"; None for local paths (and "file://" URLs) and pipe: commands."""
    if "://" not in url:
        return None
    protocol = url.split("://", 1)[0].lower()
    return None if protocol in LOCAL_PROTOCOLS else protocol


def is_remote(url: str) -> bool:
    return protocol_of(url) is not None


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are reached; picklable, so data-loader workers get a copy."""

    endpoint_url: str | None = None  # S3-compatible store (MinIO, Ceph, R2); None: AWS or AWS_ENDPOINT_URL
    timeout: float = 60.0  # seconds to connect, and to wait for each read
    retries: int = 5  # attempts per request before the shard counts as unreadable
    backoff: float = 0.5  # seconds before the first retry; doubles with each further attempt, up to 30 s
    block_bytes: int = 8 << 20  # bytes per ranged read

    @classmethod
    def from_config(cls, data_cfg) -> "RemoteOptions":
        return cls(endpoint_url=data_cfg.endpoint_url, timeout=data_cfg.io_timeout, retries=data_cfg.io_retries,
                   backoff=data_cfg.io_backoff, block_bytes=data_cfg.io_block_bytes)


_filesystems: dict[tuple[int, str, RemoteOptions], Any] = {}


def filesystem(protocol: str, options: RemoteOptions):
    """The fsspec filesystem for ``protocol``, one per process: fsspec's async clients hold an event
    loop and connections that must not be shared by forked data-loader workers."""
    key = (os.getpid(), protocol, options)
    if key not in _filesystems:
        _filesystems[key] = _new_filesystem(protocol, options)
    return _filesystems[key]


def filesystem_for(url: str, options: RemoteOptions):
    """The filesystem that reads ``url`` (see ``filesystem``)."""
    return filesystem(protocol_of(url) or "file", options)


def _new_filesystem(protocol: str, options: RemoteOptions):
    import fsspec

    kwargs: dict[str, Any] = {"skip_instance_cache": True}
    if protocol == "s3":
        # clipx retries itself (counted, bounded, the same for every store): botocore and s3fs try once.
        kwargs["config_kwargs"] = {"connect_timeout": options.timeout, "read_timeout": options.timeout,
                                   "retries": {"total_max_attempts": 1, "mode": "standard"}}
        if options.endpoint_url:
            kwargs["client_kwargs"] = {"endpoint_url": options.endpoint_url}
    elif protocol in ("http", "https", "gs", "gcs"):  # aiohttp clients; gcsfs calls them session_kwargs
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout, sock_read=options.timeout)
        kwargs["client_kwargs" if protocol.startswith("http") else "session_kwargs"] = {"timeout": timeout}
    try:
        fs = fsspec.filesystem(protocol, **kwargs)
    except (ImportError, ValueError) as error:
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec filesystem for {protocol}://")
        raise ClipxError(f"cannot read {protocol}:// shards: {package} is not installed or failed to load "
                         f"({str(error).splitlines()[0][:120]}); pip install {package}") from None
    if protocol == "s3":
        fs.retries = 1
    return fs


PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retrying(call: Callable[[], Any], what: str, options: RemoteOptions, sleep=time.sleep):
    """``call()``, retried on transient failures with exponential backoff; raises ShardUnreadable
    when it still fails (at once for a missing object or a refused permission)."""
    for attempt in range(options.retries):
        try:
            return call()
        except PERMANENT as error:
            raise ShardUnreadable(f"{what}: {type(error).__name__}: {error}") from None
        except Exception as error:  # resets, timeouts, 5xx, throttling: the network's, not the data's
            last = error
            if attempt + 1 < options.retries:
                sleep(min(options.backoff * 2 ** attempt, 30.0))
    raise ShardUnreadable(f"{what}: gave up after {options.retries} attempts ({type(last).__name__}: "
                          f"{str(last)[:200]})")


class RemoteShard(io.RawIOBase):
    """A remote object as a seekable, read-only file: ranged reads of ``options.block_bytes``, the
    latest block kept, each read retried on its own."""

    def __init__(self, url: str, options: RemoteOptions):
        super().__init__()
        self.url, self.options = url, options
        self.fs = filesystem_for(url, options)
        self.size = int(retrying(lambda: self.fs.size(url), f"{url} (size)", options))
        self.pos, self.block_start, self.block = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes (fewer only at the end of the object): tarfile treats a short read
        as a truncated archive."""
        end = self.size if size is None or size < 0 else min(self.size, self.pos + size)
        parts = []
        while self.pos < end:
            if not self.block_start <= self.pos < self.block_start + len(self.block):
                self._fetch(self.pos)
            offset = self.pos - self.block_start
            part = self.block[offset: offset + end - self.pos]
            parts.append(part)
            self.pos += len(part)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _fetch(self, start: int) -> None:
        end = min(start + self.options.block_bytes, self.size)
        data = retrying(lambda: self.fs.cat_file(self.url, start=start, end=end),
                        f"{self.url} (bytes {start}-{end})", self.options)
        if len(data) == self.size:  # a server that ignores ranges sent the whole object: keep it all
            self.block_start, self.block = 0, data
            return
        if len(data) != end - start:
            raise ShardUnreadable(f"{self.url}: asked for bytes {start}-{end}, got {len(data)} bytes")
        self.block_start, self.block = start, data


def read_remote_bytes(url: str, options: RemoteOptions) -> bytes:
    """A whole (small) remote object, such as sizes.json, with retries."""
    fs = filesystem_for(url, options)
    return retrying(lambda: fs.cat_file(url), url, options)


def list_remote(pattern: str, options: RemoteOptions) -> list[str]:
    """Remote objects matching a glob, as full URLs (stores that can list: s3, gs, hf)."""
    fs = filesystem_for(pattern, options)
    return [fs.unstrip_protocol(path) for path in retrying(lambda: fs.glob(pattern), pattern, options)]

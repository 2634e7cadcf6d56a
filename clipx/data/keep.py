"""Keep-lists: training on the samples a curation kept (``data.keep``), without rewriting the shards.

``clipx curate apply`` writes ``keep.parquet``: one row per kept sample, ``shard`` (the shard
file's basename), ``index`` (the sample's index in that shard, as clipx.data.tar_reader numbers
it) and ``key`` (its ``__key__``), sorted by shard, then index. A keep-list defines a *view* of
each shard: its kept samples renumbered 0..n-1 in shard order. Everything above the shard reader
(data positions, shard sizes, elastic pieces, the shuffle replay) works in view numbers and does
not know a keep-list exists; only ``ShardView.samples`` translates, so a resume stays exact.

Per shard the list is two numpy arrays (indices, and keys as bytes), not Python objects: pools
have millions of rows, and loader workers forked from the process share them without copying.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from clipx.data.remote import RemoteOptions, ShardUnreadable, is_remote, local_path, read_remote_bytes
from clipx.data.shards import PIPE_PREFIX
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples
from clipx.errors import ClipxError

KEEP_FILE = "keep.parquet"
COLUMNS = ("shard", "index", "key")


def shard_name(url: str) -> str:
    """The basename a keep-list names a shard by: "000003.tar" for ".../000003.tar"; for a ``pipe:``
    command, its last word ending in .tar (``pipe:aws s3 cp s3://b/000003.tar -``)."""
    if url.startswith(PIPE_PREFIX):
        words = [w for w in url[len(PIPE_PREFIX):].split() if w.endswith(".tar")]
        url = words[-1] if words else url
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, eq=False)
class ShardView:
    """The kept samples of one shard: view sample v is shard sample ``indices[v]``, keyed ``keys[v]``."""

    name: str
    indices: np.ndarray  # (n,) int32, ascending
    keys: np.ndarray  # (n,) bytes (UTF-8), fixed width

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, v: int) -> str:
        return self.keys[v].decode("utf-8")

    def samples(self, stream: IO[bytes], counter: SkipCounter, url: str, start: int = 0, stop: int | None = None,
                wanted: set[int] | None = None) -> Iterator[tuple[int, dict]]:
        """(view index, sample) of the kept samples of an opened shard from view index ``start`` up to
        ``stop``, or only the ``wanted`` ones (uncounted), as ``read_shard`` asks for them.

        The reader starts right after shard sample ``indices[start - 1]``, not at ``indices[start]``:
        what lies between (a duplicate key, damage) was not yet counted by the run that handed view
        sample ``start - 1`` on, so it is counted now, exactly as by an unbroken read. Samples not
        kept are not data: they are stepped over unread and never counted.
        """
        end = len(self) if stop is None else min(stop, len(self))
        if wanted is not None:
            reader = shard_samples(stream, counter, wanted={int(self.indices[v]) for v in wanted if v < len(self)})
        else:
            begin = min(start, len(self))
            first = int(self.indices[begin - 1]) + 1 if begin else 0
            reader = shard_samples(stream, counter, first=first, keep=self.indices[begin:end])
        for index, sample in reader:
            v = int(np.searchsorted(self.indices, index))
            if sample["__key__"] != self.key(v):
                raise ClipxError(f"data.keep was written for other shards: {url} sample {index} is "
                                 f"{sample['__key__']!r}, the keep-list says {self.key(v)!r}; curate these shards again")
            yield v, sample
            if wanted is None and stop is not None and v + 1 >= stop:
                return


class KeepList:
    """The kept samples of each shard, by shard basename (``of``), read from a keep.parquet."""

    def __init__(self, views: dict[str, ShardView], source: str = KEEP_FILE):
        self.views, self.source = views, source

    def fingerprint(self) -> str:
        """A digest of which samples the list keeps: data positions count kept samples, so a
        checkpoint's positions hold only under the list they were counted in."""
        digest = hashlib.sha1()
        for name in sorted(self.views):
            digest.update(name.encode("utf-8") + b"\0")
            digest.update(np.ascontiguousarray(self.views[name].indices, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def of(self, url: str) -> ShardView | None:
        """The shard's view; None when the list names no sample of it (it keeps nothing there)."""
        return self.views.get(shard_name(url))

    def sizes(self, urls: list[str]) -> dict[str, int]:
        """Kept samples per shard of ``urls`` (0 for a shard the list does not name)."""
        sizes = {}
        for url in urls:
            view = self.of(url)
            sizes[url] = len(view) if view is not None else 0
        return sizes

    def total(self, urls: list[str]) -> int:
        """Kept samples in ``urls``: an epoch's length."""
        return sum(self.sizes(urls).values())

    def shards(self, urls: list[str]) -> list[str]:
        """The shards of ``urls`` that keep samples, in order: the ones training deals. Raises when
        there are none (a keep-list written for other shards)."""
        kept = [url for url, n in self.sizes(urls).items() if n]
        if not kept:
            raise ClipxError(f"data.keep ({self.source}) keeps no sample of data.train's {len(urls)} shards (first "
                             f"{shard_name(urls[0])!r}); point data.keep at the keep-list curated from these shards")
        return kept

    @classmethod
    def read(cls, path: str, options: RemoteOptions | None = None) -> "KeepList":
        """A keep.parquet, or a folder holding one, local or remote (fsspec, as shards are read)."""
        import pyarrow as pa

        source = keep_file(path)
        keep = cls.from_table(_read_table(source, options or RemoteOptions()), source)
        # Arrow's allocator keeps the table's memory (4-5x the views': 800 MiB at 10M rows) unless asked.
        pa.default_memory_pool().release_unused()
        return keep

    @classmethod
    def from_table(cls, table, source: str = KEEP_FILE) -> "KeepList":
        """From a pyarrow Table with the keep.parquet columns; raises a one-line ClipxError naming
        data.keep on missing columns, nulls, or indices unsorted or repeated within a shard."""
        import pyarrow as pa
        import pyarrow.compute as pc

        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ClipxError(f"data.keep: {source} has no column(s) {', '.join(missing)} (a keep-list has shard, "
                             f"index, key); write it with `clipx curate apply`")
        if any(table.column(c).null_count for c in COLUMNS):
            raise ClipxError(f"data.keep: {source} has empty (null) shard, index or key values; write it again")
        if not pa.types.is_integer(table.schema.field("index").type):
            raise ClipxError(f"data.keep: {source} column index is {table.schema.field('index').type}, not an "
                             "integer; write it with `clipx curate apply`")
        n = table.num_rows
        if n == 0:
            return cls({}, source)
        try:
            shard = pc.cast(table.column("shard"), pa.string()).combine_chunks()
            index = table.column("index").to_numpy().astype(np.int64)
            keys = pc.cast(table.column("key"), pa.large_binary()).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError, ValueError) as error:
            raise ClipxError(f"data.keep: {source} has columns of the wrong types ({_first_line(error)}); shard and "
                             f"key are strings, index an integer") from None
        begins = np.ones(n, dtype=bool)  # where a run of one shard's rows begins
        begins[1:] = pc.not_equal(shard.slice(1), shard.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts: list[int] = np.flatnonzero(begins).tolist()
        names = shard.take(pa.array(starts)).to_pylist()
        _check_order(source, names, index, begins)
        _, offsets, data = keys.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int64)[keys.offset:keys.offset + n + 1]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
        views = {name: ShardView(name, index[a:b].astype(np.int32), _fixed_width(offsets, data, a, b))
                 for name, a, b in zip(names, starts, [*starts[1:], n])}
        return cls(views, source)


def _fixed_width(offsets: np.ndarray, data: np.ndarray, a: int, b: int) -> np.ndarray:
    """Keys a..b-1 of an Arrow binary column (its ``offsets`` and ``data`` buffers) as a (b - a,)
    fixed-width bytes array, made without a Python object per key."""
    lengths = np.diff(offsets[a:b + 1])
    width = max(int(lengths.max()), 1)
    out = np.zeros((b - a, width), dtype=np.uint8)
    out[np.arange(width) < lengths[:, None]] = data[offsets[a]:offsets[b]]  # row-major: the keys in turn
    return out.view(f"S{width}").ravel()


def _check_order(source: str, names: list[str], index: np.ndarray, begins: np.ndarray) -> None:
    if len(set(names)) != len(names):
        again = next(name for i, name in enumerate(names) if name in names[:i])
        raise ClipxError(f"data.keep: {source} lists shard {again} in two places; sort it by shard, then index")
    if index.min() < 0 or index.max() >= 2 ** 31:
        raise ClipxError(f"data.keep: {source} has an index outside 0..2^31-1 ({index.min()}..{index.max()}); "
                         "write it with `clipx curate apply`")
    bad = np.flatnonzero((np.diff(index) <= 0) & ~begins[1:])
    if len(bad):
        row = int(bad[0]) + 1
        run = names[int(np.count_nonzero(begins[:row + 1])) - 1]
        raise ClipxError(f"data.keep: {source} row {row}: index {index[row]} of {run} follows {index[row - 1]} "
                         f"(unsorted or repeated); sort it by shard, then index, each sample once")


def keep_file(path: str) -> str:
    """The keep.parquet that ``path`` names: itself, or the one in the folder it names."""
    if is_remote(path):
        return path if path.endswith(".parquet") else f"{path.rstrip('/')}/{KEEP_FILE}"
    local = Path(local_path(path))
    if local.is_dir():
        if not (local / KEEP_FILE).is_file():
            raise ClipxError(f"data.keep: folder {path} holds no {KEEP_FILE}; run `clipx curate apply` first, "
                             "or point data.keep at the keep-list")
        return str(local / KEEP_FILE)
    if not local.is_file():
        raise ClipxError(f"data.keep: {path} does not exist; point it at a keep.parquet (or the folder holding it)")
    return str(local)


def _read_table(source: str, options: RemoteOptions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data: str | IO[bytes] = io.BytesIO(read_remote_bytes(source, options)) if is_remote(source) else source
        table = pq.ParquetFile(data)
        return table.read(columns=[c for c in COLUMNS if c in table.schema_arrow.names])
    except ShardUnreadable as error:
        raise ClipxError(f"data.keep: cannot read {_first_line(error)}; check the URL, the endpoint (data.endpoint_url) "
                         "and the credentials in your environment") from None
    except (pa.ArrowException, OSError) as error:
        raise ClipxError(f"data.keep: {source} is not a readable parquet file ({_first_line(error)}); write it "
                         "with `clipx curate apply`") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def load_keep(data_cfg) -> KeepList | None:
    """The config's keep-list (``data.keep``), or None when it sets none."""
    if not getattr(data_cfg, "keep", None):
        return None
    return KeepList.read(data_cfg.keep, RemoteOptions.from_config(data_cfg))

"""Deterministic webdataset tar writer (img2dataset layout) and the summary of a prep run."""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic

SIZES_FILE = "sizes.json"


@dataclass
class PrepSummary:
    """What one prep run produced: counts, skip reasons, shard count, wall time, output dir."""

    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    seconds: float = 0.0
    out_dir: str = ""

    def format(self) -> str:
        """One-paragraph human summary, e.g. for the CLI."""
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"Wrote {self.written} samples to {self.shards} shard(s) in {self.out_dir} "
            f"({self.seconds:.1f} s, {rate:.0f} samples/s)"
        )
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            return f"{text}; skipped {total} ({reasons})."
        return f"{text}; skipped none."

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


class ShardWriter:
    """Write samples into `{prefix}-NNNNNN.tar` shards of `shard_size`, then `sizes.json`.

    Use as a context manager. Tar headers carry no time, owner or umask, so identical inputs
    give byte-identical shards. Each shard is written under a `.tmp` name and renamed when
    full, so a crash never leaves a truncated shard under a final name. On a clean close,
    shards with this prefix left over from an earlier, larger run are removed: a shard glob
    would otherwise mix old samples into the new data set.
    """

    def __init__(self, out_dir, shard_size: int = 10_000, prefix: str = "shard"):
        if shard_size < 1:
            raise ClipxError(f"shard size must be at least 1, got {shard_size}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ClipxError(f"shard prefix must be a plain file name part, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.prefix = prefix
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        make_dir(self.out_dir)
        # An old sizes.json next to half-rewritten shards would describe the wrong data.
        (self.out_dir / SIZES_FILE).unlink(missing_ok=True)

    @property
    def written(self) -> int:
        """Samples added so far, across finished shards and the open one."""
        return sum(self.sizes.values()) + self._count

    def add(self, key: str, jpg: bytes, caption: str, meta: dict) -> None:
        """Append one sample as `{key}.jpg`, `{key}.txt` and `{key}.json`."""
        self._append(key, [("jpg", jpg), ("txt", caption.encode("utf-8")), ("json", _meta_bytes(meta))])

    def add_text(self, key: str, texts: dict[str, str], meta: dict) -> None:
        """Append a text-only sample: `{key}.{ext}` for each (ext, text) of `texts` in order, then
        `{key}.json`; e.g. texts={"txt": sentence, "pos.txt": paraphrase}."""
        for ext in texts:
            if not ext or ext.startswith(".") or "/" in ext or ext == "json":
                raise ValueError(f"text member extension must be plain and not 'json', got {ext!r}")
        members = [(ext, text.encode("utf-8")) for ext, text in texts.items()]
        self._append(key, members + [("json", _meta_bytes(meta))])

    def _append(self, key: str, members: list[tuple[str, bytes]]) -> None:
        _check_key(key)
        if self._tar is None or self._count >= self.shard_size:
            self._open_next()
        tar = self._tar
        assert tar is not None  # _open_next always leaves a shard open
        for ext, data in members:
            add_member(tar, f"{key}.{ext}", data)
        self._count += 1

    def close(self) -> dict[str, int]:
        """Finish the open shard, drop stale shards, write `sizes.json`; return the sizes."""
        self._finish()
        self._remove_stale()
        write_json_atomic(self.out_dir / SIZES_FILE, self.sizes)
        return self.sizes

    def abort(self) -> None:
        """Drop the unfinished shard; finished shards stay, `sizes.json` is not written."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_next(self) -> None:
        self._finish()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._count = 0
        self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp_path(), self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar, self._count = None, 0

    def _tmp_path(self) -> Path:
        return self.out_dir / f"{self._name}.tmp"

    def _remove_stale(self) -> None:
        pattern = re.compile(re.escape(self.prefix) + r"-\d{6}\.tar")
        for path in self.out_dir.iterdir():
            if pattern.fullmatch(path.name) and path.name not in self.sizes:
                path.unlink()


def jsonable(value):
    """Turn table/dataset values (numpy scalars, NaN, bytes, dates) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is how pandas spells "empty cell"; JSON has no NaN
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # binary blobs do not belong in the metadata record
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(jsonable(meta), ensure_ascii=False, allow_nan=False).encode()


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise ClipxError(f"output path {path} exists and is not a directory; pass another --out") from error


def _check_key(key: str) -> None:
    # webdataset splits a member name at its first dot into key and extension.
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be non-empty without '.' or '/', got {key!r}")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed header fields make shards reproducible byte for byte
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))

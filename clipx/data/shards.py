"""Shard lists: brace expansion, existence checks and sample counts from sizes.json, for local
paths and remote URLs (clipx.data.remote)."""

from __future__ import annotations

import json
from pathlib import Path

import braceexpand

from clipx.data.remote import (
    RemoteOptions,
    ShardUnreadable,
    filesystem_for,
    is_remote,
    list_remote,
    read_remote_bytes,
    retrying,
)
from clipx.errors import ClipxError

PIPE_PREFIX = "pipe:"


def expand_shards(pattern: str, what: str = "data.train", allow_pipe: bool = False,
                  options: RemoteOptions | None = None) -> list[str]:
    """Expand ``a-{000..009}.tar`` (``::``-separated lists too, or a folder of .tar files) into paths
    or URLs (``s3://``, ``gs://``, ``https://``, ``hf://``).

    Raises a one-line ClipxError when the pattern is empty, matches nothing, or names missing files.
    ``pipe:CMD`` URLs run a shell command per shard, so they are refused unless ``allow_pipe``
    (the config's ``data.allow_pipe_urls``); their existence cannot be checked ahead. Of remote
    URLs only the first is checked (one request): a shard missing later counts as unreadable.
    """
    if not pattern or not pattern.strip():
        raise ClipxError(f"{what} is empty; give a shard pattern such as data/train/shard-{{000000..000009}}.tar")
    if not is_remote(pattern) and Path(pattern).is_dir():  # a folder written by `clipx prep`: all of its shards
        urls = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not urls:
            raise ClipxError(f"{what}: folder {pattern} holds no .tar shards; run `clipx prep` first")
        return urls
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part.strip())]
    pipes = [u for u in urls if u.startswith(PIPE_PREFIX)]
    if pipes and not allow_pipe:
        raise ClipxError(f"{what} has pipe: URLs, which run shell commands (first {pipes[0]!r}); set "
                         "data.allow_pipe_urls=true if you trust them")
    if is_remote(urls[0]):
        _check_reachable(urls[0], what, options or RemoteOptions())
    missing = [u for u in urls if not u.startswith(PIPE_PREFIX) and not is_remote(u) and not Path(u).is_file()]
    if len(missing) == len(urls):
        raise ClipxError(f"{what} pattern {pattern!r} matched no files; check the path or run `clipx prep` first")
    if missing:
        raise ClipxError(f"{what}: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]}")
    return urls


def _check_reachable(url: str, what: str, options: RemoteOptions) -> None:
    fs = filesystem_for(url, options)
    try:
        retrying(lambda: fs.size(url), url, options)
    except ShardUnreadable as error:
        raise ClipxError(f"{what}: cannot read its first shard, {error}; check the URL, the endpoint "
                         "(data.endpoint_url) and the credentials in your environment") from None


def clip_benchmark_shards(folder: str | Path, split: str = "test") -> str | None:
    """``folder/split/{0..n-1}.tar`` when ``folder`` is a CLIP_benchmark webdataset (it has
    ``split/nshards.txt``); None otherwise."""
    nshards = Path(folder) / split / "nshards.txt"
    if not nshards.is_file():
        return None
    try:
        count = int(nshards.read_text().strip())
    except ValueError:
        raise ClipxError(f"{nshards} must hold the number of shards; got {nshards.read_text()[:40]!r}") from None
    return str(Path(folder) / split / f"{{0..{count - 1}}}.tar")


def read_beside(pattern: str, name: str, options: RemoteOptions | None = None) -> bytes | None:
    """The file ``name`` in the folder of the first shard of ``pattern`` (local or remote), or None
    when there is none: metadata that `clipx prep` writes beside the shards, as sizes.json."""
    url = expand_shards(pattern, allow_pipe=True, options=options)[0]
    if url.startswith(PIPE_PREFIX):
        return None
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    if not is_remote(url):
        path = Path(folder) / name
        return path.read_bytes() if path.is_file() else None
    try:
        return read_remote_bytes(f"{folder}/{name}", options or RemoteOptions())
    except ShardUnreadable:
        return None


def count_samples(urls: list[str], options: RemoteOptions | None = None) -> int:
    """Total samples in ``urls`` (see ``shard_sizes``)."""
    sizes = shard_sizes(urls, options)
    return sum(sizes[url] for url in urls)


def shard_sizes(urls: list[str], options: RemoteOptions | None = None) -> dict[str, int]:
    """Samples per shard: from the sizes.json written beside them by `clipx prep`, or else from
    img2dataset's per-shard ``{shard}_stats.json`` files (their "successes"); for remote shards,
    read from the store (one request per folder)."""
    sizes: dict[str, dict] = {}
    counts = {}
    for url in urls:
        if url.startswith(PIPE_PREFIX):
            raise ClipxError("pipe: shards have no sizes.json to count; set data.train_num_samples")
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in sizes:
            sizes[folder] = _read_remote_sizes(folder, options or RemoteOptions()) if is_remote(url) \
                else _read_sizes(Path(folder))
        if name not in sizes[folder]:
            raise ClipxError(f"{folder}/sizes.json has no entry for {name}; set data.train_num_samples")
        counts[url] = int(sizes[folder][name])
    return counts


def _parse_sizes(text: bytes | str, where: str) -> dict[str, int]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ClipxError(f"{where} is not valid JSON ({error}); rewrite the shards with "
                         "`clipx prep` or set data.train_num_samples") from None


def _stats_successes(text: bytes | str, where: str) -> int:
    try:
        return int(json.loads(text)["successes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ClipxError(f"{where} has no readable 'successes' count; set data.train_num_samples") from None


def _read_remote_sizes(folder: str, options: RemoteOptions) -> dict[str, int]:
    try:
        return _parse_sizes(read_remote_bytes(f"{folder}/sizes.json", options), f"{folder}/sizes.json")
    except ShardUnreadable:
        pass
    try:
        stats = list_remote(f"{folder}/*_stats.json", options)
    except (ShardUnreadable, NotImplementedError, ValueError):
        stats = []
    if not stats:
        raise ClipxError(f"no sizes.json (clipx prep) or *_stats.json (img2dataset) readable in {folder}; "
                         "set data.train_num_samples")
    return {url.rsplit("/", 1)[1].removesuffix("_stats.json") + ".tar":
            _stats_successes(read_remote_bytes(url, options), url) for url in stats}


def _read_sizes(folder: Path) -> dict[str, int]:
    sizes_file = folder / "sizes.json"
    if sizes_file.is_file():
        return _parse_sizes(sizes_file.read_text(), str(sizes_file))
    stats = sorted(folder.glob("*_stats.json"))
    if not stats:
        raise ClipxError(f"no sizes.json (clipx prep) or *_stats.json (img2dataset) in {folder}; set "
                         "data.train_num_samples")
    return {file.name.removesuffix("_stats.json") + ".tar": _stats_successes(file.read_text(), str(file))
            for file in stats}

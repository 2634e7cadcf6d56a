"""Samples of one webdataset tar shard, numbered, with the ability to skip samples unread.

Members are grouped into samples the way webdataset does it (the key is the member name up to the
first dot of its basename, the extension lower-cased; metadata members such as ``__info__`` are
ignored). Each sample of a shard has an index, counting the samples in shard order after dropping
a key already seen in the shard (the first wins). A reader may start at sample ``first`` or take
only the samples in ``wanted`` (or those a keep-list keeps, ``keep``: clipx.data.keep): the bodies
of the others are never decoded. On a local file
tarfile seeks past them, so skipping costs header reads; on a remote object the seek fetches the
ranged blocks that hold the headers (clipx.data.remote), and a ``pipe:`` stream reads and
discards the bodies.

Skipped inputs are counted where they occur in the member stream. Resuming at sample ``first``
counts only what follows the end of sample ``first - 1``: exactly what an unbroken reader counted
after it handed that sample on, which is where a saved data position stops.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO, Collection, Iterator

from clipx.data.remote import ShardUnreadable
from clipx.data.skips import SkipCounter

_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def member_key(name: str) -> tuple[str, str] | None:
    """("dir/sample-7", "jpg") for "dir/sample-7.JPG"; None for metadata and names without a suffix."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = _KEY_AND_SUFFIX.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


class FastTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, faster on the header a shard is mostly made of: a regular file's.

    TarInfo.frombuf decodes every field through helpers and sums the header twice for its checksum,
    about 30 us per header, three headers per image-text sample: a tenth of a loader worker's time
    per sample. Here a regular file's header is read with plain slicing and one ``sum``. Anything
    else (pax and GNU long-name headers, directories, base-256 numbers, a checksum that does not
    match, the zero blocks at the end) goes to TarInfo.frombuf, so errors and edge cases are
    tarfile's own. tests/test_tar_reader.py checks that both parse shards to the same members.
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            return super().frombuf(buf, encoding, errors)
        try:
            mode, uid, gid, size, mtime, chksum, devmajor, devminor = (
                int(buf[start:end].split(b"\0", 1)[0].strip() or b"0", 8) for start, end in _NUMBER_FIELDS)
        except ValueError:  # base-256 numbers, or garbage: tarfile decides
            return super().frombuf(buf, encoding, errors)
        if chksum != sum(buf) - sum(buf[148:156]) + 256:  # the checksum field counts as 8 spaces
            return super().frombuf(buf, encoding, errors)

        def text(start: int, end: int) -> str:
            return buf[start:end].split(b"\0", 1)[0].decode(encoding, errors)

        obj = cls()
        obj.name, obj.linkname, obj.uname, obj.gname = text(0, 100), text(157, 257), text(265, 297), text(297, 329)
        if obj.name.endswith("/"):  # V7's directories: tarfile's own parsing handles them
            return super().frombuf(buf, encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum = mode, uid, gid, size, mtime, chksum
        obj.devmajor, obj.devminor, obj.type = devmajor, devminor, buf[156:157]
        prefix = text(345, 500)
        if prefix:  # a ustar name longer than 100 bytes
            obj.name = prefix + "/" + obj.name
        return obj


# (start, end) of the octal fields: mode, uid, gid, size, mtime, checksum, devmajor, devminor.
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for info in tar:
        tar.members = []  # type: ignore[attr-defined]  # streaming: do not keep every header of a shard in memory
        if info.isreg():
            yield info


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the archive ends with its end-of-archive block. tarfile stops quietly at a header cut
    short or garbled past the first member, which for a shard means lost samples, not an ending."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def shard_samples(stream: IO[bytes], counter: SkipCounter, first: int = 0, wanted: set[int] | None = None,
                  keep: Collection[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(index, {"__key__": key, suffix: bytes, ...}) for the samples of an opened shard.

    Samples before ``first``, with ``wanted`` those not in it, and with ``keep`` (a keep-list's
    shard indices) those not in it, are skipped without reading their bodies. Unlike ``wanted``,
    ``keep`` reads and counts as a full read from ``first`` does; the samples it leaves out are not
    data (clipx.data.keep), so a member repeated inside one is not counted. A truncated or garbled
    shard counts one ``corrupt_tar`` and ends (the samples before the damage still count; a sample
    whose member was cut is dropped); a network failure that outlived its retries counts one
    ``unreadable_shard`` instead. With ``wanted`` (restoring a shuffle buffer after a resume)
    nothing is counted: it was all counted before.
    """
    counting = wanted is None and first == 0
    kept = None if keep is None else keep if isinstance(keep, (set, frozenset)) else {int(i) for i in keep}
    last_wanted = max(wanted, default=-1) if wanted is not None else None
    seekable = getattr(stream, "seekable", lambda: False)()  # webdataset's Pipe has no seekable()
    seen: set[str] = set()
    index = -1
    key, take = None, False
    sample: dict[str, str | bytes] | None = None
    in_body = False  # a failure while reading a member's body spoils the sample being read
    try:
        mode = "r:*" if seekable else "r|*"
        tar = tarfile.open(fileobj=stream, mode=mode, tarinfo=FastTarInfo)  # type: ignore[call-overload]
        for info in _members(tar):
            named = member_key(info.name)
            if named is None:
                continue
            if named[0] != key:  # a new sample begins: the previous one is complete
                if sample is not None and take:
                    yield index, sample
                counting = counting or (wanted is None and index == first - 1)
                if last_wanted is not None and index >= last_wanted:
                    return
                key, sample, take = named[0], None, False
                if key in seen:  # a key repeated within the shard: the first sample wins
                    if counting:
                        counter.add("duplicate_key")
                    continue
                seen.add(key)
                index += 1
                take = index >= first and (wanted is None or index in wanted) and (kept is None or index in kept)
                sample = {"__key__": key}
            if sample is None or not take:
                continue
            if named[1] in sample:  # the same member twice in one sample: the later copy is dropped
                if counting:
                    counter.add("duplicate_key")
                continue
            in_body = True
            member = tar.extractfile(info)
            sample[named[1]] = member.read() if member is not None else b""
            in_body = False
        if seekable and not _ends_cleanly(tar):
            raise tarfile.ReadError("the archive stops inside a header")
    except (ShardUnreadable, tarfile.TarError, EOFError, OSError, ValueError) as error:
        if counting:
            counter.add("unreadable_shard" if isinstance(error, ShardUnreadable) else "corrupt_tar")
        if in_body:
            return
    if sample is not None and take:
        yield index, sample

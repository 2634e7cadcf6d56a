"""clipx's fast tar header parsing reads shards to exactly the members tarfile's own parsing does."""

from __future__ import annotations

import io
import tarfile

import pytest

from clipx.data.tar_reader import FastTarInfo


def archive(fmt: int) -> bytes:
    """Members of every kind a shard writer might produce, names short and long (ustar prefix, GNU
    long name, pax path), non-ASCII, a directory, a link, large and empty bodies."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        def add(name: str, body: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime, info.mode = kind, len(body), 1_700_000_000, 0o644
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)

        add("dir", kind=tarfile.DIRTYPE)
        add("sample-0.jpg", b"\xff\xd8" + bytes(range(256)) * 7, uname="someone", gname="group", uid=1000, gid=1001)
        add("sample-0.txt", b"a photo of the digit 7")
        add("sample-1.txt", b"")
        add("d" * 90 + "/" + "e" * 60 + "/sample-2.txt", b"long path")  # ustar prefix, or a long name
        add("caf\u00e9/sample-3.txt", b"non-ASCII name")
        add("sample-4.link", kind=tarfile.SYMTYPE, linkname="sample-0.txt")
        add("sample-5.json", b'{"label": 3}' * 100)
    return out.getvalue()


def members(data: bytes, tarinfo, mode: str = "r:*") -> list[dict]:
    with tarfile.open(fileobj=io.BytesIO(data), mode=mode, tarinfo=tarinfo) as tar:
        return [{**info.get_info(), "offset": info.offset, "offset_data": info.offset_data,
                 "body": tar.extractfile(info).read() if info.isreg() else None} for info in tar]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_parsing_gives_tarfiles_members(fmt):
    data = archive(fmt)
    expected = members(data, tarfile.TarInfo)
    assert len(expected) == 8
    assert members(data, FastTarInfo) == expected
    assert members(data, FastTarInfo, mode="r|*") == expected  # as a stream (pipe: and remote shards)


def test_fast_parsing_takes_the_fast_path_for_regular_files(monkeypatch):
    data = archive(tarfile.GNU_FORMAT)
    slow = []
    original = tarfile.TarInfo.frombuf.__func__
    monkeypatch.setattr(tarfile.TarInfo, "frombuf",
                        classmethod(lambda cls, buf, *a: slow.append(buf[156:157]) or original(cls, buf, *a)))
    members(data, FastTarInfo)
    # The directory, the link, a long name's own header and the end block; never a regular file.
    assert tarfile.REGTYPE not in slow and {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.GNUTYPE_LONGNAME} <= set(slow)


@pytest.mark.parametrize("where", [148, 10, 124])  # the checksum, the name, the size
def test_a_damaged_header_fails_as_in_tarfile(where):
    data = bytearray(archive(tarfile.USTAR_FORMAT))
    second = members(bytes(data), tarfile.TarInfo)[1]["offset"]
    data[second + where] ^= 0x5A

    def outcome(tarinfo):
        try:
            return members(bytes(data), tarinfo)
        except tarfile.TarError as error:
            return type(error)
    assert outcome(FastTarInfo) == outcome(tarfile.TarInfo)

"""A training corpus with every kind of damage a web-scale data set shows, and its expected accounting.

``build_hostile_corpus`` takes clean shards (e.g. the digits shards from `clipx prep`) and writes
seven shards: one clean, one whose samples are damaged one way each, two cut short (inside a
member's data, inside a tar header), one of garbage bytes, one empty, and one that vanishes after
the shard list was made. It returns the keys a reader must deliver (each exactly once per pass)
and the skips it must count, by reason. tests/test_hostile_data.py and bench/hostile_data.py
both use it.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES_PER_SHARD = 20


@dataclass
class HostileCorpus:
    folder: Path
    good_keys: list[str] = field(default_factory=list)
    expected_skips: dict[str, int] = field(default_factory=dict)
    vanishing_shard: Path | None = None  # delete it after listing the shards: an unreadable shard path

    def expect(self, reason: str, n: int = 1) -> None:
        self.expected_skips[reason] = self.expected_skips.get(reason, 0) + n


def clean_samples(clean_dir: Path, count: int) -> list[dict[str, bytes]]:
    """The first ``count`` samples of the clean shards as {suffix: bytes} (keys are reassigned later)."""
    samples: list[dict[str, bytes]] = []
    for shard in sorted(Path(clean_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            current_key = None
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if key != current_key:
                    if len(samples) == count:
                        return samples
                    samples.append({})
                    current_key = key
                samples[-1][suffix] = tar.extractfile(member).read()
    if len(samples) < count:
        raise ValueError(f"{clean_dir} holds {len(samples)} samples; {count} needed")
    return samples


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (10 gigapixels by default) in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """Write ``members`` (name, data) to an uncompressed tar; returns each member's header offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return offsets


def members_of(key: str, sample: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{suffix}", data) for suffix, data in sample.items()]


def build_hostile_corpus(clean_dir: Path, out: Path, seed: int = 0) -> HostileCorpus:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = clean_samples(clean_dir, 5 * SAMPLES_PER_SHARD)
    corpus = HostileCorpus(out)

    def take(shard: int) -> list[tuple[str, dict[str, bytes]]]:
        start = shard * SAMPLES_PER_SHARD
        return [(f"s{shard}-{i:04d}", dict(pool[start + i])) for i in range(SAMPLES_PER_SHARD)]

    # 0: clean.
    samples = take(0)
    write_tar(out / "shard-0-clean.tar", [m for key, s in samples for m in members_of(key, s)])
    corpus.good_keys += [key for key, _ in samples]

    # 1: one kind of damage per sample; the rest are good.
    samples = take(1)
    members: list[tuple[str, bytes]] = []
    for index, (key, sample) in enumerate(samples):
        if index in (0, 1):
            sample["jpg"] = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
            corpus.expect("undecodable_image")
        elif index == 2:
            sample["jpg"] = rng.randbytes(700)
            corpus.expect("undecodable_image")
        elif index == 3:
            del sample["jpg"]
            sample["png"] = bomb_png()
            corpus.expect("oversized_image")
        elif index == 4:
            del sample["txt"]
            corpus.expect("missing_caption")
        elif index == 5:
            sample["txt"] = b"  \n\t\n"
            corpus.expect("missing_caption")
        elif index == 6:
            del sample["jpg"]
            corpus.expect("missing_image")
        elif index == 7:
            # The same member twice in a row: the later copy is dropped, the sample is kept.
            members += members_of(key, sample) + [(f"{key}.jpg", sample["jpg"])]
            corpus.expect("duplicate_key")
            corpus.good_keys.append(key)
            continue
        elif index == 8:
            # A pickle member rides along: no decoder reads it, the sample is good.
            sample["pyd"] = b"\x80\x04K\x01."
            corpus.good_keys.append(key)
        else:
            corpus.good_keys.append(key)
        members += members_of(key, sample)
    members += members_of(*samples[10])  # a key seen earlier in the shard: skipped, the first stays
    corpus.expect("duplicate_key")
    write_tar(out / "shard-1-damaged-samples.tar", members)

    # 2 and 3: cut short inside member data, and inside a tar header. Samples wholly before the cut count.
    for shard, name, cut_at_sample, into in ((2, "cut-mid-member", 12, "data"), (3, "cut-mid-header", 8, "header")):
        samples = take(shard)
        members = [m for key, s in samples for m in members_of(key, s)]
        path = out / f"shard-{shard}-{name}.tar"
        offsets = write_tar(path, members)
        first_member = sum(len(s) for _, s in samples[:cut_at_sample])
        cut = offsets[first_member] + (512 + 300 if into == "data" else 200)
        path.write_bytes(path.read_bytes()[:cut])
        corpus.good_keys += [key for key, _ in samples[:cut_at_sample]]
        corpus.expect("corrupt_tar")

    # 4 and 5: garbage and empty files named like shards.
    (out / "shard-4-garbage.tar").write_bytes(rng.randbytes(3000))
    corpus.expect("corrupt_tar")
    (out / "shard-5-empty.tar").write_bytes(b"")
    corpus.expect("corrupt_tar")

    # 6: listed, then gone (a network filesystem hiccup, a deleted file).
    path = out / "shard-6-vanishing.tar"
    write_tar(path, [m for key, s in take(4) for m in members_of(key, s)])
    corpus.vanishing_shard = path
    corpus.expect("unreadable_shard")
    return corpus


@contextlib.contextmanager
def shard_vanished(corpus: HostileCorpus):
    """Inside this block the vanishing shard is gone (build the loader, which lists shards, before)."""
    saved = corpus.vanishing_shard.read_bytes()
    corpus.vanishing_shard.unlink()
    try:
        yield
    finally:
        corpus.vanishing_shard.write_bytes(saved)


def read_one_pass(corpus: HostileCorpus, workers: int = 0):
    """The training loader's keys over batches of one sample, as many as there are good samples
    (with one worker: exactly one pass), and its SkipCounter."""
    import torch

    from clipx.config import DataConfig
    from clipx.data.batch import ImageTextBatch
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter

    data = DataConfig(train=str(corpus.folder), train_num_samples=len(corpus.good_keys), workers=workers,
                      shuffle_buffer=16)
    counter = SkipCounter()
    # Decoding is under test, not resizing: a decoded image becomes a one-element tensor.
    loader, _ = build_train_loader(data, 1, lambda image: torch.zeros(1), ImageTextBatch(lambda texts: texts), 0, 0, 1,
                                   SharedEpoch(), counter)
    with shard_vanished(corpus):
        keys = [key for batch in loader for key in batch["key"]]
    return keys, counter

"""Control data sets: the same images with the image-caption pairing deliberately broken."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from data_prep.writer import PrepSummary, ShardWriter


def shuffle_captions(src_dir: str | Path, out_dir: str | Path, seed: int = 0, shard_size: int = 256) -> PrepSummary:
    """Copy the shards of ``src_dir`` to ``out_dir`` with captions permuted across all samples.

    A model trained on the result can learn nothing about which caption belongs to which image, so
    its zero-shot accuracy should stay near chance: the check that a good score comes from the pairs.
    """
    samples = list(_read_samples(sorted(Path(src_dir).glob("*.tar"))))
    order = np.random.default_rng(seed).permutation(len(samples))
    with ShardWriter(out_dir, shard_size=shard_size) as writer:
        for (key, jpg, _caption, meta), source in zip(samples, order):
            writer.add(key, jpg, samples[source][2], {**meta, "caption_from": samples[source][0]})
    return PrepSummary(written=len(samples), shards=len(writer.sizes), out_dir=str(out_dir))


def _read_samples(shards: list[Path]):
    """(key, jpg bytes, caption, meta) of every sample, in shard order."""
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.isfile():
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, parts in members.items():
            yield key, parts["jpg"], parts["txt"].decode("utf-8"), json.loads(parts.get("json", b"{}"))

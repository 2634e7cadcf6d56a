"""Evaluation loaders: every sample of a shard set exactly once, split across ranks by key.

Unlike training, evaluation reads finite shard lists, keeps the last partial batch, and returns
labels (a .cls member or a .json field) and every caption of each image.
"""

from __future__ import annotations

import functools
import zlib
from typing import Iterable, Iterator

import torch
import webdataset as wds

from clipx.data.captions import all_captions
from clipx.data.labels import sample_label
from clipx.data.opener import ShardOpener, open_shards, tar_samples
from clipx.data.pipeline import decode_or_reason
from clipx.data.shards import expand_shards
from clipx.data.skips import SkipCounter
from clipx.data.transforms import stack_images


def decode_eval_samples(src: Iterable[dict], transform, label_key: str, counter: SkipCounter) -> Iterator[dict]:
    """Raw samples -> {"image", "captions": list[str], "label": int (-1 if none), "key"}."""
    for sample in src:
        image, reason = decode_or_reason(sample, transform)
        if reason is not None:
            counter.add(reason)
            continue
        try:
            label = sample_label(sample, label_key)
        except (ValueError, TypeError, UnicodeDecodeError):  # malformed .cls or .json
            counter.add("bad_label")
            continue
        yield {"image": image, "captions": all_captions(sample), "label": label, "key": sample["__key__"]}


def collate_eval(samples: list[dict]) -> dict:
    return {
        "image": stack_images([s["image"] for s in samples]),
        "captions": [s["captions"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }


def owned_by_rank(src: Iterable[dict], rank: int, world: int) -> Iterator[dict]:
    """Keep the samples whose key hashes to this rank, before any decoding.

    Every rank reads every shard but decodes only its share, so evaluation splits evenly whatever
    the number of shards, and the split depends on keys alone (not on shard or worker order).
    """
    for sample in src:
        if world == 1 or zlib.crc32(sample["__key__"].encode()) % world == rank:
            yield sample


def build_eval_loader(pattern: str, transform, label_key: str, batch_size: int, workers: int,
                      counter: SkipCounter | None = None, what: str = "evaluation shards",
                      rank: int = 0, world: int = 1, opener: ShardOpener | None = None):
    """This rank's share of the samples of ``pattern``, each exactly once, in batches (the last may be
    smaller). ``opener``: how remote shards are reached (default: each store's own environment)."""
    opener = opener or ShardOpener()
    urls = expand_shards(pattern, what, options=opener.options)
    counter = counter or SkipCounter()
    workers = min(workers, len(urls))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        functools.partial(open_shards, counter=counter, opener=opener),
        functools.partial(tar_samples, counter=counter),
        functools.partial(owned_by_rank, rank=rank, world=world),
        functools.partial(decode_eval_samples, transform=transform, label_key=label_key, counter=counter),
        wds.batched(batch_size, collation_fn=collate_eval, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)

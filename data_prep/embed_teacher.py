"""`clipx prep embed-teacher`: run a teacher CLIP once over a set of shards and write them again with
each sample's teacher embeddings in a ``teacher.npy`` member, for offline distillation
(``distill.embedded: true``).

Every member of every sample is copied unchanged, in order, into a shard of the same name under
the output folder; ``sizes.json`` and ``teacher.json`` (the teacher, its logit scale and embedding
width) go beside them. The teacher embeds the image through its own evaluation transform and the
sample's first caption (the .txt's first line) through its own tokenizer, exactly as an online
teacher does in training. A sample whose image or caption cannot be used is copied without a
``teacher.npy`` and counted; training skips it (missing_member).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clipx.data.captions import first_caption
from clipx.data.opener import ShardOpener
from clipx.data.pipeline import decode_or_reason
from clipx.data.shards import expand_shards
from clipx.data.skips import SkipCounter
from clipx.data.tar_reader import shard_samples
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic
from clipx.methods import load_teacher
from clipx.methods.distill import TEACHER_INFO, TEACHER_MEMBER
from data_prep.writer import SIZES_FILE, add_member, make_dir


def embed_teacher(teacher_path: str | Path, shards: str, out_dir: str | Path, batch_size: int = 256,
                  device: str = "cpu") -> dict:
    """Write ``shards`` again under ``out_dir`` with teacher embeddings; returns
    {"samples", "embedded", "skipped", "dim", "logit_scale"}."""
    out_dir = Path(out_dir)
    urls = expand_shards(shards, "--shards")
    names = [url.rsplit("/", 1)[-1] for url in urls]
    if len(set(names)) != len(names):
        raise ClipxError("--shards names two shards alike; they would overwrite each other in --out")
    if any(Path(url).parent.resolve() == out_dir.resolve() for url in urls if "://" not in url):
        raise ClipxError(f"--out {out_dir} holds the input shards; write the embedded copy to another folder")
    make_dir(out_dir)
    teacher = load_teacher(teacher_path).to(device)
    opener, sizes, totals = ShardOpener(), {}, {"samples": 0, "embedded": 0, "skipped": 0, "dim": 0}
    for url, name in zip(urls, names):
        tmp = out_dir / f"{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            count = 0
            for samples in _batches(_read(opener, url), batch_size):
                embeddings = _embed(teacher, samples, device)
                for sample, embedding in zip(samples, embeddings):
                    for suffix, data in sample.items():
                        if suffix != "__key__" and suffix != TEACHER_MEMBER:
                            add_member(tar, f"{sample['__key__']}.{suffix}", data)
                    if embedding is not None:
                        add_member(tar, f"{sample['__key__']}.{TEACHER_MEMBER}", _npy(embedding))
                        totals["embedded"] += 1
                        totals["dim"] = embedding.shape[1]
                    count += 1
        os.replace(tmp, out_dir / name)
        sizes[name] = count
        totals["samples"] += count
    totals["skipped"] = totals["samples"] - totals["embedded"]
    write_json_atomic(out_dir / SIZES_FILE, sizes)
    info = {"teacher": teacher.source, "logit_scale": teacher.logit_scale, "dim": totals["dim"],
            "caption": "the first line of each sample's .txt"}
    write_json_atomic(out_dir / TEACHER_INFO, info)
    return {**totals, "logit_scale": teacher.logit_scale}


def _read(opener: ShardOpener, url: str) -> Iterator[dict]:
    with opener.open(url) as stream:
        for _, sample in shard_samples(stream, SkipCounter()):
            yield sample


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _embed(teacher, samples: list[dict], device: str) -> list[np.ndarray | None]:
    """Each sample's (2, Dt) embeddings, or None when its image or caption is unusable."""
    usable, images, captions = [], [], []
    for index, sample in enumerate(samples):
        caption = first_caption(sample)
        image, reason = decode_or_reason(sample, teacher.transform)
        if caption is not None and reason is None:
            usable.append(index)
            images.append(image)
            captions.append(caption)
    out: list[np.ndarray | None] = [None] * len(samples)
    if usable:
        image_embeddings, text_embeddings = teacher.embed(torch.stack(images).to(device),
                                                          teacher.tokenize(captions).to(device))
        both = torch.stack([image_embeddings, text_embeddings], dim=1).cpu().numpy().astype(np.float32)
        for index, embedding in zip(usable, both):
            out[index] = embedding
    return out


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def summary_line(result: dict) -> str:
    return (f"{result['samples']} samples, {result['embedded']} with teacher embeddings ({result['dim']} wide), "
            f"{result['skipped']} without (unusable image or caption); teacher logit scale "
            f"{result['logit_scale']:.4g}")


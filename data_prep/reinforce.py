"""`clipx prep reinforce`: MobileCLIP's dataset reinforcement, written into copies of a set of shards.

For every sample this draws K augmented views of its image (clipx/data/reinforce.py: a crop box, a
flip, colour jitter) and stores their parameters (``views.npy``); takes its synthetic captions from a
captioner (a clipx CoCa or SigLIP 2 run, or an open_clip CoCa folder) or from those its .json already
holds, and stores them as a list in .json field ``caption_key``; and runs each teacher of an ensemble
on every view and on every caption the sample can contribute (its .txt lines, then the synthetic
ones), storing ``teacher<t>.npy`` ((K + C, Dt) float16). Training with ``data.reinforced`` replays the
views and, with ``distill.embedded``, distils from these embeddings without running a teacher.

Each view's parameters are drawn from a generator seeded by (seed, shard name, sample key), and
sampled captions from one seeded by (seed, shard name, batch, caption): a shard's bytes are the same
whichever process writes it, so any number of processes (``processes``, or one per rank under a
launcher) write what one does. Shards are written whole under a temporary name and renamed; a rerun
skips the finished ones, so an interrupted run resumes (with the settings it started with:
reinforce.json records them). A sample whose image cannot be decoded, that has no caption or whose
.json is no object is copied without reinforcement, and training skips it (missing_member).
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clipx.apps.caption import batch_seed, generate_captions, load_captioner
from clipx.apps.caption_io import check_settings, write_shard, write_sizes_when_complete
from clipx.apps.shard_work import batches_of, is_writer, run_parts, shard_samples_of
from clipx.data.captions import all_captions, json_object
from clipx.data.keep import shard_name
from clipx.data.opener import ShardOpener
from clipx.data.pipeline import sample_image_bytes
from clipx.data.reinforce import (
    INFO_FILE,
    STORED_DTYPE,
    VIEWS_MEMBER,
    ReinforceInfo,
    ViewRecipe,
    render_view,
    stored_captions,
    teacher_member,
    to_pil,
)
from clipx.data.remote import RemoteOptions
from clipx.data.shards import expand_shards
from clipx.data.transforms import decode_image, open_image
from clipx.errors import ClipxError
from clipx.methods import load_teacher
from clipx.models.decoding import generate

COUNTS = ("written", "reinforced", "unusable", "added_bytes")
# What changes the stored bytes: a resumed folder must agree on these.
RELEVANT = ("teachers", "augmentations", "image_size", "caption_key", "captions", "recipe", "settings")


@dataclass(frozen=True)
class Decoding:
    """How a captioner writes synthetic captions (clipx.models.decoding.generate's settings)."""

    method: str = "sample"
    beams: int = 4
    temperature: float = 1.0
    top_k: int = 0
    max_tokens: int = 30
    min_tokens: int = 0


@dataclass(frozen=True)
class ReinforceJob:
    """What every writing process needs; picklable for spawned processes."""

    teachers: tuple[str, ...]
    out: str
    augmentations: int
    captions: int
    caption_key: str
    image_size: int
    recipe: ViewRecipe
    seed: int
    captioner: str | None
    decoding: Decoding
    batch_size: int
    device: str
    options: RemoteOptions = field(default_factory=RemoteOptions)
    threads: int | None = None


def reinforce_shards(teachers: list[str], shards: str, out: str | Path, *, augmentations: int = 4, captions: int = 2,
                     captioner: str | None = None, caption_key: str = "synthetic_captions", image_size: int = 224,
                     recipe: ViewRecipe = ViewRecipe(), decoding: Decoding = Decoding(), seed: int = 0,
                     batch_size: int = 64, processes: int = 1, device: str | None = None,
                     options: RemoteOptions | None = None) -> dict:
    """Reinforce every shard of ``shards`` (local or remote) into ``out``; returns {"shards", "skipped",
    "written", "reinforced", "unusable", "added_bytes", "bytes_per_sample"} for the shards this call
    (under a launcher: this rank) wrote; bytes_per_sample is what reinforcement adds to a sample on disk."""
    _check_arguments(teachers, augmentations, captions, caption_key, image_size, batch_size, processes, captioner,
                     decoding)
    recipe.check()
    options = options or RemoteOptions()
    urls = expand_shards(shards, "--shards", options=options)
    names = [shard_name(url) for url in urls]
    if len(set(names)) != len(names):
        raise ClipxError("--shards names two shards alike; their reinforced copies would overwrite each other")
    dest = Path(out)
    if any("://" not in url and Path(url).parent.resolve() == dest.resolve() for url in urls):
        raise ClipxError(f"--out {dest} holds the input shards; write the reinforced copies to another folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    job = ReinforceJob(tuple(teachers), str(dest), augmentations, captions, caption_key, image_size, recipe, seed,
                       captioner, decoding, batch_size, device, options)
    check_settings(dest, asdict(_info(job)), writer=is_writer(), relevant=RELEVANT, name=INFO_FILE)
    todo = [url for url in urls if not (dest / shard_name(url)).is_file()]
    counts = {**dict.fromkeys(COUNTS, 0),
              **run_parts(_reinforce_part, job, urls, processes, done=lambda url: (dest / shard_name(url)).is_file())}
    write_sizes_when_complete(dest, names)
    per_sample = counts["added_bytes"] / counts["reinforced"] if counts["reinforced"] else 0.0
    return {"shards": len(urls), "skipped": len(urls) - len(todo), **counts, "bytes_per_sample": per_sample}


def _check_arguments(teachers, augmentations, captions, caption_key, image_size, batch_size, processes, captioner,
                     decoding: Decoding) -> None:
    if not teachers or not all(teachers):
        raise ClipxError("--teachers must name one or more teachers, comma-separated")
    for name, value, least in (("--augmentations", augmentations, 1), ("--captions", captions, 0),
                               ("--image-size", image_size, 1), ("--batch-size", batch_size, 1),
                               ("--processes", processes, 1)):
        if value < least:
            raise ClipxError(f"{name} must be at least {least}, got {value}")
    if caption_key in ("txt", "class_prompt") or not caption_key:
        raise ClipxError(f"--caption-key {caption_key!r} must name a .json field other than txt and class_prompt")
    if captioner is not None and captions > 1 and decoding.method != "sample":
        raise ClipxError(f"--captions {captions} from one captioner need --caption-method sample (greedy and beam "
                         "search write one caption per image)")
    if captioner is not None:  # the decoding settings, checked in one line before any model is loaded
        generate(lambda tokens, source: tokens, 0, sot=0, eot=1, max_tokens=decoding.max_tokens,
                 method=decoding.method, beams=decoding.beams, temperature=decoding.temperature,
                 top_k=decoding.top_k, min_tokens=decoding.min_tokens)


def _info(job: ReinforceJob) -> ReinforceInfo:
    """reinforce.json's content, the teachers' sources and scales read from their files."""
    described = []
    for path in job.teachers:
        teacher = load_teacher(path, what="--teachers")
        described.append({"source": teacher.source, "logit_scale": teacher.logit_scale, "dim": _width(teacher)})
    # Sampled captions draw per batch: the batch size shapes them (and nothing else).
    sampled = job.captioner is not None and job.decoding.method == "sample"
    settings = {"seed": job.seed, "captioner": job.captioner, "decoding": asdict(job.decoding),
                "batch_size": job.batch_size if sampled else None}
    return ReinforceInfo(described, job.augmentations, job.image_size, job.caption_key, job.captions,
                         asdict(job.recipe), settings)


def _width(teacher) -> int:
    with torch.no_grad():
        return int(teacher.embed_texts(teacher.tokenize(["a"])).shape[-1])


def _reinforce_part(job: ReinforceJob, urls: list[str]) -> dict:
    """Reinforce the shards ``urls``; the counts of what was written."""
    counts = dict.fromkeys(COUNTS, 0)
    if not urls:
        return counts
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    teachers = [load_teacher(path, what="--teachers").to(job.device) for path in job.teachers]
    captioner = load_captioner(job.captioner, device=job.device) if job.captioner is not None else None
    opener = ShardOpener(job.options)
    for url in urls:
        name = shard_name(url)
        read = (sample for _, sample in shard_samples_of(opener, url))
        samples = (out for index, batch in enumerate(batches_of(read, job.batch_size))
                   for out in _reinforce_batch(batch, name, index, teachers, captioner, job, counts))
        write_shard(Path(job.out) / name, samples)
        counts["written"] += 1
    return counts


def _reinforce_batch(batch: list[dict], shard: str, index: int, teachers, captioner, job: ReinforceJob,
                     counts: dict) -> Iterator[dict]:
    """The batch's samples, each reinforced where it can be."""
    views = [_views(sample, shard, job) for sample in batch]
    usable = [i for i, sample in enumerate(batch)
              if views[i] is not None and all_captions(sample) and json_object(sample) is not None]
    counts["unusable"] += len(batch) - len(usable)
    synthetic = _synthetic_captions([batch[i] for i in usable], shard, index, captioner, job)
    out = list(batch)
    for i, captions in zip(usable, synthetic):
        meta = {**json_object(batch[i]), job.caption_key: captions}
        out[i] = {**batch[i], "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                  VIEWS_MEMBER: _npy(views[i][0])}
    texts = [stored_captions(out[i], job.caption_key) for i in usable]
    pixels = [views[i][1] for i in usable]
    for t, teacher in enumerate(teachers):
        for i, rows in zip(usable, _embed(teacher, pixels, texts, job.device)):
            out[i][teacher_member(t)] = _npy(rows)
    for i in usable:
        counts["added_bytes"] += _added_bytes(batch[i], out[i])
    counts["reinforced"] += len(usable)
    yield from out


def _views(sample: dict, shard: str, job: ReinforceJob) -> tuple[np.ndarray, list[torch.Tensor]] | None:
    """(K view records, the K rendered views), or None when the image cannot be decoded."""
    data = sample_image_bytes(sample)
    if data is None:
        return None
    seed = zlib.crc32(json.dumps([job.seed, shard, sample["__key__"]]).encode("utf-8"))
    try:
        width, height = open_image(data).size
        records = job.recipe.draw(width, height, job.augmentations, torch.Generator().manual_seed(seed))
        return records, [render_view(data, record, job.image_size) for record in records]
    except Exception:  # any decoder failure (garbage, truncated, oversized) spoils this one sample
        return None


def _synthetic_captions(samples: list[dict], shard: str, index: int, captioner, job: ReinforceJob) -> list[list[str]]:
    """Each sample's synthetic captions: the captioner's (``job.captions`` of them), or else the first
    ``job.captions`` of those its .json field ``caption_key`` already holds."""
    if captioner is None:
        return [stored_captions({"json": s.get("json")}, job.caption_key)[:job.captions] for s in samples]
    if not samples or not job.captions:
        return [[] for _ in samples]
    from open_clip.tokenizer import SimpleTokenizer

    images = torch.stack([captioner.transform(decode_image(sample_image_bytes(s))) for s in samples]).to(job.device)
    out: list[list[str]] = [[] for _ in samples]
    for caption in range(job.captions):
        generator = torch.Generator().manual_seed(batch_seed(job.seed, shard, f"{index}-{caption}")) \
            if job.decoding.method == "sample" else None
        with torch.no_grad():
            texts = generate_captions(captioner.model, images, SimpleTokenizer(), job.decoding, generator)
        for row, text in zip(out, texts):
            row.append(text)
    return out


def _embed(teacher, views: list[list[torch.Tensor]], captions: list[list[str]], device: str) -> list[np.ndarray]:
    """Each sample's (K + C, Dt) float16 rows: the teacher's unit embeddings of its views, then of its
    captions, computed for the whole batch at once."""
    if not views:
        return []
    images = torch.stack([teacher.transform(to_pil(view)) for sample in views for view in sample]).to(device)
    tokens = teacher.tokenize([caption for sample in captions for caption in sample]).to(device)
    image_rows, text_rows = (rows.cpu().numpy().astype(STORED_DTYPE) for rows in teacher.embed(images, tokens))
    out, image_at, text_at = [], 0, 0
    for sample_views, sample_captions in zip(views, captions):
        k, c = len(sample_views), len(sample_captions)
        out.append(np.concatenate([image_rows[image_at:image_at + k], text_rows[text_at:text_at + c]]))
        image_at, text_at = image_at + k, text_at + c
    return out


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _added_bytes(before: dict, after: dict) -> int:
    """What reinforcement adds to a sample in a tar file: each member's 512-byte header and its data
    padded to 512-byte blocks (the .json's growth included)."""
    def on_disk(sample: dict) -> int:
        return sum(512 + -(-len(data) // 512) * 512 for suffix, data in sample.items() if suffix != "__key__")

    return on_disk(after) - on_disk(before)


def summary_line(result: dict) -> str:
    return (f"{result['written']} shards written ({result['skipped']} already there); {result['reinforced']} samples "
            f"reinforced, {result['unusable']} copied as they were (unusable image, caption or .json); reinforcement "
            f"adds {result['bytes_per_sample']:.0f} bytes per sample")

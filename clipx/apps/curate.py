"""`clipx curate score`: a scorer CLIP's view of every sample of a set of shards, as parquet sidecars.

A curation folder (CUR) holds ``curation.json`` (the manifest: scorer, shards, the stages run so far)
and ``scores/<shard basename>.parquet``, one table per input shard with one row per sample: its
``shard``, ``index`` (the tar reader's numbering, which keep-lists and the loader share), ``key``,
``caption`` (the .txt's first line), ``sha1`` of the image bytes, ``has_image``, ``score`` (cosine of
the scorer's unit image and text embeddings; NaN without an image or a caption) and, with
``embeddings``, both embeddings in float16 (zeros where missing). With a ``copy_descriptor``, each
image also gets a unit ``copy_embedding``, which deduplication and decontamination then compare
instead of the scorer's image embedding: a CLIP trained on class-level captions maps every image of
a class close together, where a copy must stand out from its class. The descriptor is "thumbnail"
(``thumbnail_descriptor``: a perceptual hash in continuous form, no model) or an image encoder
trained for instance discrimination (a clipx SimCLR or MoCo run, as copy-detection descriptors such
as SSCD are trained).
The stages that read these tables live in ``curate_stages.py``.

Scoring is shard by shard, and a shard's batches never mix with another's: a shard's table is the
same whichever process scores it, so any number of processes (``processes``, or one per rank under
srun, torchrun or an MPI launcher) gives the tables one process gives. Each table is written
atomically; a rerun skips the shards already scored by the same scorer, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipx.apps.shard_work import batches_of, is_writer, run_parts, shard_samples_of
from clipx.data.captions import first_caption
from clipx.data.keep import shard_name
from clipx.data.opener import ShardOpener
from clipx.data.pipeline import decode_or_reason, sample_image_bytes
from clipx.data.remote import RemoteOptions
from clipx.data.shards import expand_shards
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic

MANIFEST = "curation.json"
SCORES = "scores"
STAGES = "stages"
VERSION = 1  # of the manifest's layout


def scores_path(cur: Path, url: str) -> Path:
    return cur / SCORES / f"{shard_name(url)}.parquet"


@dataclass(frozen=True)
class ScoreJob:
    """What every scoring process needs; picklable for spawned processes."""

    model: str
    cur: str
    embeddings: bool
    batch_size: int
    device: str
    precision: str
    options: RemoteOptions
    copy_descriptor: str | None = None
    threads: int | None = None


def score_shards(shards: str, model: str, out: str | Path, embeddings: bool = False, batch_size: int = 256,
                 processes: int = 1, device: str | None = None, precision: str = "fp32",
                 options: RemoteOptions | None = None, copy_descriptor: str | None = None) -> dict:
    """Score every shard of ``shards`` (a pattern, local or remote) with the CLIP in ``model`` (a clipx
    run or checkpoint, an open_clip or a transformers CLIPModel folder) into the curation folder
    ``out``; returns {"shards", "scored_now", "already_scored", "not_scored"}.

    ``processes`` > 1 spawns that many scoring processes on this machine; a process started by a
    launcher (WORLD_SIZE, or srun's and MPI's variables) scores its own share instead and spawns none.
    Shards are dealt by their place in the list, not by what is left to score, so processes that
    look at the folder at different moments still deal alike. With several GPUs, the process of
    local rank r scores on GPU r (modulo their number).
    """
    if processes < 1:
        raise ClipxError(f"--processes must be at least 1, got {processes}")
    if precision not in ("fp32", "bf16"):
        raise ClipxError(f"--precision must be fp32 or bf16, got {precision}")
    options = options or RemoteOptions()
    urls = expand_shards(shards, "--shards", options=options)
    names = [shard_name(url) for url in urls]
    if len(set(names)) != len(names):
        raise ClipxError("--shards names two shards alike; their score tables would overwrite each other")
    cur = Path(out)
    _check_manifest(cur, {"scorer": model, "shards": urls, "embeddings": embeddings,
                          "copy_descriptor": copy_descriptor}, writer=is_writer())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    job = ScoreJob(model, str(cur), embeddings, batch_size, device, precision, options, copy_descriptor)
    todo = [url for url in urls if not scores_path(cur, url).is_file()]
    run_parts(_score_part, job, urls, processes, done=lambda url: scores_path(cur, url).is_file())
    done = sum(scores_path(cur, url).is_file() for url in urls)
    return {"shards": len(urls), "scored_now": done - (len(urls) - len(todo)), "already_scored": len(urls) - len(todo),
            "not_scored": len(urls) - done}


def _score_part(job: ScoreJob, urls: list[str]) -> None:
    from clipx.methods import load_teacher

    if not urls:
        return
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    scorer = load_teacher(job.model, what="--model").to(job.device)
    describer = _copy_descriptor(job)
    opener = ShardOpener(job.options)
    for url in urls:
        table = _score_shard(scorer, describer, opener, url, job)
        _write_table(table, scores_path(Path(job.cur), url))


THUMBNAIL = 16  # px: the thumbnail descriptor's side


def thumbnail_descriptor(image) -> torch.Tensor:
    """(THUMBNAIL², ) float32: the grey image averaged down to 16 x 16, minus its mean. Its cosine is
    a perceptual hash's comparison made continuous: a re-encode, a resize or a brightness change
    moves it little, a small crop a little more, and another image of the same class far more than a
    class-level CLIP embedding moves (tests/test_curate.py's decontamination case)."""
    from PIL import Image

    grey = image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    pixels = torch.from_numpy(np.asarray(grey, np.float32))
    return (pixels - pixels.mean()).reshape(-1)


def _copy_descriptor(job: ScoreJob):
    """(preprocess, encode_image) of the copy descriptor, or None without one."""
    if job.copy_descriptor is None:
        return None
    if job.copy_descriptor == "thumbnail":
        return thumbnail_descriptor, lambda rows: rows
    from clipx.methods import load

    if not Path(job.copy_descriptor).is_dir():
        raise ClipxError(f"--copy-descriptor {job.copy_descriptor} is neither 'thumbnail' nor a clipx run or "
                         "checkpoint directory")
    model, preprocess, _ = load(job.copy_descriptor, job.device)
    if not hasattr(model, "encode_image"):
        raise ClipxError(f"--copy-descriptor {job.copy_descriptor} has no image tower (a text-only model)")
    return preprocess, model.encode_image


def _score_shard(scorer, describer, opener: ShardOpener, url: str, job: ScoreJob):
    import pyarrow as pa

    rows: dict[str, list] = {name: [] for name in ("shard", "index", "key", "caption", "sha1", "has_image")}
    scores, images, texts, copies = [], [], [], []
    for batch in batches_of(shard_samples_of(opener, url), job.batch_size):
        image_emb, text_emb = _embed(scorer, batch, job)
        copies += _describe(describer, batch, job) if describer is not None else []
        for (index, sample), image, text in zip(batch, image_emb, text_emb):
            data = sample_image_bytes(sample)
            rows["shard"].append(shard_name(url))
            rows["index"].append(index)
            rows["key"].append(sample["__key__"])
            rows["caption"].append(first_caption(sample))
            rows["sha1"].append(hashlib.sha1(data).hexdigest() if data is not None else None)
            rows["has_image"].append(image is not None)
            scores.append(float(image @ text) if image is not None and text is not None else float("nan"))
            images.append(image)
            texts.append(text)
    columns = {**rows, "index": pa.array(rows["index"], pa.int32()), "score": pa.array(scores, pa.float32())}
    if job.embeddings:
        columns["image_embedding"] = _half_list(images)
        columns["text_embedding"] = _half_list(texts)
    if describer is not None:
        columns["copy_embedding"] = _half_list(copies)
    return pa.table(columns)


@torch.no_grad()
def _embed(scorer, batch: list, job: ScoreJob) -> tuple[list, list]:
    """Each sample's unit image and text embeddings as float32 numpy rows (D,), or None where missing."""
    decoded = [decode_or_reason(sample, scorer.transform)[0] for _, sample in batch]
    captions = [first_caption(sample) for _, sample in batch]
    images: list = [None] * len(batch)
    texts: list = [None] * len(batch)
    with torch.autocast(torch.device(job.device).type, dtype=torch.bfloat16, enabled=job.precision == "bf16"):
        have = [i for i, image in enumerate(decoded) if image is not None]
        if have:
            rows = scorer.embed_images(torch.stack([decoded[i] for i in have]).to(job.device)).float().cpu().numpy()
            for i, row in zip(have, rows):
                images[i] = row
        have = [i for i, caption in enumerate(captions) if caption is not None]
        if have:
            tokens = scorer.tokenize([captions[i] for i in have]).to(job.device)
            rows = scorer.embed_texts(tokens).float().cpu().numpy()
            for i, row in zip(have, rows):
                texts[i] = row
    return images, texts


@torch.no_grad()
def _describe(describer, batch: list, job: ScoreJob) -> list:
    """Each sample's unit copy descriptor (D,), or None without a usable image."""
    preprocess, encode_image = describer
    decoded = [decode_or_reason(sample, preprocess)[0] for _, sample in batch]
    out: list = [None] * len(batch)
    have = [i for i, image in enumerate(decoded) if image is not None]
    if have:
        with torch.autocast(torch.device(job.device).type, dtype=torch.bfloat16, enabled=job.precision == "bf16"):
            rows = encode_image(torch.stack([decoded[i] for i in have]).to(job.device))
        rows = torch.nn.functional.normalize(rows.float(), dim=-1).cpu().numpy()
        for i, row in zip(have, rows):
            out[i] = row
    return out


def _half_list(rows: list):
    import pyarrow as pa

    dim = next((len(row) for row in rows if row is not None), 0)
    matrix = np.stack([row if row is not None else np.zeros(dim, np.float32) for row in rows]) if rows \
        else np.zeros((0, dim), np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float16).reshape(-1)), dim)


def _write_table(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a table is there whole or not at all: a rerun redoes only missing shards


# ---- the manifest -------------------------------------------------------------------------------

def read_manifest(cur: Path) -> dict:
    """CUR/curation.json, checked for what its readers rely on: this version, a list of shards, a list
    of named stages."""
    import json

    path = Path(cur) / MANIFEST
    if not path.is_file():
        raise ClipxError(f"{cur} is not a curation folder (no {MANIFEST}); run `clipx curate score --out {cur}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClipxError(f"{path} cannot be read as a curation manifest ({error}): "
                         "run `clipx curate score` again to write it") from None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("version") != VERSION or not isinstance(stages, list)
            or not isinstance(manifest.get("shards"), list)
            or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages)):
        raise ClipxError(f"{path} is not a version-{VERSION} curation manifest (version, shards and named stages "
                         "expected): write it with a `clipx curate` of this clipx version")
    return manifest


def write_manifest(cur: Path, manifest: dict) -> None:
    write_json_atomic(Path(cur) / MANIFEST, manifest)


def _check_manifest(cur: Path, how: dict, writer: bool) -> None:
    """Start the manifest (``writer``: the one process that does), or check that a folder being
    resumed is scored the way it was (``how``: scorer, shards, embeddings, copy_descriptor)."""
    if (cur / MANIFEST).is_file():
        old = read_manifest(cur)
        if any(old.get(name) != value for name, value in how.items()):
            raise ClipxError(f"{cur} was scored by {old['scorer']} on {len(old['shards'])} shards (embeddings "
                             f"{old['embeddings']}, copy descriptor {old.get('copy_descriptor')}); resume with the "
                             "same --model, --shards, --embeddings and --copy-descriptor, or give another --out")
        return
    cur.mkdir(parents=True, exist_ok=True)
    if writer:
        write_manifest(cur, {"version": VERSION, **how, "stages": []})

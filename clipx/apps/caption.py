"""`clipx caption`: a captioner's caption of every sample of a set of shards, written into copies of them.

The captioner is a clipx CoCa run (loss.name=coca), a SigLIP 2 run trained with its decoder
(loss.name=siglip2) or an open_clip CoCa folder (what `clipx export` writes). Each input shard
becomes OUT/<its name>: every sample's members copied as they were, the caption added as field
``key`` of its .json (clipx/apps/caption_io.py), so ``data.caption_keys: {txt: 0.5, KEY: 0.5}``
trains on the original and the generated captions. A sample whose image cannot be decoded, or whose
.json is not an object, is copied without a caption. OUT/sizes.json holds the sample counts,
OUT/caption.json what produced the captions.

Captioning is shard by shard and a batch never mixes shards; a sampled batch draws from a generator
seeded by (seed, shard name, batch index): a shard's captions are the same whichever process writes
it, so any number of processes (``processes``, or one per rank under srun, torchrun or an MPI
launcher) writes the shards one process writes. Each shard is written to a temporary name and
renamed when complete; a rerun skips the shards already written, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from clipx.apps.caption_io import check_settings, with_caption, write_shard, write_sizes_when_complete
from clipx.apps.shard_work import batches_of, is_writer, run_parts, shard_samples_of
from clipx.data.captions import json_object
from clipx.data.keep import shard_name
from clipx.data.opener import ShardOpener
from clipx.data.pipeline import decode_or_reason
from clipx.data.remote import RemoteOptions
from clipx.data.shards import expand_shards
from clipx.errors import ClipxError
from clipx.models.decoding import generate

RESERVED_KEYS = ("txt", "class_prompt")  # data.caption_keys' names of sources that are no .json field
COUNTS = ("written", "captioned", "without_image", "json_not_object")


@dataclass(frozen=True)
class CaptionJob:
    """What every captioning process needs; picklable for spawned processes."""

    checkpoint: str
    weights: str | None  # None for an open_clip folder
    out: str
    key: str
    method: str
    beams: int
    temperature: float
    top_k: int
    seed: int
    max_tokens: int
    min_tokens: int
    batch_size: int
    device: str
    options: RemoteOptions
    threads: int | None = None


@dataclass
class Captioner:
    """A captioning model (``image_context``, ``next_token_logits``: clipx/models/decoders.py), its
    image transform (PIL image -> (3, H, W)) and the longest token sequence its decoder reads."""

    model: torch.nn.Module
    transform: Callable
    context_length: int


def caption_shards(checkpoint: str | Path, data: str, out: str | Path, *, key: str = "synthetic_caption",
                   method: str = "greedy", beams: int = 4, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                   max_tokens: int = 30, min_tokens: int = 0, batch_size: int = 64, processes: int = 1,
                   device: str | None = None, weights: str = "auto", options: RemoteOptions | None = None) -> dict:
    """Caption every shard of ``data`` (a pattern, local or remote) with the captioner ``checkpoint``
    (a clipx coca or siglip2 run or checkpoint, or an open_clip CoCa folder) into copies in ``out``;
    returns {"shards", "skipped", "written", "captioned", "without_image", "json_not_object"}, the
    counts of samples covering the shards written by this call (under a launcher: by this rank).

    ``processes`` > 1 spawns that many processes; a process started by a launcher captions its own
    share instead. Shards are dealt by their place in the list, as `clipx curate score` deals them.
    """
    _check_arguments(processes, batch_size, key)
    # the generation settings are checked (one line each) before any model is loaded: no rows to generate
    generate(lambda tokens, source: tokens, 0, sot=0, eot=1, max_tokens=max_tokens, method=method, beams=beams,
             temperature=temperature, top_k=top_k, min_tokens=min_tokens)
    options = options or RemoteOptions()
    urls = expand_shards(data, "--data", options=options)
    names = [shard_name(url) for url in urls]
    if len(set(names)) != len(names):
        raise ClipxError("--data names two shards alike; their captioned copies would overwrite each other")
    dest = Path(out)
    if any("://" not in url and Path(url).parent.resolve() == dest.resolve() for url in urls):
        raise ClipxError(f"--out {dest} holds the input shards; write the captioned copies to another folder")
    source, chosen = _resolve(checkpoint, weights)
    settings = {"checkpoint": source, "weights": chosen, "method": method, "beams": beams, "temperature": temperature,
                "top_k": top_k, "seed": seed, "max_tokens": max_tokens, "min_tokens": min_tokens, "key": key,
                "batch_size": batch_size, "data": data}
    check_settings(dest, settings, writer=is_writer())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    job = CaptionJob(source, chosen, str(dest), key, method, beams, temperature, top_k, seed, max_tokens,
                     min_tokens, batch_size, device, options)
    todo = [url for url in urls if not (dest / shard_name(url)).is_file()]
    counts = {**dict.fromkeys(COUNTS, 0),
              **run_parts(_caption_part, job, urls, processes, done=lambda url: (dest / shard_name(url)).is_file())}
    write_sizes_when_complete(dest, names)
    return {"shards": len(urls), "skipped": len(urls) - len(todo), **counts}


def _check_arguments(processes: int, batch_size: int, key: str) -> None:
    if processes < 1:
        raise ClipxError(f"--processes must be at least 1, got {processes}")
    if batch_size < 1:
        raise ClipxError(f"--batch-size must be at least 1, got {batch_size}")
    if not key:
        raise ClipxError("--key must name the .json field of the caption, e.g. synthetic_caption")
    if key in RESERVED_KEYS:
        raise ClipxError(f"--key {key!r} cannot be a .json field that data.caption_keys reads (txt and class_prompt "
                         "name other sources); choose another name, e.g. synthetic_caption")


def _resolve(checkpoint: str | Path, weights: str) -> tuple[str, str | None]:
    """(the folder the captions come from, the weights read: raw or ema; None for an open_clip folder)."""
    from clipx.api import choose_weights
    from clipx.run_layout import as_checkpoint

    path = Path(checkpoint)
    if not path.is_dir():
        raise ClipxError(f"--checkpoint {checkpoint} is not a directory (a clipx coca or siglip2 run or checkpoint, "
                         "or an open_clip CoCa folder)")
    if (path / "open_clip_config.json").is_file():
        return str(path.resolve()), None
    path = as_checkpoint(path)
    return str(path.resolve()), choose_weights(path, weights)


def _caption_part(job: CaptionJob, urls: list[str]) -> dict:
    """Caption the shards ``urls``; the counts of what was written."""
    from open_clip.tokenizer import SimpleTokenizer

    counts = dict.fromkeys(COUNTS, 0)
    if not urls:
        return counts
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    captioner = load_captioner(job.checkpoint, job.weights or "auto", job.device)
    if job.max_tokens + 1 > captioner.context_length:
        raise ClipxError(f"--max-tokens {job.max_tokens} does not fit the decoder's context of "
                         f"{captioner.context_length} tokens (the start token included); use at most "
                         f"{captioner.context_length - 1}")
    tokenizer, opener = SimpleTokenizer(), ShardOpener(job.options)
    for url in urls:
        _caption_shard(captioner, tokenizer, opener, url, job, counts)
    return counts


def _caption_shard(captioner: Captioner, tokenizer, opener: ShardOpener, url: str, job: CaptionJob,
                   counts: dict) -> None:
    name = shard_name(url)

    def samples() -> Iterator[dict]:
        read = (sample for _, sample in shard_samples_of(opener, url))
        for index, batch in enumerate(batches_of(read, job.batch_size)):
            generator = torch.Generator().manual_seed(batch_seed(job.seed, name, index)) \
                if job.method == "sample" else None
            for sample, caption in zip(batch, caption_batch(captioner, tokenizer, batch, job, generator, counts)):
                yield with_caption(sample, job.key, caption)

    write_shard(Path(job.out) / name, samples())
    counts["written"] += 1


def batch_seed(seed: int, shard: str, batch: int) -> int:
    """The seed of a sampled batch: the same in every process, for any process count."""
    return zlib.crc32(json.dumps([seed, shard, batch]).encode("utf-8"))


@torch.no_grad()
def caption_batch(captioner: Captioner, tokenizer, batch: list[dict], job: CaptionJob,
                  generator: torch.Generator | None, counts: dict) -> list[str | None]:
    """Each sample's generated caption, or None (no decodable image, or a .json that is no object)."""
    decoded = [decode_or_reason(sample, captioner.transform)[0] for sample in batch]
    have = [i for i, image in enumerate(decoded) if image is not None and json_object(batch[i]) is not None]
    counts["without_image"] += sum(image is None for image in decoded)
    counts["json_not_object"] += sum(image is not None for image in decoded) - len(have)
    counts["captioned"] += len(have)
    captions: list[str | None] = [None] * len(batch)
    if have:
        images = torch.stack([decoded[i] for i in have]).to(job.device)
        for i, text in zip(have, generate_captions(captioner.model, images, tokenizer, job, generator)):
            captions[i] = text
    return captions


def generate_captions(model, images: torch.Tensor, tokenizer, job, generator: torch.Generator | None) -> list[str]:
    """Captions of ``images`` (B, 3, H, W) by ``model`` (``image_context``, ``next_token_logits``),
    decoded with open_clip's BPE ``tokenizer`` (its SimpleTokenizer)."""
    context = model.image_context(images)  # (B, N, W)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    tokens = generate(lambda prefix, source: model.next_token_logits(context[source], prefix), len(images),
                      sot=sot, eot=eot, pad=0, max_tokens=job.max_tokens, method=job.method, beams=job.beams,
                      temperature=job.temperature, top_k=job.top_k, generator=generator,
                      min_tokens=job.min_tokens, device=images.device)
    return [decode_tokens(tokenizer, row) for row in tokens.tolist()]


def decode_tokens(tokenizer, row: list[int]) -> str:
    """sot, generated ids, eot, pad... -> the caption text: the ids up to the eot (pad ids, which are
    the "!" token, only ever follow it), without the start and end markers."""
    eot = tokenizer.eot_token_id
    ids = row[1:]
    ids = ids[:ids.index(eot)] if eot in ids else ids
    text = tokenizer.decode(ids)
    return text.replace("<start_of_text>", "").replace("<end_of_text>", "").strip()


def load_captioner(path: str | Path, weights: str = "auto", device: str = "cpu") -> Captioner:
    """The captioner in ``path``: a clipx checkpoint or run directory (its ``weights``) or an open_clip
    CoCa folder; a one-line error for a model without a text decoder."""
    path = Path(path)
    if (path / "open_clip_config.json").is_file():
        return _open_clip_captioner(path, device)
    from clipx.api import load_model
    from clipx.data.transforms import eval_transform
    from clipx.models import image_size

    model, config = load_model(path, device, weights)
    if not hasattr(model, "next_token_logits") or getattr(model, "decoder", True) is None:
        detail = " trained without its decoder (loss.siglip2.decoder_weight=0)" \
            if hasattr(model, "next_token_logits") else " without a text decoder"
        raise ClipxError(f"{path} is a loss.name={config.loss.name} model{detail}; caption with a coca or siglip2 run")
    m = config.model
    arch = getattr(model, "open_clip_arch", m.arch)
    return Captioner(model, eval_transform(image_size(m), m.image_mean, m.image_std), _context_length(arch))


class OpenClipCoCa(torch.nn.Module):
    """open_clip's ``CoCa`` with a clipx captioner's two calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model: Any = model  # open_clip.CoCa

    def image_context(self, images: torch.Tensor) -> torch.Tensor:
        return self.model._encode_image(images)[1]  # (B, N, W): the image tower's tokens

    def next_token_logits(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_decoder(context, self.model._encode_text(tokens)[1])[:, -1]  # (n, V)


def _open_clip_captioner(path: Path, device: str) -> Captioner:
    import open_clip

    try:
        model_cfg = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ClipxError(f"{path}/open_clip_config.json cannot be read as an open_clip config ({error})") from None
    if not isinstance(model_cfg, dict) or "multimodal_cfg" not in model_cfg:
        raise ClipxError(f"{path} is an open_clip model without a text decoder (no multimodal_cfg in its "
                         "open_clip_config.json); caption with a CoCa")
    if not any(any(path.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth")):
        raise ClipxError(f"{path} holds an open_clip config but no weights (open_clip_model.safetensors)")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return Captioner(OpenClipCoCa(model).to(device).eval(), preprocess, _context_length(model_cfg))


def _context_length(arch: dict) -> int:
    """The longest token sequence both the text tower and the decoder of ``arch`` read."""
    return min(cfg.get("context_length", 77) for cfg in (arch.get("text_cfg", {}), arch.get("multimodal_cfg", {})))

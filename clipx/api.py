"""Loading trained models, for every consumer (evaluators, export, encode, the report, ``clipx.load``).

``clipx.load(path)`` gives a model, its image preprocessing and its tokenizer:

    import clipx
    model, preprocess, tokenizer = clipx.load("runs/demo/run")       # a run or checkpoint directory
    images = torch.stack([preprocess(Image.open(p)) for p in paths])  # (N, 3, H, W)
    image_features = model.encode_image(images)                       # (N, D), unit norm
    text_features = model.encode_text(tokenizer(["a handwritten seven."]))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.methods import build_model
from clipx.run_layout import WEIGHT_FILES, as_checkpoint, has_weights, model_shards
from clipx.train.sharding import read_model_state

WEIGHT_CHOICES = ("auto", "ema", "raw")  # auto: the EMA weights when the checkpoint has them


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"):
    """(model in eval mode, preprocess: PIL image -> (3, H, W) tensor, tokenizer: list[str] -> (N, L) ids).

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint). The model is
    built from the checkpoint's own config.yaml; ``model.encode_image`` and ``model.encode_text``
    return unit-norm embeddings. Image-only (self-supervised) checkpoints have no text tower, text-only
    (SimCSE) ones no image tower (no ``encode_image``).
    ``weights``: ``auto`` (the EMA weights when the run kept them, train.ema_decay), ``ema`` or ``raw``.
    """
    from clipx.data.tokenizer import Tokenizer
    from clipx.data.transforms import image_transform
    from clipx.models import image_size
    model, config = load_model(path, device, weights)
    preprocess = image_transform(image_size(config.model), config.model.image_mean, config.model.image_std,
                                 train=False)
    tokenizer = Tokenizer(config.model) if hasattr(model, "encode_text") else None
    return model, preprocess, tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"):
    """(model in eval mode, config) from a checkpoint directory, built from its own config.yaml alone.

    ``weights``: ``raw`` (the trained weights), ``ema`` (their moving average, train.ema_decay) or
    ``auto`` (ema when the checkpoint has it). A sharded (FSDP) checkpoint is consolidated on the fly
    from its ranks' model shards."""
    path = as_checkpoint(path)
    chosen = choose_weights(path, weights)
    config = load_config(path / "config.yaml")
    model = build_model(config)
    state = read_weights(path, model.state_dict(), chosen)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ClipxError(f"{path} weights do not match its config.yaml: {detail}") from None
    return model.to(device).eval(), config


def choose_weights(path: str | Path, weights: str = "auto") -> str:
    """``ema`` or ``raw``: the weights of checkpoint ``path`` that ``weights`` (auto, ema, raw) selects."""
    if weights not in WEIGHT_CHOICES:
        raise ClipxError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}; got {weights!r}")
    checkpoint = as_checkpoint(path)
    present = has_weights(checkpoint, "ema")
    if weights == "ema" and not present:
        raise ClipxError(f"{checkpoint} holds no EMA weights (its run did not set train.ema_decay); "
                         "use --weights raw (or auto)")
    return "ema" if present and weights != "raw" else "raw"


def read_weights(checkpoint: Path, like: dict[str, torch.Tensor], weights: str = "raw") -> dict[str, torch.Tensor]:
    """The whole model state dict of ``checkpoint`` (``weights``: its raw or its EMA model): the whole
    file, or else its shards joined. Parameters that sharding turned from scalars into 1-element
    vectors get the shapes of ``like``."""
    whole, stem = WEIGHT_FILES[weights]
    shards = model_shards(checkpoint, weights) and not (checkpoint / whole).is_file()
    source = checkpoint / f"{stem.format(rank='*')}.safetensors" if shards else checkpoint / whole
    try:
        state = read_model_state(checkpoint, weights)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ClipxError(f"{source} cannot be read: {str(error).splitlines()[0]}") from None
    # DDP-wrapped models can save with a "module." prefix.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v.reshape(like[k].shape) if k in like and like[k].ndim == 0 and v.shape == (1,) else v
            for k, v in state.items()}


def consolidate(path: str | Path, out: str | Path | None = None, weights: str = "raw") -> Path:
    """Write a sharded (FSDP) checkpoint's whole model (``weights``: raw, or ema) as one safetensors
    file: ``out``, by default the checkpoint's own model.safetensors (model_ema.safetensors), which every
    consumer then reads directly. Written to a temporary name, fsynced and renamed, so a crash leaves
    no half-written weights file."""
    checkpoint = as_checkpoint(path)
    if not model_shards(checkpoint, weights):
        raise ClipxError(f"{checkpoint} holds no {'EMA ' if weights == 'ema' else ''}model shards (it was not "
                         f"written with train.sharding=fsdp); its {WEIGHT_FILES[weights][0]} is already the whole model")
    model, _ = load_model(checkpoint, weights=weights)
    target = Path(out) if out is not None else checkpoint / WEIGHT_FILES[weights][0]
    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target

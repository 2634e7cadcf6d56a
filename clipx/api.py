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
from safetensors.torch import load_file, save_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.methods import build_model
from clipx.run_layout import MODEL_SHARD, MODEL_WEIGHTS, as_checkpoint, model_shards
from clipx.train.sharding import read_sharded_model


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess: PIL image -> (3, H, W) tensor, tokenizer: list[str] -> (N, L) ids).

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint). The model is
    built from the checkpoint's own config.yaml; ``model.encode_image`` and ``model.encode_text``
    return unit-norm embeddings. Image-only (self-supervised) checkpoints have no text tower.
    """
    from clipx.data.tokenizer import Tokenizer
    from clipx.data.transforms import image_transform
    from clipx.models import image_size
    model, config = load_model(path, device)
    preprocess = image_transform(image_size(config.model), config.model.image_mean, config.model.image_std,
                                 train=False)
    tokenizer = Tokenizer(config.model) if hasattr(model, "encode_text") else None
    return model, preprocess, tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) from a checkpoint directory, built from its own config.yaml alone.

    A sharded (FSDP) checkpoint is consolidated on the fly from its ranks' model shards."""
    path = as_checkpoint(path)
    config = load_config(path / "config.yaml")
    model = build_model(config)
    weights = read_weights(path, model.state_dict())
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ClipxError(f"{path} weights do not match its config.yaml: {detail}") from None
    return model.to(device).eval(), config


def read_weights(checkpoint: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole model state dict of ``checkpoint``: model.safetensors, or else its model shards joined.
    Parameters that sharding turned from scalars into 1-element vectors get the shapes of ``like``."""
    shards = model_shards(checkpoint)
    whole = (checkpoint / MODEL_WEIGHTS).is_file() or not shards  # consolidated, or never sharded
    source = checkpoint / MODEL_WEIGHTS if whole else checkpoint / f"{MODEL_SHARD.format(rank='*')}.safetensors"
    try:
        weights = load_file(str(source), device="cpu") if whole else read_sharded_model(checkpoint, shards)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ClipxError(f"{source} cannot be read: {str(error).splitlines()[0]}") from None
    # DDP-wrapped models can save with a "module." prefix.
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    return {k: v.reshape(like[k].shape) if k in like and like[k].ndim == 0 and v.shape == (1,) else v
            for k, v in weights.items()}


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write a sharded (FSDP) checkpoint's whole model as one safetensors file: ``out``, by default the
    checkpoint's own model.safetensors, which every consumer then reads directly. Written to a
    temporary name, fsynced and renamed, so a crash leaves no half-written weights file."""
    checkpoint = as_checkpoint(path)
    if not model_shards(checkpoint):
        raise ClipxError(f"{checkpoint} holds no model shards (it was not written with train.sharding=fsdp); "
                         "its model.safetensors is already the whole model")
    model, _ = load_model(checkpoint)
    target = Path(out) if out is not None else checkpoint / MODEL_WEIGHTS
    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target

"""A checkpoint's model weights as stored: raw or EMA (train.ema_decay), the whole file or every
rank's shards (train.sharding=fsdp) joined. File reading only (safetensors and clipx's tensor trees,
clipx/train/state_io.py), no model building: whatever loads a checkpoint (consumers' loading in
clipx.api and the method registry's ``load_model``, which also serves distillation's teachers)
reads its weights here."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from clipx.errors import ClipxError
from clipx.run_layout import MODEL_SHARD, WEIGHT_CHOICES, WEIGHT_FILES, as_checkpoint, has_weights, model_shards
from clipx.train.state_io import load_tree, merge_shards


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


def read_sharded_model(folder: Path, world_size: int, stem: str = MODEL_SHARD) -> dict[str, torch.Tensor]:
    """The whole model state dict from the model shards of ``world_size`` ranks (no process group needed)."""
    return merge_shards([load_tree(folder / stem.format(rank=r)) for r in range(world_size)])


def read_model_state(checkpoint: Path, weights: str = "raw") -> dict[str, torch.Tensor]:
    """The whole state dict of ``checkpoint``'s raw or EMA model (``weights``), on the host: its
    whole file (a DDP run's, or consolidated), or else its ranks' shards joined."""
    whole, stem = WEIGHT_FILES[weights]
    shards = model_shards(checkpoint, weights)
    if (checkpoint / whole).is_file() or not shards:
        return load_file(str(checkpoint / whole), device="cpu")
    return read_sharded_model(checkpoint, shards, stem)


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

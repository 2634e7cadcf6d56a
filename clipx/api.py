"""Loading trained models, for every consumer (evaluators, export, encode, the report, ``clipx.load``).

``clipx.load(path)`` gives a model, its image preprocessing and its tokenizer:

    import clipx
    model, preprocess, tokenizer = clipx.load("runs/demo/run")       # a run or checkpoint directory
    images = torch.stack([preprocess(Image.open(p)) for p in paths])  # (N, 3, H, W)
    image_features = model.encode_image(images)                       # (N, D), unit norm
    text_features = model.encode_text(tokenizer(["a handwritten seven."]))

``load`` and ``load_model`` live beside the method registry (clipx/methods/__init__.py), since a
checkpoint's model is built by the method its config names, and its weights are read by
clipx/weights.py; this module is where consumers find them, with ``consolidate``.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from clipx.errors import ClipxError
from clipx.methods import load, load_model  # built by the checkpoint's method: the registry's home
from clipx.run_layout import WEIGHT_FILES, as_checkpoint, model_shards
from clipx.weights import WEIGHT_CHOICES, choose_weights, read_weights

__all__ = ["WEIGHT_CHOICES", "choose_weights", "consolidate", "load", "load_model", "read_weights"]


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

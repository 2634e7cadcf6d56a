"""Loading trained models, for every consumer (evaluators, export, encode, the report, ``clipx.load``).

``clipx.load(path)`` gives a model, its image preprocessing and its tokenizer:

    import clipx
    model, preprocess, tokenizer = clipx.load("runs/demo/run")       # a run or checkpoint directory
    images = torch.stack([preprocess(Image.open(p)) for p in paths])  # (N, 3, H, W)
    image_features = model.encode_image(images)                       # (N, D), unit norm
    text_features = model.encode_text(tokenizer(["a handwritten seven."]))
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.methods import build_model
from clipx.run_layout import as_checkpoint


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
    """(model in eval mode, config) from a checkpoint directory, built from its own config.yaml alone."""
    path = as_checkpoint(path)
    config = load_config(path / "config.yaml")
    model = build_model(config)
    try:
        weights = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ClipxError(f"{path}/model.safetensors cannot be read: {str(error).splitlines()[0]}") from None
    # DDP-wrapped models can save with a "module." prefix.
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ClipxError(f"{path}/model.safetensors does not match its config.yaml: {detail}") from None
    return model.to(device).eval(), config

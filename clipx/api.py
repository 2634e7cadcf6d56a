"""The small Python API: ``clipx.load(path)`` gives a model, its image preprocessing and its tokenizer.

    import clipx
    model, preprocess, tokenizer = clipx.load("runs/demo/run")       # a run or checkpoint directory
    images = torch.stack([preprocess(Image.open(p)) for p in paths])  # (N, 3, H, W)
    image_features = model.encode_image(images)                       # (N, D), unit norm
    text_features = model.encode_text(tokenizer(["a handwritten seven."]))
"""

from __future__ import annotations

from pathlib import Path

import torch


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess: PIL image -> (3, H, W) tensor, tokenizer: list[str] -> (N, L) ids).

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint). The model is
    built from the checkpoint's own config.yaml; ``model.encode_image`` and ``model.encode_text``
    return unit-norm embeddings. Image-only (self-supervised) checkpoints have no text tower.
    """
    from clipx.data.tokenizer import Tokenizer
    from clipx.data.transforms import image_transform
    from clipx.models import image_size
    from clipx.train.checkpoint import load_model

    model, config = load_model(path, device)
    preprocess = image_transform(image_size(config.model), config.model.image_mean, config.model.image_std,
                                 train=False)
    tokenizer = Tokenizer(config.model) if hasattr(model, "encode_text") else None
    return model, preprocess, tokenizer

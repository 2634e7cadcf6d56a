"""Embed every image (and caption) of an evaluation loader with a DualEncoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipx.errors import ClipxError


@dataclass
class Embeddings:
    image_features: torch.Tensor  # (N, D), unit norm
    labels: torch.Tensor  # (N,), -1 where a sample has no label
    keys: list[str]  # (N,)
    text_features: torch.Tensor  # (M, D), unit norm, every caption of every image
    text_to_image: torch.Tensor  # (M,), index into the images


@torch.no_grad()
def embed_dataset(model, loader, tokenizer, device, with_texts: bool = True, text_batch: int = 512) -> Embeddings:
    """Run the model over every batch of ``loader`` (see clipx.data.pipeline.build_eval_loader)."""
    model.eval()
    images, labels, keys, captions, owners = [], [], [], [], []
    for batch in loader:
        images.append(model.encode_image(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
        first = len(keys)
        for offset, sample_captions in enumerate(batch["captions"]):
            captions.extend(sample_captions)
            owners.extend([first + offset] * len(sample_captions))
        keys.extend(batch["key"])
    if not images:
        raise ClipxError("the evaluation shards yielded no decodable image; check the shards' members "
                         "(.jpg/.png/.webp + .txt)")
    texts = embed_texts(model, tokenizer, captions, device, text_batch) if with_texts and captions else None
    return Embeddings(
        image_features=torch.cat(images),
        labels=torch.cat(labels),
        keys=keys,
        text_features=texts if texts is not None else torch.empty(0, images[0].shape[1]),
        text_to_image=torch.tensor(owners, dtype=torch.long),
    )


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device, batch_size: int = 512) -> torch.Tensor:
    """list of M strings -> (M, D) unit-norm text features."""
    model.eval()
    chunks = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)

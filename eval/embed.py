"""Embed every image (and caption) of an evaluation loader with a DualEncoder, on one or many ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipx.errors import ClipxError
from clipx.models.classifier import encode_texts


@dataclass
class Embeddings:
    image_features: torch.Tensor  # (N, D), unit norm
    labels: torch.Tensor  # (N,), -1 where a sample has no label
    keys: list[str]  # (N,)
    text_features: torch.Tensor  # (M, D), unit norm, every caption of every image
    text_to_image: torch.Tensor  # (M,), index into the images
    duplicates: int = 0  # samples dropped because their key was already seen


@torch.no_grad()
def embed_dataset(model, loader, tokenizer, device, dim: int, with_texts: bool = True,
                  text_batch: int = 512) -> Embeddings:
    """Run the model over every batch of ``loader`` (see clipx.data.eval_loader.build_eval_loader).

    ``dim`` is the embedding width. The result may be empty: with sharded evaluation a rank can
    own no sample.
    """
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
    texts = encode_texts(model, tokenizer, captions, device, text_batch) if with_texts and captions else None
    return Embeddings(
        image_features=torch.cat(images) if images else torch.empty(0, dim),
        labels=torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        keys=keys,
        text_features=texts if texts is not None else torch.empty(0, dim),
        text_to_image=torch.tensor(owners, dtype=torch.long) if texts is not None else torch.empty(0, dtype=torch.long),
    )


def merge_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Concatenate parts (one per rank), order images by key and keep each key once.

    The canonical order makes sharded and single-process evaluation compute the same numbers,
    and de-duplication makes a sample read by two ranks count once.
    """
    keys = [key for part in parts for key in part.keys]
    images = torch.cat([p.image_features for p in parts])
    labels = torch.cat([p.labels for p in parts])
    offsets = torch.tensor([0] + [len(p.keys) for p in parts[:-1]]).cumsum(0)
    owners = torch.cat([p.text_to_image + offset for p, offset in zip(parts, offsets)])
    texts = torch.cat([p.text_features for p in parts])
    first_index: dict[str, int] = {}
    for index, key in enumerate(keys):
        first_index.setdefault(key, index)
    order = sorted(first_index.values(), key=lambda i: keys[i])
    if not order:
        raise ClipxError("the evaluation shards yielded no decodable image; check the shards' members "
                         "(.jpg/.png/.webp + .txt)")
    new_position = torch.full((len(keys),), -1, dtype=torch.long)
    new_position[torch.tensor(order)] = torch.arange(len(order))
    text_owner = new_position[owners] if len(owners) else torch.zeros(0, dtype=torch.long)
    kept = (text_owner >= 0).nonzero().flatten()
    # Captions follow their images' order (stable: an image's captions keep their own order), so
    # ties between identical captions break the same way however the samples were split.
    kept = kept[torch.argsort(text_owner[kept], stable=True)]
    return Embeddings(
        image_features=images[order],
        labels=labels[order],
        keys=[keys[i] for i in order],
        text_features=texts[kept],
        text_to_image=text_owner[kept],
        duplicates=len(keys) - len(order),
    )

"""The keys of a training batch, defined once, and the two ways samples become a batch.

Every pipeline and objective uses these names. A method picks its collation (image + tokenized
caption, or augmented views); the streaming pipeline only calls what it is given.
"""

from __future__ import annotations

import torch

IMAGE = "image"  # (B, 3, H, W) float, normalised
TEXT = "text"  # (B, L) int64 token ids
VIEWS = "views"  # list of (B, 3, H, W) augmented views of the same images (self-supervised modes)
KEY = "key"  # list of B sample keys, for de-duplication and debugging


class ImageTextBatch:
    """Samples {"image": (3, H, W), "text": str, "key"} -> {"image": (B, 3, H, W), "text": (B, L), "key"}."""

    needs_caption = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        return {KEY: [s["key"] for s in samples], IMAGE: torch.stack([s["image"] for s in samples]),
                TEXT: self.tokenizer([s["text"] for s in samples])}


class ViewsBatch:
    """Samples whose "image" is a list of V views -> {"views": V tensors (B, 3, H, W), "key"}.
    Captions are not needed: image-only methods train on images without one."""

    needs_caption = False

    def __call__(self, samples: list[dict]) -> dict:
        views = len(samples[0]["image"])
        return {KEY: [s["key"] for s in samples],
                VIEWS: [torch.stack([s["image"][v] for s in samples]) for v in range(views)]}

"""Symmetric InfoNCE (the CLIP loss) on features, with negatives gathered across ranks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.config import GATHER_MODES
from clipx.losses.chunked import ChunkedCrossEntropy


def _dense(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the full (M, M) logits of matching rows."""
    logits = logit_scale * images @ texts.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ClipLoss(nn.Module):
    """Cross-entropy of image->text and text->image logits, averaged.

    gather:
      none   -- each rank contrasts only its own batch: (B, B) logits, fewest negatives.
      global -- every rank builds the full (N, N) logits over the global batch N = world * B.
      local  -- this rank's B rows against all N gathered columns, the same loss and gradients as
                ``global``; the columns are streamed in chunks of ``chunk_size``, so no (B, N) matrix
                is ever held and memory grows linearly with N. The default.

    In ``global`` and ``local`` the gather keeps gradients: each rank's features receive the sum of
    what every rank's loss says about them, which is exactly what averaging gradients across ranks
    (DDP) needs to reproduce the single-process gradient of the mean loss.
    """

    def __init__(self, gather: str = "local", chunk_size: int = 1024):
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}; got {gather!r}")
        self.gather = gather
        self.chunk_size = chunk_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features, text_features: (B, D), L2-normalised; logit_scale: scalar, already exp()'d."""
        batch = image_features.shape[0]
        if self.gather == "none" or not dist.is_distributed():
            return _dense(image_features, text_features, logit_scale)  # (B, B) logits
        all_images = dist.gather_with_grad(image_features)  # (N, D)
        all_texts = dist.gather_with_grad(text_features)  # (N, D)
        if self.gather == "global":
            return _dense(all_images, all_texts, logit_scale)  # (N, N) logits on every rank

        # This rank's B rows against all N columns, streamed in column chunks: the (B, N) logits are
        # never held, so the loss's memory grows with N only through the gathered (N, D) features.
        labels = torch.arange(batch, device=image_features.device) + dist.rank() * batch
        image_to_text = ChunkedCrossEntropy.apply(image_features, all_texts, logit_scale, labels, self.chunk_size)
        text_to_image = ChunkedCrossEntropy.apply(text_features, all_images, logit_scale, labels, self.chunk_size)
        return (image_to_text + text_to_image) / 2

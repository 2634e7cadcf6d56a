"""Symmetric InfoNCE (the CLIP loss) on features, with negatives gathered across ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.config import GATHER_MODES
from clipx.losses.chunked import ChunkedCrossEntropy


def _dense(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
           negatives: Optional[torch.Tensor] = None, symmetric: bool = True) -> torch.Tensor:
    """Cross-entropy over the full (M, M) logits of matching rows, both ways (or image-to-text only);
    hard ``negatives`` (H, D) are extra columns of the image-to-text direction only."""
    logits = logit_scale * images @ texts.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = logits if negatives is None else torch.cat([logits, logit_scale * images @ negatives.T], dim=1)
    if not symmetric:
        return F.cross_entropy(image_to_text, labels)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.T, labels)) / 2


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

    Hard negatives (NegCLIP, Yuksekgonul et al. 2023): ``negatives`` (B, D), the embeddings of each
    sample's negative caption, and ``negative_mask`` (B,), which samples have one, are gathered like
    the texts; every present one becomes an extra column of the image-to-text softmax of every
    image. The text-to-image direction keeps its columns: a negative caption has no image.

    ``symmetric=False`` keeps the image-to-text direction alone: SimCSE's loss (Gao et al. 2021), where
    the rows are sentences and the columns their positives (clipx/methods/simcse.py).
    """

    def __init__(self, gather: str = "local", chunk_size: int = 1024, symmetric: bool = True):
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}; got {gather!r}")
        self.gather = gather
        self.chunk_size = chunk_size
        self.symmetric = symmetric

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                negatives: Optional[torch.Tensor] = None, negative_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """image_features, text_features, negatives: (B, D), L2-normalised; logit_scale: scalar, already
        exp()'d; negative_mask: (B,) bool."""
        batch = image_features.shape[0]
        distributed = self.gather != "none" and dist.is_distributed()
        if negatives is not None:
            if negative_mask is None:
                raise ValueError("negatives need negative_mask: which samples have one")
            if distributed:
                negatives = dist.gather_with_grad(negatives)  # (N, D)
                negative_mask = dist.gather_no_grad(negative_mask.to(torch.uint8)).bool()  # gloo gathers no bools
            negatives = negatives[negative_mask]  # (H, D): the samples that have one
        if not distributed:
            return _dense(image_features, text_features, logit_scale, negatives, self.symmetric)  # (B, B [+ H])
        all_images = dist.gather_with_grad(image_features)  # (N, D)
        all_texts = dist.gather_with_grad(text_features)  # (N, D)
        if self.gather == "global":
            return _dense(all_images, all_texts, logit_scale, negatives, self.symmetric)  # (N, N [+ H]), every rank

        # This rank's B rows against all N columns, streamed in column chunks: the (B, N) logits are
        # never held, so the loss's memory grows with N only through the gathered (N, D) features.
        labels = torch.arange(batch, device=image_features.device) + dist.rank() * batch
        columns = all_texts if negatives is None else torch.cat([all_texts, negatives])  # (N [+ H], D)
        image_to_text = ChunkedCrossEntropy.apply(image_features, columns, logit_scale, labels, self.chunk_size)
        if not self.symmetric:
            return image_to_text
        text_to_image = ChunkedCrossEntropy.apply(text_features, all_images, logit_scale, labels, self.chunk_size)
        return (image_to_text + text_to_image) / 2

"""The captioning loss of a text decoder (CoCa, LocCa): next-token cross-entropy, averaged over the
caption tokens of the whole batch, padding left out.

Averaged over every rank's tokens (``gather``): each rank divides its summed cross-entropy by the
global token count over the number of ranks, so DDP's average of the ranks' gradients is the
gradient of one process's token mean over the union batch, however the tokens fall on the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx import dist
from clipx.data.batch import PAD
from clipx.precision import upcast


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = PAD, gather: bool = True) -> torch.Tensor:
    """logits (..., V) of tokens ``labels`` (...) -> the mean cross-entropy per non-pad token (the
    logits of every position, or of the labelled ones only)."""
    summed = F.cross_entropy(upcast(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1), ignore_index=pad_id,
                             reduction="sum")
    count = (labels != pad_id).sum().to(summed.dtype)
    if gather and dist.is_distributed():
        count = dist.all_reduce_sum_(count.detach().clone()) / dist.world_size()
    return summed / count.clamp(min=1.0)

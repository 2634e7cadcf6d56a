"""NT-Xent (SimCLR): each view's positive is the other view of its image; every other view, on every
rank, is a negative."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.precision import upcast


class NTXentLoss(nn.Module):
    """``NTXentLoss(temperature)(z1, z2)`` with z1, z2: (B, D) projections of two views of B images.

    Anchors are this rank's 2B views; candidates are all 2N views gathered (with gradients) from all
    ranks, minus the anchor itself. The mean over ranks equals the single-process loss on the union
    batch, and DDP's gradient averaging makes the gradients equal too.
    """

    def __init__(self, temperature: float = 0.1, gather: str = "local"):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        batch = z1.shape[0]
        local = F.normalize(upcast(torch.cat([z1, z2])), dim=-1)  # (2B, D): view 1 of all, then view 2
        if self.gather == "none" or not dist.is_distributed():
            rank, everyone = 0, local
        else:
            rank = dist.rank()
            everyone = dist.gather_with_grad(local)  # (world * 2B, D), rank blocks of [view 1; view 2]
        logits = local @ everyone.T / self.temperature  # (2B, 2N)
        offset = rank * 2 * batch
        rows = torch.arange(2 * batch, device=local.device)
        itself = torch.zeros_like(logits, dtype=torch.bool)
        itself[rows, rows + offset] = True
        logits = logits.masked_fill(itself, float("-inf"))  # an anchor is not its own candidate
        partner = torch.cat([rows[batch:], rows[:batch]]) + offset
        return F.cross_entropy(logits, partner)

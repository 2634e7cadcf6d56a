"""NT-Xent (SimCLR): each view's positive is the other view of its image; every other view, on every
rank, is a negative."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.precision import upcast


class ViewLogits(NamedTuple):
    """Similarities of anchor views to every view of the global batch (see ``view_logits``)."""

    logits: torch.Tensor  # (A, 2N) / temperature, each anchor's own column at -inf
    rows: torch.Tensor  # (A,) which of the 2N views each anchor is
    first: int  # the index among the 2N views of this rank's first view


def view_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: str,
                every_anchor: bool = False) -> ViewLogits:
    """The shared start of the two-view losses (NT-Xent, SupCon, i-Mix's mixed NT-Xent).

    z1, z2: (B, D) projections of two views of B images. The views are unit-normalised in fp32 and,
    unless ``gather`` is "none" or there is one process, gathered with gradients from every rank:
    2N views in rank blocks of [view 1; view 2]. Anchors are this rank's 2B views, or all 2N with
    ``every_anchor`` (gather "global"). An anchor is never its own candidate.
    """
    batch = z1.shape[0]
    local = F.normalize(upcast(torch.cat([z1, z2])), dim=-1)  # (2B, D): view 1 of all, then view 2
    distributed = gather != "none" and dist.is_distributed()
    everyone = dist.gather_with_grad(local) if distributed else local  # (2N, D)
    first = dist.rank() * 2 * batch if distributed else 0
    if distributed and every_anchor:
        anchors, rows = everyone, torch.arange(len(everyone), device=local.device)
    else:
        anchors, rows = local, first + torch.arange(2 * batch, device=local.device)
    logits = anchors @ everyone.T / temperature
    logits = logits.index_put((torch.arange(len(rows), device=rows.device), rows), logits.new_full((), float("-inf")))
    return ViewLogits(logits, rows, first)


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
        logits, rows, first = view_logits(z1, z2, self.temperature, self.gather)
        local = rows - first
        partner = first + (local + batch) % (2 * batch)  # view 1 of an image <-> its view 2
        return F.cross_entropy(logits, partner)

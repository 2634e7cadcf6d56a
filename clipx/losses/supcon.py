"""Supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning", L_out): NT-Xent
whose positives are all other views of the anchor's class in the batch gathered across ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from clipx import dist
from clipx.losses.ntxent import view_logits

UNLABELLED = -1  # the label of a sample without one: its only positive is its other view


class SupConLoss(nn.Module):
    """``SupConLoss(temperature, gather)(z1, z2, labels)`` with z1, z2: (B, D) projections of two views
    of B images and labels: (B,) int64 class indices, -1 for a sample without a label (None: all -1).

    With z unit-normalised, views i of the 2N views of the global batch, A(i) every view but i, and
    P(i) the views in A(i) of i's class, the paper's L_out (its Eq. 2, the variant it recommends) is

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

    Where clipx differs from the paper and its code (HobbitLong/SupContrast):
    - an unlabelled sample (-1) falls back to instance positives: P(i) is its other view alone, and it
      is in no labelled anchor's P. With every sample unlabelled the loss is NT-Xent (SimCLR) exactly;
    - the loss is the mean of L_i over anchors, where Eq. 2 sums them (the reference code means too);
    - no factor t / base_temperature (the reference code's, 0.07 by default): the loss is the formula's;
    - two views per image (the paper allows more).

    gather (every mode gives the loss on the union batch when the ranks hold equal batches):
      none   -- each rank's 2B views alone: its own positives and negatives, no communication;
      local  -- this rank's 2B anchors against all 2N views (gathered with gradients; labels gathered);
      global -- all 2N anchors on every rank, (2N, 2N) similarities: more compute, the same result.
    The mean over ranks equals the single-process loss on the union batch, and DDP's gradient
    averaging makes the gradients equal too.
    """

    def __init__(self, temperature: float = 0.1, gather: str = "local"):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = z1.shape[0]
        if labels is None:
            labels = torch.full((batch,), UNLABELLED, dtype=torch.long, device=z1.device)
        local_labels = torch.cat([labels, labels]).long()  # (2B,)
        distributed = self.gather != "none" and dist.is_distributed()
        all_labels = dist.gather_no_grad(local_labels) if distributed else local_labels  # (2N,)
        logits, rows, _ = view_logits(z1, z2, self.temperature, self.gather, every_anchor=self.gather == "global")
        views = torch.arange(logits.shape[1], device=logits.device)
        images = views // (2 * batch) * batch + views % batch  # (2N,) which image of the union batch a view shows
        return supcon_from_logits(logits, rows, images, all_labels)


def supcon_from_logits(logits: torch.Tensor, rows: torch.Tensor, images: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """The mean of L_i over anchors, from their similarities to all views: logits (A, 2N) of anchors
    that are views ``rows`` (A,) of the 2N, ``images`` (2N,) the image of each view, ``labels`` (2N,)."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    itself = rows[:, None] == columns[None, :]  # (A, 2N)
    anchor_labels = labels[rows, None]  # (A, 1)
    same_class = (anchor_labels == labels[None, :]) & (anchor_labels != UNLABELLED)
    positive = (same_class | (images[rows, None] == images[None, :])) & ~itself  # (A, 2N): P(i)
    # An anchor is not its own candidate; log_softmax as cross_entropy computes it (NT-Xent's).
    log_prob = torch.log_softmax(logits.masked_fill(itself, float("-inf")), dim=1)  # (A, 2N)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)  # (A,)
    return per_anchor.mean()

"""The recipe of docs/ARCHITECTURE.md, "A new method", followed for a toy: one module like this one
plus one registry line. It pulls each image towards its own caption with no negatives (it would
collapse if trained long; it exists to show what a method must provide)."""

from __future__ import annotations

import torch

from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod


class PairCosineLoss(torch.nn.Module):
    """1 - cos(image_i, text_i), averaged: (B, D), (B, D), scale (unused) -> scalar."""

    def forward(self, image_features, text_features, logit_scale):
        return (1 - (image_features * text_features).sum(dim=-1)).mean() + 0.0 * logit_scale


class PairCosine(ImageTextMethod):
    def objective(self, model, config):
        return ContrastiveObjective(model, PairCosineLoss())

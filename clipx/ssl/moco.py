"""MoCo's model: an online encoder that the optimizer trains, and its momentum copy that it never does."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from clipx.ssl.batchnorm import shuffled_forward
from clipx.ssl.encoder import ImageEncoder, projection_head


class MoCoModel(nn.Module):
    """encoder (+ predictor, MoCo v3) -> queries; momentum_encoder -> keys.

    The momentum encoder's parameters have ``requires_grad=False``: the optimizer never sees them,
    DDP does not reduce them, and they change only in ``MoCoObjective.after_step``.
    """

    def __init__(self, encoder: ImageEncoder, predictor_hidden: int | None):
        super().__init__()
        self.encoder = encoder
        out = encoder.head[-1].out_features
        self.predictor = projection_head(out, predictor_hidden, out) if predictor_hidden else None
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.feature_dim = encoder.feature_dim  # what encode_image returns, for the probes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm backbone features of the online encoder (what MoCo evaluates)."""
        return self.encoder.encode_image(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) queries."""
        queries = self.encoder(images)
        return self.predictor(queries) if self.predictor is not None else queries

    @torch.no_grad()
    def keys(self, images: torch.Tensor, shuffle: bool) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) keys from the momentum encoder, BatchNorm-shuffled if asked."""
        if shuffle:
            return shuffled_forward(self.momentum_encoder, images)
        return self.momentum_encoder(images)

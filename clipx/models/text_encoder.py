"""TextEncoder: a text tower alone, for text-only contrastive training (SimCSE, clipx/methods/simcse.py).

Its state dict names the tower ``text.`` as DualEncoder does, so a CLIP's text tower initialises it
(model.pretrained) and its locks and layer groups (clipx/models/lock.py) apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.models.towers import set_tower_grad_checkpointing


class TextEncoder(nn.Module):
    """Token ids (B, L) -> unit-norm sentence embeddings (B, E) through one text tower.

    ``dropout`` > 0 adds dropout to the residual stream after each block of an open_clip text
    transformer, in training only: CLIP's text transformer has no dropout, and SimCSE's only
    augmentation is dropout noise (two passes of one sentence differ only by it). It is applied by
    forward hooks, so the tower's parameters and state dict are those of the plain tower.
    """

    def __init__(self, text: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.text = text
        self.dropout = dropout
        if dropout:
            for block in text.transformer.resblocks:
                block.register_forward_hook(self._drop)

    def _drop(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, self.dropout, module.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the tower's activations during backward (open_clip and transformers towers)."""
        set_tower_grad_checkpointing(self.text, enable)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, E), unit norm."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a CLIP's text tower has (what model.pretrained initialises from a CLIP)."""
        return self.state_dict()

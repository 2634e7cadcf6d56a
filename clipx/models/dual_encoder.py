"""DualEncoder: an image tower, a text tower and the learnable temperature."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.models.towers import set_tower_grad_checkpointing


class DualEncoder(nn.Module):
    """Image and text towers embedding into one space, plus a learnable logit scale.

    Attribute names (``visual``, ``text``, ``logit_scale``) follow open_clip's CustomTextCLIP, so
    the state dict of a DualEncoder with open_clip towers is also a valid open_clip state dict.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, init_logit_bias: Optional[float] = None):
        super().__init__()
        self.visual = visual
        self.text = text
        # The scale is learned in log space (CLIP): log(1 / 0.07) at init, clamped at log(100) after
        # every optimizer step (clamp_logit_scale_) so the softmax cannot become arbitrarily sharp.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if init_logit_bias is not None else None
        self.max_log_scale = math.log(max_logit_scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute both towers' activations during backward (open_clip and transformers towers)."""
        for tower in (self.visual, self.text):
            set_tower_grad_checkpointing(tower, enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E), unit norm."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, E), unit norm."""
        return F.normalize(self.text(tokens), dim=-1)

    def scale(self) -> torch.Tensor:
        """The multiplicative logit scale exp(t), a scalar (the parameter is a 1-element vector
        under FSDP sharding, which refuses 0-dim parameters)."""
        return self.logit_scale.exp().reshape(())

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself (as open_clip does), not only its use in forward: a clamp in
        forward alone zeroes the gradient and leaves the optimizer's momentum pushing it further."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """(image_features (B, E), text_features (B, E), logit_scale scalar, logit_bias scalar or None).

        The scale and bias come out of forward (not read off the module by the loss) so that DDP
        sees them used in forward like every other parameter.
        """
        bias = self.logit_bias.reshape(()) if self.logit_bias is not None else None
        return self.encode_image(images), self.encode_text(tokens), self.scale(), bias

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an open_clip CustomTextCLIP has (what ``clipx export`` writes)."""
        return self.state_dict()


class DualEncoderWithImageHead(DualEncoder):
    """A DualEncoder whose image tower also feeds a projection head on augmented views: SLIP's
    SimCLR term (clipx.methods.slip). The head is trained with the towers and checkpointed with
    them; exports leave it out, since open_clip's model has no place for it.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, image_head: nn.Module, **kwargs):
        super().__init__(visual, text, **kwargs)
        self.image_head = image_head

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, views: Optional[torch.Tensor] = None):
        """DualEncoder's four outputs, then, when ``views`` (V*B, 3, H, W) are given, the head's
        projections (V*B, P) of the image tower's (unnormalised) embeddings of them.

        The views go through the tower in a call of their own, as in SLIP: a tower with BatchNorm
        (ModifiedResNet) then normalises the captioned images and the augmented views apart.
        """
        out = super().forward(images, tokens)
        if views is None:
            return out
        return (*out, self.image_head(self.visual(views)))

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("image_head.")}

"""CLIP: the symmetric InfoNCE loss over image-text pairs with a learnable temperature."""

from __future__ import annotations

from clipx.losses import ClipLoss
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod


class CLIP(ImageTextMethod):
    gather_modes = ("none", "global", "local")
    hard_negatives = True
    mixing = True

    def objective(self, model, config):
        if config.ssl.mix != "none":
            from clipx.methods.mixing import MixedContrastiveObjective, mixer_of  # it builds on this module

            return MixedContrastiveObjective(model, ClipLoss(config.loss.gather), mixer_of(config.ssl))
        return ContrastiveObjective(model, ClipLoss(config.loss.gather))

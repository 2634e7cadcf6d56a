"""CLIP: the symmetric InfoNCE loss over image-text pairs with a learnable temperature."""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import IMAGE
from clipx.losses import ClipLoss
from clipx.losses.mixed import mixed_clip
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod
from clipx.methods.mixing import mix_features, mixer_of
from clipx.ssl.mixing import Mixer


class MixedContrastiveObjective(ContrastiveObjective):
    """CLIP with mixed images and clean captions (ssl.mix, clipx/methods/mixing.py): ``mixed_clip``."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, mixer: Mixer):
        super().__init__(model, loss)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        mix = self.mixer(batch[IMAGE])
        return {**super().features({**batch, IMAGE: mix.images}), **mix_features(mix)}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        loss = mixed_clip(features["image"], features["text"], features["logit_scale"], features["mix_lam"],
                          features["mix_shift"], self.loss.gather)
        return {"loss": loss, "metrics": {"logit_scale": features["logit_scale"].detach().clone()}}


class CLIP(ImageTextMethod):
    gather_modes = GATHER_MODES
    hard_negatives = True
    mixing = True

    def objective(self, model, config):
        if config.ssl.mix != "none":
            return MixedContrastiveObjective(model, ClipLoss(config.loss.gather), mixer_of(config.ssl))
        return ContrastiveObjective(model, ClipLoss(config.loss.gather))

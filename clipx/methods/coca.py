"""CoCa (Yu et al., 2022, "Contrastive Captioners are Image-Text Foundation Models"): CLIP's loss on
the image embedding and the text tower's class-token embedding, plus a decoder's captioning loss.

The model is open_clip's CoCa layout (clipx/models/decoders.py), so ``clipx export`` writes a folder
that open_clip loads as its ``CoCa``, and ``clipx caption`` writes captions with it. The loss is
``loss.contrastive_weight`` x CLIP's + ``loss.caption_weight`` x the mean next-token cross-entropy
(open_clip's CoCaLoss, 1 and 2 by default); the contrastive part gathers as CLIP's does and the
captioning part averages over every rank's tokens, so both equal one process on the union batch.
"""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import IMAGE, TEXT, ImageCaptionBatch, caption_targets
from clipx.data.captions import caption_chooser
from clipx.data.tokenizer import Tokenizer
from clipx.errors import ClipxError
from clipx.losses import ClipLoss
from clipx.losses.caption import caption_loss
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod
from clipx.models.factory import create_coca


class CaptioningObjective(ContrastiveObjective):
    """An image-text objective plus ``caption_weight`` x its model's captioning loss: the model's
    forward returns the contrastive outputs, then (B, L - 1, V) logits of each caption's next tokens."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, caption_weight: float,
                 contrastive_weight: float = 1.0, uses_bias: bool = False):
        super().__init__(model, loss, uses_bias)
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight
        self.gather_captions = getattr(loss, "gather", "local") != "none"

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        # Only the positions with a label (not padding) are projected to the vocabulary: the same
        # loss, at a fraction of the cost when captions are short (logits (n, V), labels (n,)).
        positions, labels = caption_targets(batch)
        *outputs, logits = self.model(batch[IMAGE], batch[TEXT], positions)
        return {**self.named(batch, *outputs), "caption_logits": logits, "caption_labels": labels}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        out = super().loss_from_features(features)
        captioning = caption_loss(features["caption_logits"], features["caption_labels"],
                                  gather=self.gather_captions)
        out["metrics"].update(contrastive_loss=out["loss"].detach(), caption_loss=captioning.detach())
        return {**out, "loss": self.contrastive_weight * out["loss"] + self.caption_weight * captioning}


class CoCa(ImageTextMethod):
    gather_modes = GATHER_MODES
    needs_patch_tokens = True

    def validate(self, config) -> None:
        if config.model.text_tower != "open_clip":
            raise ClipxError("loss.name=coca builds open_clip's CoCa, whose decoder reads open_clip's text tower; "
                             "model.text_tower=hf has none")
        if min(config.loss.caption_weight, config.loss.contrastive_weight) < 0:
            raise ClipxError("loss.caption_weight and loss.contrastive_weight must be >= 0")

    def build_model(self, config) -> torch.nn.Module:
        return create_coca(config.model)

    def collate(self, config):
        return ImageCaptionBatch(Tokenizer(config.model, config.data.trim_padding), caption_chooser(config.data, config.eval))

    def objective(self, model, config):
        return CaptioningObjective(model, ClipLoss(config.loss.gather), config.loss.caption_weight,
                                   config.loss.contrastive_weight)

"""SigLIP: a sigmoid loss on every image-text pair, with a learnable temperature and bias."""

from __future__ import annotations

from clipx.errors import ClipxError
from clipx.losses import SigLipLoss
from clipx.losses.siglip import SIGLIP_GATHER_MODES
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod


class SigLIP(ImageTextMethod):
    # Texts travel around a ring of ranks (local); a dense all-gather of the (N, N) logits buys nothing.
    gather_modes = SIGLIP_GATHER_MODES
    variants = {"": {"model.init_logit_bias": -10.0, "model.init_temperature": 0.1}}

    def validate(self, config) -> None:
        if config.model.init_logit_bias is None:
            raise ClipxError("loss.name=siglip needs model.init_logit_bias (the paper uses -10, with "
                             "model.init_temperature=0.1)")

    def objective(self, model, config):
        return ContrastiveObjective(model, SigLipLoss(config.loss.gather), uses_bias=True)

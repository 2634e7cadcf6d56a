"""The CLIP objective: DualEncoder features into a contrastive loss on features."""

from __future__ import annotations

import torch

from clipx.data.batch import IMAGE, TEXT
from clipx.objectives.base import Objective


class ClipObjective(Objective):
    """Image-text contrastive training of a (possibly Accelerate-wrapped) DualEncoder."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module):
        self.model = model
        self.loss = loss

    def __call__(self, batch: dict) -> dict:
        image_features, text_features, logit_scale = self.model(batch[IMAGE], batch[TEXT])
        # Features may come out of bf16/fp16 autocast; the softmax over many negatives wants fp32.
        loss = self.loss(image_features.float(), text_features.float(), logit_scale.float())
        return {"loss": loss, "metrics": {"logit_scale": logit_scale.detach()}}

    def after_step(self) -> None:
        getattr(self.model, "module", self.model).clamp_logit_scale_()  # unwrap DDP

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.model]

"""A CLIP model with a linear classifier on its image tower, and the zero-shot weights it starts from.

Classification fine-tuning (clipx.methods.classify) trains the image tower and the head with
cross-entropy; the head starts as the zero-shot classifier, the class prompts' mean text embedding
per class times the model's logit scale, applied to unit-norm image embeddings (the WiSE-FT recipe:
Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"). Starting there rather than from a
random head keeps the first steps from wrecking the features a random head's gradients would
(Kumar et al. 2022, LP-FT), and makes the zero-shot model the alpha = 0 end of WiSE-FT's line
(clipx.apps.wise_ft).

The text tower stays in the model, unchanged, so zero-shot evaluation on other tasks, retrieval
and exports keep working on the fine-tuned image tower; ``clip_state_dict`` leaves the head out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.models.dual_encoder import DualEncoder


class DualEncoderWithClassifier(DualEncoder):
    """A DualEncoder plus ``head``: unit-norm image embedding (B, E) -> logits (B, C) over ``classes``
    (label indices into the task's class names, in head-row order)."""

    def __init__(self, visual: nn.Module, text: nn.Module, embed_dim: int, classes: Sequence[int], **kwargs):
        super().__init__(visual, text, **kwargs)
        self.classes = tuple(classes)
        self.head = nn.Linear(embed_dim, len(self.classes))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) logits."""
        return self.head(self.encode_image(images))

    def forward(self, images: torch.Tensor, tokens: Optional[torch.Tensor] = None):
        """Logits (B, C) of ``images``; with ``tokens``, DualEncoder's outputs instead."""
        if tokens is None:
            return self.classify(images)
        return super().forward(images, tokens)

    @torch.no_grad()
    def set_head_(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        """The head as a zero-shot classifier: weight ``logit_scale`` x ``class_embeddings`` (C, E), bias 0."""
        self.head.weight.copy_(class_embeddings * logit_scale)
        self.head.bias.zero_()

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: list[str], device, batch_size: int = 512) -> torch.Tensor:
    """list of M strings -> (M, E) unit-norm text embeddings, in fp32 on the CPU."""
    model.eval()
    chunks = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(C, E): per class, the re-normalised mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    prompts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, tokenizer, prompts, device)  # (C * T, E)
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(per_class, dim=-1)

"""Zero-shot classification: a classifier built from class names x prompt templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx.errors import ClipxError
from eval.embed import Embeddings, embed_texts
from eval.metrics import classification_metrics


@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(D, C) weights: per class, the re-normalised mean of its template embeddings."""
    prompts = [template.format(name) for name in classnames for template in templates]
    features = embed_texts(model, tokenizer, prompts, device)  # (C * T, D)
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1).T


def zero_shot_metrics(embeddings: Embeddings, classifier: torch.Tensor) -> dict[str, float]:
    """top1, top5 and mean per-class recall of the classifier on the labelled images."""
    labelled = embeddings.labels >= 0
    if not labelled.any():
        raise ClipxError("zero-shot evaluation needs labels: no sample has a .cls member or a 'label' in its .json")
    if int(embeddings.labels.max()) >= classifier.shape[1]:
        raise ClipxError(f"a sample has label {int(embeddings.labels.max())} but the templates name only "
                         f"{classifier.shape[1]} classes")
    logits = embeddings.image_features[labelled] @ classifier  # (N, C)
    return classification_metrics(logits, embeddings.labels[labelled])

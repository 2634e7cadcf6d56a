"""Zero-shot classification: a classifier built from class names x prompt templates; and the
accuracy of any linear classifier on unit-norm image embeddings (a fine-tuned model's own head)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from clipx.errors import ClipxError
from clipx.models.classifier import zero_shot_weights
from eval.embed import Embeddings
from eval.metrics import classification_metrics


def build_zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(D, C) weights: per class, the re-normalised mean of its template embeddings."""
    return zero_shot_weights(model, tokenizer, classnames, templates, device).T


def zero_shot_metrics(embeddings: Embeddings, classifier: torch.Tensor, classes: Optional[Sequence[int]] = None,
                      bias: Optional[torch.Tensor] = None) -> dict[str, float]:
    """top1, top5 and mean per-class recall of ``classifier`` (D, C) (+ ``bias`` (C,)) on the labelled
    images. Column c scores label ``classes[c]`` (default: label c); with ``classes`` given, images of
    other labels are left out."""
    labels = embeddings.labels
    if not (labels >= 0).any():
        raise ClipxError("zero-shot evaluation needs labels: no sample has a .cls member or a 'label' in its .json")
    if classes is None:
        if int(labels.max()) >= classifier.shape[1]:
            raise ClipxError(f"a sample has label {int(labels.max())} but the templates name only "
                             f"{classifier.shape[1]} classes")
        classes = range(classifier.shape[1])
    column = torch.full((max(int(labels.max()), max(classes)) + 1,), -1, dtype=torch.long)
    column[torch.tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    targets = torch.where(labels >= 0, column[labels.clamp(min=0)], -1)
    kept = targets >= 0
    if not kept.any():
        raise ClipxError(f"no evaluated sample has a label among the classes {list(classes)}")
    logits = embeddings.image_features[kept] @ classifier.to(embeddings.image_features.dtype)  # (N, C)
    if bias is not None:
        logits = logits + bias
    return classification_metrics(logits, targets[kept])

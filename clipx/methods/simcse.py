"""Text-only contrastive training (``loss.name: simcse``; Gao et al. 2021, "SimCSE").

A text tower alone (clipx.models.TextEncoder: open_clip's text transformer or a transformers encoder
such as the packaged MiniLM) embeds each sample's caption twice: as the anchor, and as its positive.
The positive is the sample's paired text (``data.positive_key``: a .pos.txt member or a .json field,
supervised SimCSE's entailment pairs or any paraphrase pairs) where it has one, else the caption
itself, so that the two passes differ only by the encoder's dropout (unsupervised SimCSE;
model.text_dropout on an open_clip tower). Every other sample's positive in the global batch is a
negative, and hard negatives (data.hard_negative_key, supervised SimCSE's contradictions) are extra
columns: CLIP's loss in one direction (sentence -> positive), at the fixed temperature
ssl.temperature (SimCSE: 0.05).

No image is read: the shards need only their captions. Sentence similarity and text-to-text
retrieval are evaluated after training from TSV files (``clipx eval sts|text-retrieval``,
eval/text_similarity.py).
"""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import NEGATIVE_MASK, NEGATIVE_TEXT, POSITIVE_TEXT, TEXT, TextPairBatch
from clipx.data.captions import caption_chooser
from clipx.data.tokenizer import Tokenizer
from clipx.errors import ClipxError
from clipx.losses import ClipLoss
from clipx.methods.objective import Method, Objective
from clipx.models import create_text_encoder
from clipx.precision import upcast

# Dropout of an open_clip text tower when model.text_dropout is unset: BERT's 0.1, which SimCSE kept
# (Gao et al. 2021, table 3: 0.1 beat 0, 0.05 and higher rates on STS-B development). At 0 a
# sentence's two passes are identical and the loss only spreads the embeddings apart.
DROPOUT = 0.1


class SimCSEObjective(Objective):
    """Anchors, positives (and hard negatives) through one text tower in one call, into a one-way
    ClipLoss at a fixed logit scale 1 / temperature."""

    def __init__(self, model: torch.nn.Module, loss: ClipLoss, temperature: float):
        self.model, self.loss = model, loss
        self.logit_scale = torch.tensor(1.0 / temperature)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        parts = [batch[TEXT], batch[POSITIVE_TEXT]]
        if NEGATIVE_TEXT in batch:
            parts.append(batch[NEGATIVE_TEXT])
        # One call of the tower for every text: each row draws its own dropout mask, so a caption
        # paired with itself still gets two different passes.
        embeddings = upcast(self.model(torch.cat(parts)))  # (2B [+ B], D), unit norm
        size = len(batch[TEXT])
        out = {"anchor": embeddings[:size], "positive": embeddings[size:2 * size]}
        if NEGATIVE_TEXT in batch:
            out.update(negative=embeddings[2 * size:], negative_mask=batch[NEGATIVE_MASK])
        return out

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        negatives = ({"negatives": features["negative"], "negative_mask": features["negative_mask"]}
                     if "negative" in features else {})
        if self.logit_scale.device != features["anchor"].device:  # moved once: a copy per step would wait
            self.logit_scale = self.logit_scale.to(features["anchor"].device)
        loss = self.loss(features["anchor"], features["positive"], self.logit_scale, **negatives)
        # How close the two passes of a pair are: near 1 when dropout alone separates them.
        agreement = (features["anchor"] * features["positive"]).sum(-1).mean().detach()
        return {"loss": loss, "metrics": {"positive_cosine": agreement}}


class SimCSE(Method):
    gather_modes = GATHER_MODES
    hard_negatives = True
    text_only = True

    def validate(self, config) -> None:
        m = config.model
        if m.lock_image or m.patch_dropout or config.data.randaugment:
            raise ClipxError("loss.name=simcse trains a text tower alone: model.lock_image, model.patch_dropout "
                             "and data.randaugment have no image tower to act on; drop them")
        if m.text_tower == "hf" and m.text_dropout is not None:
            raise ClipxError("model.text_dropout applies to open_clip text towers; a transformers tower keeps the "
                             "dropout of its own config.json (hidden_dropout_prob)")

    def build_model(self, config) -> torch.nn.Module:
        return create_text_encoder(config.model, DROPOUT)

    def train_transform(self, config):
        return None  # no image is decoded

    def collate(self, config):
        return TextPairBatch(Tokenizer(config.model, config.data.trim_padding), caption_chooser(config.data, config.eval, pairs=True))

    def objective(self, model, config) -> Objective:
        return SimCSEObjective(model, ClipLoss(config.loss.gather, symmetric=False), config.ssl.temperature)

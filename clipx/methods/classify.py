"""Classification fine-tuning of a CLIP model (``loss.name: classify``): the image tower and a linear
head over the task's classes, trained with cross-entropy on labelled shards (a ``.cls`` member or the
``eval.label_key`` field of the ``.json``, as zero-shot evaluation reads them).

The task is the evaluation section's: ``eval.templates`` names the classes and their prompts,
``eval.classes`` picks the head's classes (default: all). Before the first step the head becomes the
zero-shot classifier of those prompts under the pretrained weights (``model.pretrained``), as
WiSE-FT's fine-tuning starts (clipx.models.classifier); the text tower and the temperature are then
frozen, so the checkpoint still holds the text tower that zero-shot evaluation on other tasks and
``clipx wise-ft`` need. The other way to fine-tune on labels, FLYP's contrastive fine-tuning, is CLIP
itself with the class prompts as captions (``data.caption_keys: {class_prompt: 1}``, clipx.data.captions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx.data.batch import IMAGE, LABEL, LabelledImageBatch
from clipx.data.labels import LabelReader
from clipx.data.tokenizer import Tokenizer
from clipx.errors import ClipxError
from clipx.methods.image_text import ImageTextMethod
from clipx.methods.objective import Method, Objective
from clipx.models import create_model
from clipx.models.classifier import zero_shot_weights
from clipx.precision import upcast
from clipx.templates import chosen_classes, load_templates


class ClassifyObjective(Objective):
    """Cross-entropy of the head's logits; per-sample, so feature caching and gathering change nothing."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"logits": upcast(self.model(batch[IMAGE])), "label": batch[LABEL]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        logits, labels = features["logits"], features["label"]
        top1 = (logits.detach().argmax(dim=-1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "metrics": {"train_top1": top1}}


def task_classes(config) -> tuple[list[str], list[str], tuple[int, ...]]:
    """(class names, prompt templates, the head's classes) of the config's evaluation section."""
    classnames, templates = load_templates(config.eval.templates)
    return classnames, templates, chosen_classes(config.eval.classes, len(classnames))


class Classify(Method):
    evaluators = ("zero_shot",)  # on data.val: the head's accuracy ("classifier") and zero-shot's
    has_text_tower = True

    def validate(self, config) -> None:
        task_classes(config)  # the class names, templates and classes must be readable now
        if config.ssl.encoder != "open_clip":
            raise ClipxError("loss.name=classify fine-tunes a CLIP model's image tower; ssl.encoder is for the "
                             "self-supervised methods")

    def build_model(self, config) -> torch.nn.Module:
        return create_model(config.model, classes=task_classes(config)[2])

    prepare_reads_weights = True  # the head is the zero-shot classifier of the pretrained towers

    def prepare(self, model, accelerator, config):
        """The head starts as the zero-shot classifier of the pretrained weights; the text tower and the
        temperature stay as they are (frozen)."""
        classnames, templates, classes = task_classes(config)
        was_training = model.training
        weights = zero_shot_weights(model, Tokenizer(config.model), [classnames[c] for c in classes], templates,
                                    next(model.parameters()).device)
        with torch.no_grad():
            model.set_head_(weights, model.scale().item())
        model.train(was_training)
        for param in (*model.text.parameters(), model.logit_scale,
                      *([model.logit_bias] if model.logit_bias is not None else [])):
            param.requires_grad_(False)
        return model

    train_transform = ImageTextMethod.train_transform  # CLIP's own training crop of the image

    def collate(self, config):
        return LabelledImageBatch(LabelReader(config.eval.label_key, task_classes(config)[2]))

    def objective(self, model, config) -> Objective:
        return ClassifyObjective(model)

"""What the image-text methods (CLIP, SigLIP) share: a DualEncoder, the training image transform,
image + tokenized caption batches, zero-shot and retrieval evaluation, and the objective."""

from __future__ import annotations

import torch

from clipx.config_rules import parse_randaugment
from clipx.data.batch import IMAGE, NEGATIVE_MASK, NEGATIVE_TEXT, TEXT, ImageTextBatch
from clipx.data.captions import caption_chooser
from clipx.data.crops import TrainImage
from clipx.data.reinforce import ReinforceInfo, ReplayedViews, check_view_size
from clipx.data.remote import RemoteOptions
from clipx.data.tokenizer import Tokenizer
from clipx.data.transforms import rand_augment
from clipx.dist import unwrap
from clipx.methods.objective import Method, Objective
from clipx.models import create_model, image_size
from clipx.precision import upcast


class ContrastiveObjective(Objective):
    """Image-text contrastive training of a (possibly Accelerate-wrapped) DualEncoder.

    ``loss`` is a ClipLoss (called with features and the logit scale) or a SigLipLoss (also given
    the logit bias); ``uses_bias`` says which.
    """

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, uses_bias: bool = False):
        self.model = model
        self.loss = loss
        self.uses_bias = uses_bias

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.named(batch, *self.model(batch[IMAGE], texts(batch)))

    def named(self, batch: dict, image_features, text_features, logit_scale, logit_bias) -> dict[str, torch.Tensor]:
        """The model's outputs on ``batch`` as the loss takes them: the text tower's rows split into
        captions and hard negatives (with which samples have one), everything in fp32."""
        captions = len(batch[TEXT])
        # Features may come out of bf16/fp16 autocast; the softmax over many negatives wants fp32.
        out = {"image": upcast(image_features), "text": upcast(text_features[:captions]),
               "logit_scale": upcast(logit_scale)}
        if NEGATIVE_TEXT in batch:
            out.update(negative=upcast(text_features[captions:]), negative_mask=batch[NEGATIVE_MASK])
        if self.uses_bias:
            out["logit_bias"] = upcast(logit_bias)
        return out

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        extra = (features["logit_bias"],) if self.uses_bias else ()
        negatives = ({"negatives": features["negative"], "negative_mask": features["negative_mask"]}
                     if "negative" in features else {})
        loss = self.loss(features["image"], features["text"], features["logit_scale"], *extra, **negatives)
        # Copies: the bias can be a view of the parameter, which the optimizer step then changes (and
        # FSDP frees once the step's backward is done); the log must show the value this step used.
        metrics = {"logit_scale": features["logit_scale"].detach().clone()}
        if self.uses_bias:
            metrics["logit_bias"] = features["logit_bias"].detach().clone()
        return {"loss": loss, "metrics": metrics}

    after_step_runs_after_refused_steps = True  # clamping an unchanged temperature changes nothing

    def after_step(self, step: int, total_steps: int) -> None:
        unwrap(self.model).clamp_logit_scale_()


def replayed_views(config, teacher_transforms=()) -> ReplayedViews:
    """The transform that replays reinforced shards' stored views at the model's image size, also
    handing each of ``teacher_transforms`` (online teachers' preprocessing) the view."""
    size = image_size(config.model)
    check_view_size(ReinforceInfo.read(config.data.train, RemoteOptions.from_config(config.data)), size)
    return ReplayedViews(size, teacher_transforms)


def texts(batch: dict) -> torch.Tensor:
    """The token ids the text tower embeds: the captions, then the hard negatives when the batch has
    them (one call of the tower for both)."""
    negatives = batch.get(NEGATIVE_TEXT)
    return batch[TEXT] if negatives is None else torch.cat([batch[TEXT], negatives])


class ImageTextMethod(Method):
    """Image and caption towers trained against each other; subclasses choose the loss."""

    evaluators = ("zero_shot", "retrieval")
    has_text_tower = True
    decodes_on_device = True

    def build_model(self, config) -> torch.nn.Module:
        return create_model(config.model)

    replays_views = True

    def train_transform(self, config):
        m = config.model
        if config.data.reinforced:  # a stored view, replayed (uint8 like the crops below)
            return replayed_views(config)
        # uint8 crops, normalised on the device (clipx.data.crops); data.decode: device leaves JPEGs encoded.
        return TrainImage(image_size(m), config.data.crop_scale_min, rand_augment(parse_randaugment(config.data.randaugment)),
                          defer=config.data.decode == "device")

    def collate(self, config):
        return ImageTextBatch(Tokenizer(config.model, config.data.trim_padding), caption_chooser(config.data, config.eval))

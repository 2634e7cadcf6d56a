"""The SigLIP 2 recipe (Tschannen et al., 2025) as training code: SigLIP's sigmoid loss plus

- LocCa's captioning (Wan et al., 2024): a decoder over the image tower's patch tokens predicts the
  caption (``loss.siglip2.decoder_weight``), from the first step;
- SILC's self-distillation (Naeem et al., 2024): the student's pooled embeddings of local views
  (ssl.views) against an EMA teacher's of the whole image (``silc_weight``);
- TIPS's masked prediction (Maninis et al., 2025): the student's patch outputs with ``mask_ratio`` of
  the patches replaced by a mask token against the teacher's of the unmasked image (``tips_weight``).

The last two train for the last ``late_fraction`` of the steps, as in SigLIP 2, against a teacher
copied from the student when they start and updated after every applied step. Every term is off at
weight 0 (its part of the model is then not built). Not built: LocCa's referring-expression and
grounded-captioning tasks, which need box annotations, and its parallel (non-causal) prediction.

Across ranks: the sigmoid loss's ring, captions averaged over every rank's tokens, and the teacher's
centres from every rank's outputs (losses/self_distillation.py), so a step on N processes equals one
process on the union batch.
"""

from __future__ import annotations

import math

import torch

from clipx.data.batch import IMAGE, TEXT, VIEWS, ImageCaptionViewsBatch, caption_targets
from clipx.data.captions import caption_chooser
from clipx.data.tokenizer import Tokenizer
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.losses import SigLipLoss
from clipx.losses.caption import caption_loss
from clipx.losses.self_distillation import masked_patch_distillation, next_centre, teacher_targets, view_distillation
from clipx.losses.siglip import SIGLIP_GATHER_MODES
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod
from clipx.methods.views import captioned_image_and_views
from clipx.models.factory import create_siglip2
from clipx.precision import upcast
from clipx.ssl.momentum import update_momentum_

TEACHER_OUTPUTS = ("teacher_silc", "teacher_tips")


class PatchMasker:
    """Which patches the student sees masked: ``ratio`` of each image's N patches, drawn from torch's
    CPU generator (so a feature-cached replay, which restores it, draws the same, and a resumed run
    too), then moved to the images' device."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __call__(self, images: torch.Tensor, patches: int) -> torch.Tensor:
        masked = round(self.ratio * patches)
        order = torch.rand(len(images), patches).argsort(dim=1)
        return (order < masked).to(images.device)


def late_start(total_steps: int, fraction: float) -> int:
    """How many steps train before the late terms start (all of them train from there on)."""
    return min(total_steps, math.floor(total_steps * (1 - fraction) + 1e-9))


class SigLip2Objective(ContrastiveObjective):
    """SigLIP's loss and the SigLIP 2 terms that ``terms`` (loss.siglip2) weights above 0."""

    after_step_runs_after_refused_steps = False  # it moves the teacher and the centres

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, terms, total_steps: int | None):
        super().__init__(model, loss, uses_bias=True)
        self.terms, self.masker = terms, PatchMasker(terms.mask_ratio)
        self.gather_captions = loss.gather != "none"
        k, device = terms.prototypes, unwrap(model).logit_scale.device
        self.centres = {"silc": torch.zeros(k, device=device), "tips": torch.zeros(k, device=device)}
        self.steps_done, self.total_steps = 0, total_steps
        if self.late() and unwrap(model).teacher is not None:
            self._copy_student_to_teacher()

    def late(self) -> bool:
        """Whether the next step trains the self-distillation terms."""
        if self.terms.late_fraction <= 0 or self.total_steps is None:
            return self.terms.late_fraction >= 1
        return self.steps_done >= late_start(self.total_steps, self.terms.late_fraction)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        late, model = self.late(), unwrap(self.model)
        views = torch.cat(list(batch[VIEWS])) if late and model.silc_head is not None else None
        mask = None
        if late and model.tips_head is not None:
            mask = self.masker(batch[IMAGE], math.prod(model.visual.grid_size))
        positions, labels = caption_targets(batch)
        image, text, scale, bias, extra = self.model(batch[IMAGE], batch[TEXT], views, mask, positions)
        out = self.named(batch, image, text, scale, bias)
        if "unused" in extra:
            out["unused"] = extra["unused"]
        if "caption_logits" in extra:
            out.update(caption_logits=extra["caption_logits"], caption_labels=labels)
        if "student_silc" in extra:  # (V*B, K) -> (B, V, K): batch-first, as micro-batches concatenate
            student = extra["student_silc"]
            out["student_silc"] = student.view(-1, len(image), student.shape[-1]).transpose(0, 1)
        if mask is not None:
            out.update(student_tips=extra["student_tips"], patch_mask=mask)
        out.update({name: extra[name] for name in TEACHER_OUTPUTS if name in extra})
        return out

    def replay_features(self, batch: dict, cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The teacher's outputs are targets without gradient; the replay recomputes them all the
        # same (one forward call), so hand back the first pass's, which are identical.
        return {**self.features(batch), **{n: cached[n] for n in TEACHER_OUTPUTS if n in cached}}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        """The sum of the weighted terms; each weighted term is also a metric (``<term>_loss``)."""
        out = super().loss_from_features(features)
        terms, metrics = self.terms, out["metrics"]
        parts = {"sigmoid": out["loss"]}
        if "caption_logits" in features:
            parts["caption"] = terms.decoder_weight * caption_loss(
                features["caption_logits"], features["caption_labels"], gather=self.gather_captions)
        if "student_silc" in features:
            teacher = upcast(features["teacher_silc"].detach())
            targets = teacher_targets(teacher, self.centres["silc"], terms.teacher_temperature)
            parts["silc"] = terms.silc_weight * view_distillation(
                upcast(features["student_silc"]).transpose(0, 1), targets, terms.student_temperature)
            self.stage("silc_centre", next_centre(self.centres["silc"], teacher, terms.center_momentum))
        if "student_tips" in features:
            teacher = upcast(features["teacher_tips"].detach())
            targets = teacher_targets(teacher, self.centres["tips"], terms.teacher_temperature)
            parts["tips"] = terms.tips_weight * masked_patch_distillation(
                upcast(features["student_tips"]), targets, features["patch_mask"], terms.student_temperature)
            self.stage("tips_centre", next_centre(self.centres["tips"], teacher, terms.center_momentum))
        metrics.update({f"{name}_loss": value.detach() for name, value in parts.items()})
        loss = sum(parts.values())
        return {**out, "loss": loss + features["unused"] if "unused" in features else loss}

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        was_late = self.late()
        self.steps_done, self.total_steps = step, total_steps
        model = unwrap(self.model)
        if model.teacher is None:
            return
        if was_late:
            update_momentum_(*_flat_pairs(model), self.terms.teacher_momentum)
            for name in self.centres:
                if self.staged(f"{name}_centre"):
                    self.centres[name] = self.staged(f"{name}_centre")[-1]
        elif self.late():  # the late terms start with the next step: the teacher starts as the student
            self._copy_student_to_teacher()

    def _copy_student_to_teacher(self) -> None:
        update_momentum_(*_flat_pairs(unwrap(self.model)), 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"silc_centre": self.centres["silc"], "tips_centre": self.centres["tips"],
                "steps_done": torch.tensor(self.steps_done)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.centres = {name: state[f"{name}_centre"].to(self.centres[name].device) for name in self.centres}
        self.steps_done = int(state["steps_done"])


class _Modules(torch.nn.Module):
    """Modules in a list, as one module whose parameters are theirs, in order (for update_momentum_)."""

    def __init__(self, modules):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)


def _flat_pairs(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    student, teacher = model.student_and_teacher()
    return _Modules(student), _Modules(teacher)


class SigLIP2(ImageTextMethod):
    gather_modes = SIGLIP_GATHER_MODES
    variants = {"": {"model.init_logit_bias": -10.0, "model.init_temperature": 0.1}}
    needs_patch_tokens = True
    decodes_on_device = False  # its local views are made from the decoded image in the loader
    replays_views = False  # nor are they replayed from reinforced shards
    updated_outside_optimizer = ("teacher.",)
    takes_patch_dropout = False  # with TIPS on, as by default

    def validate(self, config) -> None:
        terms = config.loss.siglip2
        if config.model.init_logit_bias is None:
            raise ClipxError("loss.name=siglip2 needs model.init_logit_bias (SigLIP uses -10, with "
                             "model.init_temperature=0.1)")
        weights = (terms.decoder_weight, terms.silc_weight, terms.tips_weight)
        if min(weights) < 0 or not 0 <= terms.late_fraction <= 1 or not 0 < terms.mask_ratio < 1:
            raise ClipxError("loss.siglip2: the weights must be >= 0, late_fraction in [0, 1] and mask_ratio in (0, 1)")
        if terms.tips_weight and config.model.patch_dropout:
            raise ClipxError("loss.siglip2.tips_weight: masked prediction compares the student's patches with the "
                             "teacher's, which model.patch_dropout would drop; set one of them to 0")
        if terms.decoder_weight and config.model.text_tower != "open_clip":
            raise ClipxError("loss.siglip2.decoder_weight: the decoder predicts open_clip's tokens; with "
                             "model.text_tower=hf set it to 0")

    def build_model(self, config) -> torch.nn.Module:
        return create_siglip2(config.model, config.loss.siglip2)

    def train_transform(self, config):
        return captioned_image_and_views(config, super().train_transform(config))

    def collate(self, config):
        return ImageCaptionViewsBatch(Tokenizer(config.model, config.data.trim_padding),
                                      caption_chooser(config.data, config.eval))

    def objective(self, model, config):
        return SigLip2Objective(model, SigLipLoss(config.loss.gather), config.loss.siglip2, config.train.steps)

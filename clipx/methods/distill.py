"""Distillation from a frozen teacher CLIP, on any image-text method (the config's ``distill`` block).

``Distilled`` wraps the method that ``loss.name`` names: the batch also carries the teacher's view
of each sample, and the objective adds ``distill.weight`` x the KL between the teacher's and the
student's in-batch similarity distributions (clipx.losses.distill) to the method's own loss. The
teacher comes in two forms that give the same loss on the same batch:

- online (``distill.teacher``): the teacher model runs in the training process on the stored image
  through its own evaluation transform and the drawn caption through its own tokenizer;
- embedded (``distill.embedded``): ``clipx prep embed-teacher`` ran it once, and each sample carries
  its embeddings in a ``teacher.npy`` member ((2, Dt) float32: image, then caption), with the
  teacher's logit scale in ``teacher.json`` beside the shards.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Callable

import numpy as np
import torch

from clipx.data.batch import TEACHER_EMBEDDING, TEACHER_IMAGE, TEACHER_TEXT
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.losses.distill import DistillLoss
from clipx.methods.objective import Method, Objective
from clipx.models.teacher import Teacher
from clipx.precision import upcast

TEACHER_MEMBER = "teacher.npy"  # per sample: the teacher's (image, caption) embeddings, (2, Dt) float32
TEACHER_INFO = "teacher.json"  # beside the shards: {"teacher", "logit_scale", "dim", "caption"}


@functools.lru_cache(maxsize=2)
def cached_teacher(path: str, load: Callable[[str], Teacher]) -> Teacher:
    """One load per process (``load``: clipx.methods.load_teacher), shared by the transform, the
    collation and the objective."""
    return load(path)


def teacher_logit_scale(config, load: Callable[[str], Teacher]) -> float:
    """The teacher's exp()'d logit scale: the config's, else the online teacher's own (``load`` reads
    it), else what embed-teacher recorded beside the training shards."""
    d = config.distill
    if d.teacher_logit_scale is not None:
        return d.teacher_logit_scale
    if d.teacher is not None:
        return cached_teacher(d.teacher, load).logit_scale
    from clipx.data.remote import RemoteOptions
    from clipx.data.shards import read_beside

    raw = read_beside(config.data.train, TEACHER_INFO, RemoteOptions.from_config(config.data))
    try:
        return float(json.loads(raw)["logit_scale"])
    except (TypeError, ValueError, KeyError):
        raise ClipxError(f"distill.embedded: no readable {TEACHER_INFO} beside {config.data.train} (clipx prep "
                         "embed-teacher writes it); set distill.teacher_logit_scale") from None


class WithTeacherImage:
    """PIL image -> (the student's transform of it, the teacher's evaluation transform of it)."""

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher

    def __call__(self, image):
        return self.student(image), self.teacher(image)


class DistillBatch:
    """The student method's collation plus the teacher's inputs (online) or embeddings (embedded)."""

    needs_caption = True  # the teacher's text side needs every sample's caption

    def __init__(self, student, teacher: Teacher | None):
        self.student, self.teacher = student, teacher
        self.choose_caption = student.choose_caption  # the teacher embeds the caption the student drew
        self.members = () if teacher is not None else (TEACHER_MEMBER,)

    def __call__(self, samples: list[dict]) -> dict:
        if self.teacher is None:
            batch = self.student(samples)
            batch[TEACHER_EMBEDDING] = torch.from_numpy(np.stack([_embedding(s) for s in samples]))
            return batch
        batch = self.student([{**s, "image": s["image"][0]} for s in samples])
        batch[TEACHER_IMAGE] = torch.stack([s["image"][1] for s in samples])
        batch[TEACHER_TEXT] = self.teacher.tokenize([s["text"] for s in samples])
        return batch


def _embedding(sample: dict) -> np.ndarray:
    array = np.load(io.BytesIO(sample[TEACHER_MEMBER]), allow_pickle=False)
    if array.ndim != 2 or array.shape[0] != 2:
        raise ClipxError(f"sample {sample['key']}: {TEACHER_MEMBER} holds an array of shape {array.shape}, not "
                         "(2, dim); rewrite the shards with clipx prep embed-teacher")
    return array.astype(np.float32)


class DistilledObjective(Objective):
    """The student method's objective + weight x DistillLoss; per-step state stays the student's."""

    def __init__(self, student: Objective, loss: DistillLoss, weight: float, teacher: Teacher | None,
                 teacher_scale: float):
        self.student, self.loss, self.weight = student, loss, weight
        self.teacher, self.teacher_scale = teacher, teacher_scale

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.student.features(batch)
        if self.teacher is None:
            embeddings = upcast(batch[TEACHER_EMBEDDING])
            teacher_image, teacher_text = embeddings[:, 0], embeddings[:, 1]
        else:
            teacher_image, teacher_text = self.teacher.embed(batch[TEACHER_IMAGE], batch[TEACHER_TEXT])
        return {**out, "teacher_image": teacher_image, "teacher_text": teacher_text}

    def replay_features(self, batch: dict, cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The teacher is frozen and its embeddings are targets without gradient: the first pass's
        # serve the replay, so an online teacher embeds each micro-batch once.
        return {**self.student.replay_features(batch, cached),
                "teacher_image": cached["teacher_image"], "teacher_text": cached["teacher_text"]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        out = self.student.loss_from_features(features)
        distill = self.loss(features["image"], features["text"], features["logit_scale"],
                            features["teacher_image"], features["teacher_text"], self.teacher_scale)
        out["metrics"].update(student_loss=out["loss"].detach(), distill_loss=distill.detach())
        return {**out, "loss": out["loss"] + self.weight * distill}

    # Per-step state (queues, counters) and its checkpoint belong to the student's objective.
    def end_step(self, step: int, total_steps: int, accepted) -> None:
        self.student.end_step(step, total_steps, accepted)

    @property
    def reads_verdict(self) -> bool:
        return self.student.reads_verdict

    def drop_staged(self) -> None:
        self.student.drop_staged()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.student.load_state_dict(state)

    def __getattr__(self, name: str):  # what the loop asks of a method's objective (clamps, counters)
        return getattr(self.student, name)


class Distilled(Method):
    """``method`` (an image-text one) with a teacher's similarities as extra soft targets.

    ``load_teacher`` (path -> Teacher) is ``clipx.methods.load_teacher``: a clipx teacher checkpoint
    is built by its own method, from the registry above this module, which hands the loader down."""

    def __init__(self, method: Method, load_teacher: Callable[[str], Teacher]):
        self.method, self.load_teacher = method, load_teacher
        for name in ("evaluators", "gather_modes", "variants", "batchnorm_modes", "multi_crop", "hard_negatives",
                     "decodes_on_device", "prepare_reads_weights"):
            setattr(self, name, getattr(method, name))

    def validate(self, config) -> None:
        self.method.validate(config)
        if config.distill.embedded and config.data.caption_keys is not None:
            raise ClipxError("distill.embedded stores the teacher's embedding of each sample's first caption; "
                             "with data.caption_keys the student draws others: run the teacher online "
                             "(distill.teacher) instead")

    def check_processes(self, config, processes: int, device_type: str) -> None:
        self.method.check_processes(config, processes, device_type)

    def build_model(self, config) -> torch.nn.Module:
        return self.method.build_model(config)

    def prepare(self, model, accelerator, config):
        return self.method.prepare(model, accelerator, config)

    def teacher(self, config) -> Teacher | None:
        """The online teacher (distill.teacher), loaded once per process; None for an embedded one."""
        return cached_teacher(config.distill.teacher, self.load_teacher) if config.distill.teacher is not None else None

    def train_transform(self, config):
        student, teacher = self.method.train_transform(config), self.teacher(config)
        return student if teacher is None else WithTeacherImage(student, teacher.transform)

    def collate(self, config):
        return DistillBatch(self.method.collate(config), self.teacher(config))

    def objective(self, model, config) -> Objective:
        teacher = self.teacher(config)
        if teacher is not None:
            teacher = teacher.to(next(unwrap(model).parameters()).device)
        return DistilledObjective(self.method.objective(model, config), DistillLoss(config.loss.gather),
                                  config.distill.weight, teacher, teacher_logit_scale(config, self.load_teacher))

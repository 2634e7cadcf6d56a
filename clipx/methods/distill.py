"""Distillation from frozen teacher CLIPs, on any image-text method (the config's ``distill`` block).

``Distilled`` wraps the method that ``loss.name`` names: the batch also carries the teachers' view
of each sample, and the objective adds ``distill.weight`` x the KL between the teachers' (one, or an
ensemble's: ``distill.ensemble``) and the student's in-batch similarity distributions
(clipx.losses.distill) to ``distill.student_weight`` x the method's own loss. The teachers come in
forms that give the same loss on the same batch:

- online (``distill.teacher``, comma-separated for an ensemble): each teacher runs in the training
  process on the image through its own evaluation transform and on the drawn caption through its
  own tokenizer. The image is the stored one, or with ``data.reinforced`` the replayed view; there
  the embeddings are rounded to float16 as the reinforced shards store them, so both forms train
  the same objective;
- embedded (``distill.embedded``): ``clipx prep embed-teacher`` ran one teacher once, and each
  sample carries its embeddings in a ``teacher.npy`` member ((2, Dt) float32: image, then caption),
  with the teacher's logit scale in ``teacher.json`` beside the shards; or, with ``data.reinforced``,
  ``clipx prep reinforce`` ran an ensemble on every stored view and caption (clipx/data/reinforce.py),
  and the rows of the replayed view and the drawn caption are picked here.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Callable

import numpy as np
import torch

from clipx.data.batch import TEACHER_EMBEDDING, TEACHER_IMAGE, TEACHER_TEXT, ReplayedView
from clipx.data.reinforce import STORED_TORCH_DTYPE, ReinforceInfo, read_npy, stored_captions, teacher_member
from clipx.data.remote import RemoteOptions
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.losses.distill import DistillLoss, TeacherView
from clipx.methods.image_text import replayed_views
from clipx.methods.objective import Method, Objective
from clipx.models.teacher import Teacher
from clipx.precision import upcast

TEACHER_MEMBER = "teacher.npy"  # per sample: the teacher's (image, caption) embeddings, (2, Dt) float32
TEACHER_INFO = "teacher.json"  # beside the shards: {"teacher", "logit_scale", "dim", "caption"}


@functools.lru_cache(maxsize=4)
def cached_teacher(path: str, load: Callable[[str], Teacher]) -> Teacher:
    """One load per process (``load``: clipx.methods.load_teacher), shared by the transform, the
    collation and the objective."""
    return load(path)


def teacher_paths(config) -> list[str]:
    """The online teachers distill.teacher names (comma-separated), in order; [] when embedded."""
    teacher = config.distill.teacher
    return [path.strip() for path in teacher.split(",")] if teacher is not None else []


def teacher_logit_scales(config, load: Callable[[str], Teacher]) -> list[float]:
    """Each teacher's exp()'d logit scale: the config's for all, else the online teachers' own, else
    what reinforce or embed-teacher recorded beside the training shards."""
    d = config.distill
    if d.teacher is not None:
        scales = [cached_teacher(path, load).logit_scale for path in teacher_paths(config)]
    elif config.data.reinforced:
        scales = [float(t["logit_scale"]) for t in reinforce_info(config).teachers]
    elif d.teacher_logit_scale is not None:  # embed-teacher's one teacher; its teacher.json is not needed
        return [d.teacher_logit_scale]
    else:
        scales = [_embedded_scale(config)]
    return [d.teacher_logit_scale] * len(scales) if d.teacher_logit_scale is not None else scales


def reinforce_info(config) -> ReinforceInfo:
    return ReinforceInfo.read(config.data.train, RemoteOptions.from_config(config.data))


def _embedded_scale(config) -> float:
    from clipx.data.shards import read_beside

    raw = read_beside(config.data.train, TEACHER_INFO, RemoteOptions.from_config(config.data))
    try:
        return float(json.loads(raw)["logit_scale"])
    except (TypeError, ValueError, KeyError):
        raise ClipxError(f"distill.embedded: no readable {TEACHER_INFO} beside {config.data.train} (clipx prep "
                         "embed-teacher writes it); set distill.teacher_logit_scale") from None


class WithTeacherImage:
    """PIL image -> (the student's transform of it, each teacher's evaluation transform of it)."""

    def __init__(self, student, teachers):
        self.student, self.teachers = student, tuple(teachers)

    def __call__(self, image):
        return self.student(image), tuple(teacher(image) for teacher in self.teachers)


class DistillBatch:
    """The student method's collation plus the teachers' inputs (online) or embeddings (embedded):
    lists with one entry per teacher."""

    needs_caption = True  # the teachers' text side needs every sample's caption

    def __init__(self, student, teachers: list[Teacher], reinforced: ReinforceInfo | None = None):
        self.student, self.teachers, self.reinforced = student, teachers, reinforced
        self.choose_caption = student.choose_caption  # the teachers embed the caption the student drew
        if teachers:
            self.members: tuple[str, ...] = ()
        elif reinforced is not None:  # the rows of the drawn caption are found among the stored ones
            self.members = ("txt", "json", *(teacher_member(t) for t in range(len(reinforced.teachers))))
        else:
            self.members = (TEACHER_MEMBER,)

    def __call__(self, samples: list[dict]) -> dict:
        if not self.teachers:
            batch = self.student(samples)
            embeddings = ([np.stack([_embedding(s)]) for s in samples] if self.reinforced is None
                          else [_reinforced_rows(s, self.reinforced) for s in samples])  # each (T, 2, Dt)
            batch[TEACHER_EMBEDDING] = [torch.from_numpy(np.stack([e[t] for e in embeddings]))
                                        for t in range(len(embeddings[0]))]
            return batch
        images = [s["image"] for s in samples]
        inputs = [i.teacher_inputs if isinstance(i, ReplayedView) else i[1] for i in images]
        batch = self.student([{**s, "image": i if isinstance(i, ReplayedView) else i[0]} for s, i in zip(samples, images)])
        batch[TEACHER_IMAGE] = [torch.stack([row[t] for row in inputs]) for t in range(len(self.teachers))]
        batch[TEACHER_TEXT] = [teacher.tokenize([s["text"] for s in samples]) for teacher in self.teachers]
        return batch


def _embedding(sample: dict) -> np.ndarray:
    array = np.load(io.BytesIO(sample[TEACHER_MEMBER]), allow_pickle=False)
    if array.ndim != 2 or array.shape[0] != 2:
        raise ClipxError(f"sample {sample['key']}: {TEACHER_MEMBER} holds an array of shape {array.shape}, not "
                         "(2, dim); rewrite the shards with clipx prep embed-teacher")
    return array.astype(np.float32)


def _reinforced_rows(sample: dict, info: ReinforceInfo) -> list[np.ndarray]:
    """Each teacher's (2, Dt) stored rows of a reinforced sample: its replayed view's image embedding
    and its drawn caption's text embedding."""
    captions = stored_captions(sample, info.caption_key)
    try:
        caption = captions.index(sample["text"])
    except ValueError:
        raise ClipxError(f"sample {sample['key']}: its caption has no stored teacher embedding; with "
                         f"distill.embedded on reinforced shards data.caption_keys may draw from txt and "
                         f"{info.caption_key!r} only") from None
    rows = []
    for t in range(len(info.teachers)):
        array = read_npy(sample[teacher_member(t)])
        if array.ndim != 2 or array.shape[0] != info.augmentations + len(captions):
            raise ClipxError(f"sample {sample['key']}: {teacher_member(t)} holds {array.shape}, not "
                             f"({info.augmentations} views + {len(captions)} captions, dim); reinforce the shards again")
        rows.append(array[[sample["image"].index, info.augmentations + caption]])
    return rows


class DistilledObjective(Objective):
    """student_weight x the student method's objective + weight x DistillLoss; per-step state stays
    the student's. ``teachers``: the online ones ([] when embedded); ``scales``: every teacher's
    exp()'d logit scale; ``stored_precision``: online embeddings rounded to the reinforced shards'."""

    def __init__(self, student: Objective, loss: DistillLoss, weight: float, student_weight: float,
                 teachers: list[Teacher], scales: list[float], stored_precision: bool = False):
        self.student, self.loss, self.weight, self.student_weight = student, loss, weight, student_weight
        self.teachers, self.scales, self.stored_precision = teachers, scales, stored_precision

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.student.features(batch)
        if not self.teachers:
            embedded = [upcast(e) for e in batch[TEACHER_EMBEDDING]]
            pairs = [(e[:, 0], e[:, 1]) for e in embedded]
        else:
            pairs = [teacher.embed(images, tokens)
                     for teacher, images, tokens in zip(self.teachers, batch[TEACHER_IMAGE], batch[TEACHER_TEXT])]
            if self.stored_precision:
                pairs = [(i.to(STORED_TORCH_DTYPE).float(), t.to(STORED_TORCH_DTYPE).float()) for i, t in pairs]
        for index, (images, texts) in enumerate(pairs):
            out[f"teacher_image.{index}"], out[f"teacher_text.{index}"] = images, texts
        return out

    def replay_features(self, batch: dict, cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The teachers are frozen and their embeddings are targets without gradient: the first pass's
        # serve the replay, so an online teacher embeds each micro-batch once.
        return {**self.student.replay_features(batch, cached),
                **{name: value for name, value in cached.items() if name.startswith("teacher_")}}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        out = self.student.loss_from_features(features)
        teachers = [TeacherView(features[f"teacher_image.{t}"], features[f"teacher_text.{t}"], scale)
                    for t, scale in enumerate(self.scales)]
        distill = self.loss(features["image"], features["text"], features["logit_scale"], teachers)
        out["metrics"].update(student_loss=out["loss"].detach(), distill_loss=distill.detach())
        return {**out, "loss": self.student_weight * out["loss"] + self.weight * distill}

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
    """``method`` (an image-text one) with teachers' similarities as extra soft targets.

    ``load_teacher`` (path -> Teacher) is ``clipx.methods.load_teacher``: a clipx teacher checkpoint
    is built by its own method, from the registry above this module, which hands the loader down."""

    def __init__(self, method: Method, load_teacher: Callable[[str], Teacher]):
        self.method, self.load_teacher = method, load_teacher
        for name in ("evaluators", "gather_modes", "variants", "batchnorm_modes", "multi_crop", "hard_negatives",
                     "decodes_on_device", "prepare_reads_weights", "replays_views"):
            setattr(self, name, getattr(method, name))

    def validate(self, config) -> None:
        self.method.validate(config)
        if config.distill.embedded and config.data.caption_keys is not None and not config.data.reinforced:
            raise ClipxError("distill.embedded stores the teacher's embedding of each sample's first caption; "
                             "with data.caption_keys the student draws others: run the teacher online "
                             "(distill.teacher) or reinforce the shards (clipx prep reinforce, data.reinforced)")

    def check_processes(self, config, processes: int, device_type: str) -> None:
        self.method.check_processes(config, processes, device_type)

    def build_model(self, config) -> torch.nn.Module:
        return self.method.build_model(config)

    def prepare(self, model, accelerator, config):
        return self.method.prepare(model, accelerator, config)

    def teachers(self, config) -> list[Teacher]:
        """The online teachers (distill.teacher), each loaded once per process; [] for embedded ones."""
        return [cached_teacher(path, self.load_teacher) for path in teacher_paths(config)]

    def train_transform(self, config):
        transforms = [teacher.transform for teacher in self.teachers(config)]
        if not transforms:
            return self.method.train_transform(config)
        if config.data.reinforced:  # the teachers see the replayed view
            return replayed_views(config, transforms)
        return WithTeacherImage(self.method.train_transform(config), transforms)

    def collate(self, config):
        info = reinforce_info(config) if config.data.reinforced else None
        return DistillBatch(self.method.collate(config), self.teachers(config), info)

    def objective(self, model, config) -> Objective:
        device = next(unwrap(model).parameters()).device
        teachers = [teacher.to(device) for teacher in self.teachers(config)]
        d = config.distill
        return DistilledObjective(self.method.objective(model, config), DistillLoss(config.loss.gather, d.ensemble),
                                  d.weight, d.student_weight, teachers, teacher_logit_scales(config, self.load_teacher),
                                  stored_precision=config.data.reinforced)

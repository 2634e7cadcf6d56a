"""Distillation of teacher CLIPs' in-batch similarities into a student (MobileCLIP, open_clip's
DistillClipLoss): the teachers' softmax over the batch's captions for each image, and over the
batch's images for each caption, are soft targets for the student's.

    loss = ( mean_i KL(p_t(i, .) || p_s(i, .)) + mean_j KL(p_t(., j) || p_s(., j)) ) / 2

with p_s = softmax over the gathered columns of the student's scale * image @ text.T. One teacher's
p_t is the same softmax of its own scaled similarities. An ensemble of teachers (MobileCLIP's) has
two forms (``ensemble``): "probabilities", the mean of the teachers' softmaxes, each at its own
temperature (MobileCLIP's definition), or "logits", the softmax of the mean of their scaled
similarities. KL rather than the soft-target cross-entropy open_clip logs: the gradients are the
same (they differ by the teachers' entropy, a constant), and KL reads 0 when the student matches.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.config import GATHER_MODES

ENSEMBLES = ("probabilities", "logits")


class TeacherView(NamedTuple):
    """One teacher's L2-normalised image and text embeddings of a batch, (B, Dt) each, and its exp()'d
    logit scale."""

    images: torch.Tensor
    texts: torch.Tensor
    scale: float


def ensemble_log_targets(logits: Sequence[torch.Tensor], ensemble: str) -> torch.Tensor:
    """log of the ensemble's row distributions from each teacher's scaled logits (rows x columns)."""
    if ensemble == "logits" or len(logits) == 1:
        return F.log_softmax(torch.stack(list(logits)).mean(0), dim=1)
    log_p = torch.stack([F.log_softmax(teacher, dim=1) for teacher in logits])  # (T, rows, columns)
    return torch.logsumexp(log_p, dim=0) - math.log(len(logits))


def _kl_rows(target_log_p: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(exp(target row) || softmax(student row))."""
    return (target_log_p.exp() * (target_log_p - F.log_softmax(student_logits, dim=1))).sum(1).mean()


class DistillLoss(nn.Module):
    """KL between the teachers' (ensemble) and the student's similarity distributions, both directions.

    The teachers' embeddings are gathered exactly like the student's (``loss.gather``): ``none``
    compares each rank's own batch; ``global`` the (N, N) logits on every rank; ``local`` this rank's
    B rows of each direction against all N gathered columns. Teacher inputs are targets: detached.
    """

    def __init__(self, gather: str = "local", ensemble: str = "probabilities"):
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
        self.gather, self.ensemble = gather, ensemble

    def forward(self, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                teachers: Sequence[TeacherView]) -> torch.Tensor:
        """images, texts: the student's (B, D), L2-normalised; logit_scale: scalar, exp()'d;
        teachers: one or more ``TeacherView``s of the same B samples."""
        teachers = [TeacherView(t.images.detach(), t.texts.detach(), t.scale) for t in teachers]
        if self.gather == "none" or not dist.is_distributed():
            return self._dense(images, texts, logit_scale, teachers)
        all_images, all_texts = dist.gather_with_grad(images), dist.gather_with_grad(texts)  # (N, D)
        gathered = [TeacherView(dist.gather_no_grad(t.images), dist.gather_no_grad(t.texts), t.scale) for t in teachers]
        if self.gather == "global":
            return self._dense(all_images, all_texts, logit_scale, gathered)
        # local: this rank's rows of both directions against every gathered column; the ranks'
        # means, averaged by DDP, are the mean over all N rows.
        image_targets = ensemble_log_targets([t.scale * t.images @ g.texts.T for t, g in zip(teachers, gathered)],
                                             self.ensemble)
        text_targets = ensemble_log_targets([t.scale * t.texts @ g.images.T for t, g in zip(teachers, gathered)],
                                            self.ensemble)
        image_rows = _kl_rows(image_targets, logit_scale * images @ all_texts.T)
        text_rows = _kl_rows(text_targets, logit_scale * texts @ all_images.T)
        return (image_rows + text_rows) / 2

    def _dense(self, images, texts, logit_scale, teachers: Sequence[TeacherView]) -> torch.Tensor:
        student = logit_scale * images @ texts.T  # (M, M): rows are images, columns captions
        logits = [t.scale * t.images @ t.texts.T for t in teachers]
        image_rows = _kl_rows(ensemble_log_targets(logits, self.ensemble), student)
        text_rows = _kl_rows(ensemble_log_targets([teacher.T for teacher in logits], self.ensemble), student.T)
        return (image_rows + text_rows) / 2

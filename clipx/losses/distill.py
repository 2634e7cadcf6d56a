"""Distillation of a teacher CLIP's in-batch similarities into a student (MobileCLIP, open_clip's
DistillClipLoss): the teacher's softmax over the batch's captions for each image, and over the
batch's images for each caption, are soft targets for the student's.

    loss = ( mean_i KL(p_t(i, .) || p_s(i, .)) + mean_j KL(p_t(., j) || p_s(., j)) ) / 2

with p = softmax over the gathered columns of scale * image @ text.T. KL rather than the soft-target
cross-entropy open_clip logs: the gradients are the same (they differ by the teacher's entropy, a
constant), and KL reads 0 when the student matches its teacher.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.config import GATHER_MODES


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(softmax(teacher row) || softmax(student row))."""
    teacher_log_p = F.log_softmax(teacher_logits, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - F.log_softmax(student_logits, dim=1))).sum(1).mean()


class DistillLoss(nn.Module):
    """KL between teacher and student similarity distributions, in both directions.

    The teacher's embeddings are gathered exactly like the student's (``loss.gather``): ``none``
    compares each rank's own batch; ``global`` the (N, N) logits on every rank; ``local`` this rank's
    B rows of each direction against all N gathered columns. Teacher inputs are targets: detached.
    """

    def __init__(self, gather: str = "local"):
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
        self.gather = gather

    def forward(self, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                teacher_images: torch.Tensor, teacher_texts: torch.Tensor, teacher_scale: float) -> torch.Tensor:
        """images, texts: the student's (B, D), L2-normalised; logit_scale: scalar, exp()'d;
        teacher_images, teacher_texts: (B, Dt), L2-normalised; teacher_scale: the teacher's exp()'d scale."""
        teacher_images, teacher_texts = teacher_images.detach(), teacher_texts.detach()
        if self.gather == "none" or not dist.is_distributed():
            return self._dense(images, texts, logit_scale, teacher_images, teacher_texts, teacher_scale)
        all_images, all_texts = dist.gather_with_grad(images), dist.gather_with_grad(texts)  # (N, D)
        all_teacher_images, all_teacher_texts = dist.gather_no_grad(teacher_images), dist.gather_no_grad(teacher_texts)
        if self.gather == "global":
            return self._dense(all_images, all_texts, logit_scale, all_teacher_images, all_teacher_texts, teacher_scale)
        # local: this rank's rows of both directions against every gathered column; the ranks'
        # means, averaged by DDP, are the mean over all N rows.
        image_rows = _kl_rows(teacher_scale * teacher_images @ all_teacher_texts.T, logit_scale * images @ all_texts.T)
        text_rows = _kl_rows(teacher_scale * teacher_texts @ all_teacher_images.T, logit_scale * texts @ all_images.T)
        return (image_rows + text_rows) / 2

    @staticmethod
    def _dense(images, texts, logit_scale, teacher_images, teacher_texts, teacher_scale) -> torch.Tensor:
        student = logit_scale * images @ texts.T  # (M, M): rows are images, columns captions
        teacher = teacher_scale * teacher_images @ teacher_texts.T
        return (_kl_rows(teacher, student) + _kl_rows(teacher.T, student.T)) / 2

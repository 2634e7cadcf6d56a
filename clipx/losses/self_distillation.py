"""Self-distillation against an EMA teacher, as SigLIP 2 takes it from SILC and TIPS: DINO's loss
on the pooled image embedding of local views (``view_distillation``) and iBOT's on masked patches
(``masked_patch_distillation``).

Both compare K-way distributions: the teacher's output, centred (``centre``: an EMA of its batch
means, against collapse onto one prototype) and sharpened by a low temperature, is the target of the
student's softmax at a higher one. ``next_centre`` is the centre after a step, the mean taken over
every rank's teacher outputs so it is the one process would compute on the union batch.
"""

from __future__ import annotations

import torch

from clipx import dist


def teacher_targets(teacher_logits: torch.Tensor, centre: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., K) teacher outputs -> (..., K) target distributions: softmax((t - centre) / temperature)."""
    return torch.softmax((teacher_logits - centre) / temperature, dim=-1)


def _cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., K) targets and student outputs -> (...) cross-entropy H(targets, softmax(student / temperature))."""
    return -(targets * torch.log_softmax(student_logits / temperature, dim=-1)).sum(dim=-1)


def view_distillation(student_views: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """SILC / DINO: student outputs of V local views (V, B, K) towards the teacher's targets on the
    global view (B, K); the mean over views and samples."""
    return _cross_entropy(targets.unsqueeze(0), student_views, temperature).mean()


def masked_patch_distillation(student_patches: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """TIPS / iBOT: student outputs (B, N, K) of the masked image's patches towards the teacher's
    targets (B, N, K) for the same patches of the whole image, at the masked patches only (``mask``
    (B, N) bool): each image's mean over its masked patches, then the mean over images."""
    losses = _cross_entropy(targets, student_patches, temperature) * mask
    return (losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


@torch.no_grad()
def next_centre(centre: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """centre <- momentum x centre + (1 - momentum) x the mean of ``teacher_logits`` (..., K) over
    every row of every rank."""
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    total = torch.cat([rows.sum(dim=0), rows.new_tensor([len(rows)])])
    total = dist.all_reduce_sum_(total)
    return momentum * centre + (1 - momentum) * total[:-1] / total[-1]

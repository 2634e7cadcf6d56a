"""Contrastive losses with mixed virtual labels (i-Mix, Lee et al. 2021; MixCo, Kim et al. 2020).

Row i of a mixed batch is ``lam[i]`` of its own image and ``1 - lam[i]`` of its partner's, at row
``i + shift[i]`` of the same rank (clipx/ssl/mixing.py). Its target over the clean candidates is
then ``lam[i]`` on its own positive and ``1 - lam[i]`` on its partner's (``mix_targets``); where the
loss also has clean anchors against mixed candidates (NT-Xent, CLIP's text-to-image), a clean row's
target is what each mixed candidate holds of it, normalised (``source_targets``): the transpose of
the mixing. With lam = 1 every target is one-hot and each loss is its unmixed form exactly.

Partners live on their own rank, so every target row is built from this rank's (lam, shift) with
the rank's offset into the gathered columns: the mean over ranks equals one process on the union
batch given the same mixes, as the unmixed losses do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx import dist
from clipx.losses.ntxent import view_logits


def mix_targets(lam: torch.Tensor, shift: torch.Tensor, columns: int, offset: int) -> torch.Tensor:
    """(B, columns): row i holds lam[i] at column offset + i and 1 - lam[i] at offset + i + shift[i]."""
    lam = lam.detach()
    rows = torch.arange(len(lam), device=lam.device)
    targets = lam.new_zeros(len(lam), columns)
    targets.index_put_((rows, offset + rows), lam, accumulate=True)
    targets.index_put_((rows, offset + rows + shift), 1 - lam, accumulate=True)
    return targets


def source_targets(lam: torch.Tensor, shift: torch.Tensor, columns: int, offset: int) -> torch.Tensor:
    """(B, columns): clean row j's share in each mixed column k (lam[k] if k = j, 1 - lam[k] if k's
    partner is j), normalised to sum 1."""
    lam = lam.detach()
    rows = torch.arange(len(lam), device=lam.device)
    targets = lam.new_zeros(len(lam), columns)
    targets.index_put_((rows, offset + rows), lam, accumulate=True)
    targets.index_put_((rows + shift, offset + rows), 1 - lam, accumulate=True)
    return targets / targets.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_j targets[i, j] log softmax(logits[i])_j; masked (-inf) logits may have target 0."""
    log_probs = F.log_softmax(logits, dim=1)
    return -torch.where(targets > 0, targets * log_probs, log_probs.new_zeros(())).sum(dim=1).mean()


def mixed_ntxent(z1: torch.Tensor, z2: torch.Tensor, lam: torch.Tensor, shift: torch.Tensor,
                 temperature: float, gather: str = "local") -> torch.Tensor:
    """NT-Xent (clipx.losses.NTXentLoss) with view 1 mixed: z1 (B, D) projections of the mixed view,
    z2 (B, D) of the clean view. Anchors and candidates as in NT-Xent (2B rows against the 2N
    gathered views, the anchor itself masked); a mixed anchor's target is ``mix_targets`` over the
    clean views, a clean anchor's is ``source_targets`` over the mixed views.

    i-Mix's SimCLR ("N-pair" in its code) contrasts the mixed views with the clean ones only, and
    mixes the second view in a second forward pass for the symmetric term; clipx keeps NT-Xent's
    one forward pass and 2N - 1 candidates per anchor, and gives the clean anchors the transposed
    targets instead, so lam = 1 is NT-Xent itself."""
    b = z1.shape[0]
    logits, _, offset = view_logits(z1, z2, temperature, gather)  # (2B, 2N), this rank's views from offset
    columns = logits.shape[1]
    targets = torch.cat([mix_targets(lam, shift, columns, offset + b), source_targets(lam, shift, columns, offset)])
    return soft_cross_entropy(logits, targets)


def mixed_queue_infonce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, lam: torch.Tensor,
                        shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v2 with mixed queries (MixCo's form): query (B, P) of mixed images; logits against its
    own key, its partner's key (B, P; this rank's, momentum-encoded, clean) and the queue (K, P);
    target lam on the own key, 1 - lam on the partner's. A row whose partner is itself has no second
    key column, so unmixed rows are ``queue_infonce`` exactly.

    i-Mix's MoCo code contrasts with all of the batch's keys and the queue (its "mocon"); MixCo adds
    the mixed loss to the clean one, where clipx replaces it (mixes a share of micro-batches by
    ssl.mix_prob instead)."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    rows = torch.arange(len(q), device=q.device)
    own = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    other = (q * k[rows + shift]).sum(dim=1, keepdim=True).masked_fill((shift == 0)[:, None], float("-inf"))
    logits = torch.cat([own, other, q @ queue.T], dim=1) / temperature  # (B, 2 + K)
    lam = torch.where(shift == 0, torch.ones_like(lam), lam.detach())
    targets = torch.cat([lam[:, None], (1 - lam)[:, None], lam.new_zeros(len(q), len(queue))], dim=1)
    return soft_cross_entropy(logits, targets)


def mixed_batch_infonce(query: torch.Tensor, key: torch.Tensor, lam: torch.Tensor, shift: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """MoCo v3 with mixed queries (B, P) against the global batch's clean keys (B, P each rank),
    targets ``mix_targets``; scaled by 2T as ``batch_infonce``."""
    q = F.normalize(query, dim=1)
    k = dist.gather_no_grad(F.normalize(key, dim=1))  # (N, P), no gradient to the momentum encoder
    targets = mix_targets(lam, shift, len(k), dist.rank() * len(q))
    return soft_cross_entropy(q @ k.T / temperature, targets) * 2 * temperature


def mixed_clip(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, lam: torch.Tensor,
               shift: torch.Tensor, gather: str = "local") -> torch.Tensor:
    """CLIP's symmetric InfoNCE with mixed images (B, D) and clean captions (B, D), unit-norm: a mixed
    image's target is the lam-mix of both its sources' captions, a caption's target is its share in
    each mixed image (``source_targets``). This rank's rows against every rank's columns for
    ``global`` and ``local`` alike (the same loss and gradients as ClipLoss's, dense)."""
    b = images.shape[0]
    if gather == "none" or not dist.is_distributed():
        rank, all_images, all_texts = 0, images, texts
    else:
        rank, all_images, all_texts = dist.rank(), dist.gather_with_grad(images), dist.gather_with_grad(texts)
    columns, offset = all_texts.shape[0], rank * b
    image_to_text = soft_cross_entropy(logit_scale * images @ all_texts.T, mix_targets(lam, shift, columns, offset))
    text_to_image = soft_cross_entropy(logit_scale * texts @ all_images.T, source_targets(lam, shift, columns, offset))
    return (image_to_text + text_to_image) / 2

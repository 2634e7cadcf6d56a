"""SigLIP: a sigmoid loss over every image-text pair, with text features passed around a ring of ranks.

Each rank scores its own images against its own texts (the positives), then against the texts of
every other rank, received one neighbour at a time. No rank ever holds the (N, N) or (B, N) logits:
each (B, B) block's loss and gradients are computed together and the logits are dropped at once.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist


class _SigmoidBlockLoss(torch.autograd.Function):
    """sum over a (B, B) block of -log sigmoid(y * z), z = scale * I T^T + bias, y = +1 on the
    diagonal of a positive block and -1 elsewhere; divided by ``batch``.

    Forward computes the gradients analytically (dL/dz = -y * sigmoid(-y z) / batch) and keeps only
    those (B, D) and scalar gradients: the (B, B) logits live for the duration of the forward.
    """

    @staticmethod
    def forward(ctx, images, texts, scale, bias, positive: bool, batch: int):
        logits = scale * images @ texts.T + bias  # (B, B), transient
        signs = -torch.ones_like(logits)
        if positive:
            signs.fill_diagonal_(1.0)
        loss = -F.logsigmoid(signs * logits).sum() / batch
        dz = -signs * torch.sigmoid(-signs * logits) / batch  # (B, B)
        similarity = images @ texts.T
        ctx.save_for_backward(scale * dz @ texts, scale * dz.T @ images, (dz * similarity).sum(), dz.sum())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_images, d_texts, d_scale, d_bias = ctx.saved_tensors
        return grad_loss * d_images, grad_loss * d_texts, grad_loss * d_scale, grad_loss * d_bias, None, None


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to rank ``to`` and receive a same-shaped tensor from ``source``; gradients go back."""

    @staticmethod
    def forward(ctx, x, to: int, source: int):
        ctx.to, ctx.source = to, source
        return _exchange(x, to, source)

    @staticmethod
    def backward(ctx, grad):
        # The gradient of what we received belongs to its sender; ours comes back from our receiver.
        return _exchange(grad, ctx.source, ctx.to), None, None


def _exchange(x: torch.Tensor, to: int, source: int) -> torch.Tensor:
    received = torch.empty_like(x)
    ops = [torch_dist.P2POp(torch_dist.isend, x.contiguous(), to),
           torch_dist.P2POp(torch_dist.irecv, received, source)]
    for request in torch_dist.batch_isend_irecv(ops):
        request.wait()
    return received


class SigLipLoss(nn.Module):
    """Sigmoid loss of Zhai et al. (2023) over the global batch.

    Called as ``loss(image_features, text_features, logit_scale, logit_bias)`` with unit-norm
    (B, D) features, ``logit_scale`` already exp()'d (init exp(log 10) = 10) and ``logit_bias``
    (init -10). The value is this rank's rows summed over all N columns, divided by B; the mean over
    ranks equals the single-process loss on the global batch, and gradients match it exactly once
    DDP averages them. ``gather`` is accepted for symmetry with ClipLoss: ``none`` keeps to local
    negatives, anything else uses every rank's texts.
    """

    def __init__(self, gather: str = "local"):
        super().__init__()
        self.gather = gather

    def forward(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        batch = image_features.shape[0]
        loss = _SigmoidBlockLoss.apply(image_features, text_features, logit_scale, logit_bias, True, batch)
        if self.gather == "none" or not dist.is_distributed():
            return loss
        rank, world = dist.rank(), dist.world_size()
        texts = text_features
        for _ in range(world - 1):  # after k hops we hold the texts of rank (rank - k) mod world
            texts = _NeighbourExchange.apply(texts, (rank + 1) % world, (rank - 1) % world)
            loss = loss + _SigmoidBlockLoss.apply(image_features, texts, logit_scale, logit_bias, False, batch)
        return loss

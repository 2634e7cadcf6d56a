"""SigLIP: a sigmoid loss over every image-text pair, with text features passed around a ring of ranks.

Each rank scores its own images against its own texts (the positives), then against every other
rank's texts, received one neighbour at a time. The whole ring runs inside one autograd Function
whose forward also forms the gradients: each text block travels with the gradient the visited ranks
computed for it and, after a full turn, is back at its owner with its complete gradient. A rank
therefore holds O(B x D) features and gradients and one (B, B) block of logits at a time, however
many ranks there are.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.precision import upcast

SIGLIP_GATHER_MODES = ("none", "local")


def _block(images, texts, scale, bias, positive: bool, batch: int):
    """Loss of one (B, B) block and its gradients w.r.t. images, texts, scale and bias (fp32).

    loss = sum -log sigmoid(y * z) / batch, z = scale * I T^T + bias, y = +1 on the diagonal of
    the positive block and -1 elsewhere; dL/dz = -y * sigmoid(-y * z) / batch.
    """
    similarity = images @ texts.T  # (B, B), transient
    logits = scale * similarity + bias
    signs = -torch.ones_like(logits)
    if positive:
        signs.fill_diagonal_(1.0)
    loss = -F.logsigmoid(signs * logits).sum() / batch
    d_logits = -signs * torch.sigmoid(-signs * logits) / batch
    return loss, scale * d_logits @ texts, scale * d_logits.T @ images, (d_logits * similarity).sum(), d_logits.sum()


def _exchange(tensors: list[torch.Tensor], to: int, source: int) -> list[torch.Tensor]:
    """Send ``tensors`` to rank ``to`` and receive same-shaped ones from ``source`` (all ranks at once)."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [torch_dist.P2POp(torch_dist.isend, t.contiguous(), to) for t in tensors]
    ops += [torch_dist.P2POp(torch_dist.irecv, r, source) for r in received]
    for request in torch_dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _SigLipRing(torch.autograd.Function):
    """The ring loss of this rank's images against all ranks' texts, with gradients formed in forward.

    The gradient returned for this rank's texts is the sum over all ranks' losses, as DDP's gradient
    averaging needs; it assumes every rank backpropagates its loss with the same weight (as the
    training loop does).
    """

    @staticmethod
    def forward(ctx, images, texts, scale, bias, ring: bool):
        batch = images.shape[0]
        ctx.dtypes = (images.dtype, texts.dtype, scale.dtype, bias.dtype)
        with torch.autocast(images.device.type, enabled=False):  # exact fp32 sums, whatever the caller's autocast
            images, texts, scale, bias = (upcast(t) for t in (images, texts, scale, bias))
            loss, d_images, d_texts, d_scale, d_bias = _block(images, texts, scale, bias, True, batch)
            if ring:
                rank, world = dist.rank(), dist.world_size()
                to, source = (rank + 1) % world, (rank - 1) % world
                travelling, travelling_grad = texts, d_texts
                for _ in range(world - 1):  # after k hops we hold rank (rank - k)'s texts
                    travelling, travelling_grad = _exchange([travelling, travelling_grad], to, source)
                    block_loss, block_d_images, block_d_texts, block_d_scale, block_d_bias = _block(
                        images, travelling, scale, bias, False, batch)
                    loss, d_images = loss + block_loss, d_images + block_d_images
                    d_scale, d_bias = d_scale + block_d_scale, d_bias + block_d_bias
                    travelling_grad = travelling_grad + block_d_texts
                # One last hop brings each block, with every rank's contribution, home to its owner.
                (d_texts,) = _exchange([travelling_grad], to, source)
        ctx.save_for_backward(d_images, d_texts, d_scale, d_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [(grad_loss * g).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None)


class SigLipLoss(nn.Module):
    """Sigmoid loss of Zhai et al. (2023) over the global batch.

    Called as ``loss(image_features, text_features, logit_scale, logit_bias)`` with unit-norm
    (B, D) features, ``logit_scale`` already exp()'d (init 10) and ``logit_bias`` (init -10). The
    value is this rank's rows summed over all N columns, divided by B; the mean over ranks equals
    the single-process loss on the global batch, and gradients match it once DDP averages them.
    gather: ``local`` (default) uses every rank's texts through the ring; ``none`` only local ones.
    """

    def __init__(self, gather: str = "local"):
        super().__init__()
        if gather not in SIGLIP_GATHER_MODES:
            raise ValueError(f"SigLipLoss gather must be one of {SIGLIP_GATHER_MODES}; got {gather!r}")
        self.gather = gather

    def forward(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        ring = self.gather == "local" and dist.is_distributed()
        return _SigLipRing.apply(image_features, text_features, logit_scale, logit_bias, ring)

"""Keeping BatchNorm from leaking which samples share a batch (MoCo's "cheating" shortcut).

When queries and keys are normalised with statistics of the same samples, the contrastive task can
be solved through those statistics instead of the image content. MoCo's remedy across devices is to
shuffle the keys' batch over ranks before the key encoder; ``bn_splits`` emulates several devices on
one by normalising each of ``splits`` interleaved groups of a batch separately.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.models.rebuild import batchnorm_as, replace_modules_


class _SplitBatchNorm:
    """Mixin: in training, normalise ``splits`` groups (rows i, i + s, i + 2s, ...) separately.

    The state dict is that of the plain BatchNorm it replaces, so checkpoints move freely between
    models built with and without splits. Running statistics are the mean over the groups.
    """

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % s:
            raise ValueError(f"ssl.bn_splits={s} must divide the per-device batch of {n}")
        grouped = x.reshape(n // s, c * s, *x.shape[2:])  # sample j*s + r -> channel block r
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        out = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
            self.num_batches_tracked += 1
        return out.reshape(x.shape)


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    pass


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    pass


def split_batchnorm_(module: nn.Module, splits: int) -> nn.Module:
    """Put a split BatchNorm holding the same parameters and statistics in place of every plain
    BatchNorm1d/2d of ``module``; returns ``module`` (the new layer if ``module`` is itself one)."""
    if splits == 1:
        return module

    def split(bn: nn.Module, _: str):
        if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d):
            return None
        new = batchnorm_as(SplitBatchNorm1d if type(bn) is nn.BatchNorm1d else SplitBatchNorm2d, bn)
        new.splits = splits
        return new

    return replace_modules_(module, split)


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` computed on a random share of the global batch, returned in input order.

    (B, ...) -> (B, D). Every rank encodes a random B of the gathered images (one permutation,
    drawn on rank 0), then the outputs are gathered and un-permuted. On one process the permutation
    regroups the batch across the BatchNorm splits.
    """
    gathered = dist.gather_no_grad(images)  # (world * B, ...)
    order = dist.broadcast_(torch.randperm(gathered.shape[0], device=images.device))
    mine = order.view(dist.world_size(), -1)[dist.rank()]
    encoded = dist.gather_no_grad(encoder(gathered[mine]))  # rows in permuted order
    restored = torch.empty_like(encoded)
    restored[order] = encoded
    return restored.view(dist.world_size(), images.shape[0], -1)[dist.rank()]


def check_sync_batchnorm(processes: int, device_type: str) -> None:
    """Refuse ssl.batchnorm=sync where torch has no kernels for it: several CPU processes. Called
    before the process group forms, so the refusal costs a second, not a launched job."""
    if processes > 1 and device_type == "cpu":
        from clipx.errors import ClipxError

        raise ClipxError("ssl.batchnorm=sync needs GPUs (torch's SyncBatchNorm does not run on the CPU); "
                         "use ssl.batchnorm=local, or shuffle for MoCo")


def sync_batchnorm(model: nn.Module, accelerator) -> nn.Module:
    """BatchNorm statistics over the global batch (SimCLR, MoCo v3): SyncBatchNorm when several
    processes train; torch implements it for GPUs only."""
    if accelerator.num_processes == 1:
        return model
    check_sync_batchnorm(accelerator.num_processes, accelerator.device.type)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)

"""torch names clipx relies on that torch does not document as public.

- ``nn.modules.batchnorm._BatchNorm``: the base of every BatchNorm class (1d/2d/3d, SyncBatchNorm,
  subclasses such as timm's), which clipx's BatchNorm handling must all recognise.
- ``nn.MultiheadAttention._qkv_same_embed_dim``: whether q, k and v share one packed projection.
- A fused Adam/AdamW's ``found_inf`` and ``grad_scale`` attributes: the inputs its kernel takes
  from ``GradScaler`` (a 1 in ``found_inf`` makes it skip the whole update on the device).
- ``GradScaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]``: the overflow flags
  ``unscale_`` leaves for ``step`` to read.
- ``LambdaLR.lr_lambdas``: the per-group multiplier functions, undocumented and not in its state dict.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer of any kind (1d/2d/3d, SyncBatchNorm, subclasses)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def has_packed_projection(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` projects q, k and v with one packed ``in_proj_weight`` (3E, E)
    (its key and value widths are its embedding width) rather than three separate weights."""
    return bool(attention._qkv_same_embed_dim)


@contextlib.contextmanager
def fused_step_skipped_where(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> Iterator[None]:
    """Context: the fused Adam/AdamW ``optimizer``'s steps inside it skip their whole update (moments,
    step count, weight decay) where ``found_inf`` (a 0-dim float32 tensor on the parameters' device)
    is 1, decided by the kernel on the device: the host never waits to know. Unscaled gradients."""
    optimizer.grad_scale, optimizer.found_inf = None, found_inf
    try:
        yield
    finally:
        optimizer.found_inf = None


def scaler_overflow_flags(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The overflow flags (one per device, 1.0 where a gradient was not finite) that
    ``scaler.unscale_(optimizer)`` computed and ``scaler.step(optimizer)`` will read; changing them
    in place changes whether that step is taken."""
    return list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())


def set_lr_lambdas(scheduler: torch.optim.lr_scheduler.LambdaLR, multiplier: Callable[[int], float]) -> None:
    """Make ``multiplier`` (step -> factor of each group's initial rate) every parameter group's
    schedule from the scheduler's next step on."""
    scheduler.lr_lambdas[:] = [multiplier] * len(scheduler.lr_lambdas)

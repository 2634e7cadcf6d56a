"""Momentum (EMA) encoders: the schedule of m and the in-place update, run after the optimizer step."""

from __future__ import annotations

import math

import torch


def momentum_at(step: int, total_steps: int, base: float, cosine: bool) -> float:
    """m for the update after ``step`` optimizer steps: ``base``, or raised from ``base`` to 1 along a
    half cosine over the run (BYOL; MoCo v3), so the key encoder settles as training ends."""
    if not cosine or total_steps <= 0:
        return base
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def update_momentum_(online: torch.nn.Module, target: torch.nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, parameter by parameter (buffers are left alone: the
    momentum encoder keeps the BatchNorm statistics of the batches it has seen, as in MoCo)."""
    online_params = [p.detach() for p in online.parameters()]
    target_params = [p for p in target.parameters()]
    if len(online_params) != len(target_params):
        raise ValueError("online and momentum encoders must have the same parameters")
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)

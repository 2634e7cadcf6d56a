"""AdamW with CLIP's parameter groups."""

from __future__ import annotations

import torch


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights, embeddings' gains, and the temperature (anything not a matrix) get no decay.

    Every weight matrix and convolution kernel has ndim >= 2; gains, biases and scalars have ndim < 2.
    """
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """AdamW over ``model``; the fused kernel where the parameters live on a GPU."""
    on_gpu = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, train_cfg.weight_decay),
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=train_cfg.eps,
        fused=True if on_gpu else None,
    )

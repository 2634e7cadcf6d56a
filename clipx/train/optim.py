"""AdamW with CLIP's parameter groups, and layer-wise learning-rate decay for fine-tuning towers."""

from __future__ import annotations

import torch

from clipx.compat.torch import fused_step_skipped_where
from clipx.errors import ClipxError
from clipx.models.lock import layer_groups


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights, embeddings' gains, and the temperature (anything not a matrix) get no decay.

    Every weight matrix and convolution kernel has ndim >= 2; gains, biases and scalars have ndim < 2.
    """
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name


def layer_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per parameter name of an image-text model: ``decay ** k`` for a tower's
    parameter k levels below the tower's top group (BEiT; timm's ``param_groups_layer_decay``).

    The levels are the groups that locking counts (clipx.models.lock): the stem (embeddings) deepest,
    then each transformer block, the head (final norm, projection) at the full rate. A tower without
    transformer blocks (a ResNet) is one group, at the full rate, as is everything outside the towers
    (logit scale and bias)."""
    if not (hasattr(model, "visual") and hasattr(model, "text")):
        raise ClipxError("train.layer_decay applies to image-text models (loss.name clip or siglip), whose towers "
                         "it counts blocks in; unset it")
    scales: dict[str, float] = {}
    blocks = 0
    for prefix in ("visual", "text"):
        groups, tower_blocks = layer_groups([name for name, _ in getattr(model, prefix).named_parameters()])
        top, blocks = max(groups.values(), default=0), blocks + tower_blocks
        scales.update({f"{prefix}.{name}": decay ** (top - group) for name, group in groups.items()})
    if not blocks:
        raise ClipxError("train.layer_decay found no transformer blocks in either tower (ResNets train as one "
                         "group); unset it")
    return scales


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None,
                 lr: float | None = None) -> list[dict]:
    """AdamW's groups: weight matrices with ``weight_decay``, the rest without. With ``layer_decay``
    (not None or 1), split further by level, each group at ``lr`` times its level's scale (the
    schedule then multiplies every group's own rate), full-rate groups first."""
    scales = layer_scales(model, layer_decay) if layer_decay is not None and layer_decay != 1.0 else {}
    levels = sorted(set(scales.values()) | {1.0}, reverse=True)
    groups: list[dict] = [{"params": [], "weight_decay": decay} for _ in levels for decay in (weight_decay, 0.0)]
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[2 * levels.index(scales.get(name, 1.0)) + is_no_decay(name, param)]["params"].append(param)
    if not scales:
        return groups  # the two groups every checkpoint without layer decay holds, even if one is empty
    if lr is None:
        raise ValueError("layer decay needs the base learning rate")
    for index, group in enumerate(groups):
        group["lr"] = lr * levels[index // 2]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """AdamW over ``model``, with the fused kernel where torch has one for the parameters' device.

    On CPU the fused kernel took 6 ms per step against 40 ms for the default per-tensor loop on the
    benchmark model (13 M parameters, 2 cores); on GPUs it saves the launches of the foreach path.
    """
    settings = dict(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps)
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.layer_decay, train_cfg.lr)
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except RuntimeError:  # no fused kernel for this device or dtype in this torch build
        return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay, train_cfg.layer_decay, train_cfg.lr),
                                 **settings)


def step_optimizer(optimizer, verdict, scaler) -> None:
    """Apply the optimizer's update if the guard's ``verdict`` allows it.

    A fused AdamW takes the verdict as a device flag: the ``found_inf`` input it has for GradScaler
    makes its kernel skip the whole update (moments, step count, weight decay), so the host never
    waits for the device to know whether the step was good. Other optimizers, and fp16 (whose
    scaler passes its own flag), branch on the verdict on the host.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
    if scaler is None and inner.defaults.get("fused"):
        with fused_step_skipped_where(inner, (~verdict.applied).to(torch.float32)):
            optimizer.step()
    elif verdict:
        optimizer.step()

"""Locked towers (LiT): freeze a tower's weights except its last N layer groups.

Groups, from the input end: the stem (embeddings), each transformer block, then the head (final
norm and projection). ``unlocked`` counts groups from the output end, as open_clip's
``--lock-image-unlocked-groups`` does. A transformers text tower has no head of its own: its groups
are the embeddings and each layer (so N unlocks its last N layers), and clipx's projection after it
always trains (it starts random).

Locked means unchanged, BatchNorm statistics included: a BatchNorm layer whose parameters are all
locked stays in eval mode (it normalises with its pretrained running statistics and never updates
them), as open_clip's own locking does for ResNet towers. With LoRA (model.lora_rank) the towers'
base weights are locked too (``freeze_base_``), their adapters train.

The same groups are the levels of layer-wise learning-rate decay (``train.layer_decay``,
clipx.train.optim), through ``layer_groups``.
"""

from __future__ import annotations

import re

import torch

from clipx.compat.torch import is_batchnorm
from clipx.errors import ClipxError
from clipx.models.lora import is_adapter_key
from clipx.models.rebuild import batchnorm_as, replace_modules_

_BLOCK = re.compile(r"(?:transformer\.resblocks|encoder\.layer|encoder\.layers)\.(\d+)\.")


def _group(name: str, blocks: int) -> int:
    """0 for the stem, 1..blocks for the blocks, blocks + 1 for the head."""
    match = _BLOCK.search(name)
    if match:
        return 1 + int(match.group(1))
    # A transformers pooler counts as stem: clipx pools the hidden states itself and never uses it.
    return blocks + 1 if name.split(".")[0] in ("ln_post", "proj", "ln_final", "text_projection") else 0


def layer_groups(names: list[str]) -> tuple[dict[str, int], int]:
    """(each parameter name's group, the number of transformer blocks) for a tower's parameter names:
    0 for the stem, 1..blocks for the blocks, blocks + 1 for the head (if it has one)."""
    blocks = 1 + max((int(m.group(1)) for m in map(_BLOCK.search, names) if m), default=-1)
    return {name: _group(name, blocks) for name in names}, blocks


def lock_tower(tower: torch.nn.Module, unlocked: int, keep_trainable: tuple[str, ...] = ()) -> int:
    """Freeze ``tower`` but its last ``unlocked`` groups and the parameters named in ``keep_trainable``;
    returns how many parameters were frozen."""
    groups, blocks = layer_groups([name for name, _ in tower.named_parameters() if not name.startswith(keep_trainable)])
    if unlocked and not blocks:
        raise ClipxError(f"this {type(tower).__name__} tower has no transformer blocks to count unlocked groups "
                         "in (a ResNet?); lock it whole (unlocked groups 0) or not at all")
    first_unlocked = max(groups.values()) + 1 - unlocked  # the last group: blocks + 1, or blocks without a head
    frozen = 0
    for name, param in tower.named_parameters():
        if name.startswith(keep_trainable) or groups[name] >= first_unlocked:
            continue
        param.requires_grad_(False)
        frozen += param.numel()
    freeze_locked_batchnorm_(tower)
    return frozen


class FrozenBatchNorm:
    """Mixin: a BatchNorm that ignores ``train()`` and stays in eval mode. Its state dict is the
    plain BatchNorm's, so checkpoints and exports do not change."""

    def train(self, mode: bool = True):
        return super().train(False)  # type: ignore[misc]


_FROZEN_CLASSES: dict[type, type] = {}


def _frozen(bn: torch.nn.Module) -> torch.nn.Module:
    """A frozen subclass of ``bn``'s class (one per class: plain, split, synchronised, timm's) holding
    its parameters, statistics and settings, in eval mode."""
    cls = type(bn)
    if cls not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[cls] = type(f"Frozen{cls.__name__}", (FrozenBatchNorm, cls), {})
    return batchnorm_as(_FROZEN_CLASSES[cls], bn).eval()


def freeze_locked_batchnorm_(module: torch.nn.Module) -> torch.nn.Module:
    """Put a frozen BatchNorm (eval mode for good) in place of every BatchNorm in ``module`` whose
    parameters are all locked, so it keeps its running statistics. Returns ``module`` (or its
    replacement, if ``module`` is itself such a BatchNorm)."""
    def freeze(bn: torch.nn.Module, _: str):
        locked = not any(p.requires_grad for p in bn.parameters(recurse=False))
        return _frozen(bn) if is_batchnorm(bn) and not isinstance(bn, FrozenBatchNorm) and locked else None

    return replace_modules_(module, freeze)


def freeze_base_(tower: torch.nn.Module, keep_trainable: tuple[str, ...] = ()) -> int:
    """Freeze every parameter of ``tower`` but its LoRA adapters and those named in ``keep_trainable``;
    returns how many parameters were frozen. BatchNorm layers left without trainable parameters keep
    their running statistics (as locked towers do)."""
    frozen = 0
    for name, param in tower.named_parameters():
        if not is_adapter_key(name) and not name.startswith(keep_trainable):
            param.requires_grad_(False)
            frozen += param.numel()
    freeze_locked_batchnorm_(tower)
    return frozen


def lock_towers(model: torch.nn.Module, cfg) -> None:
    """Apply model.lock_image / model.lock_text to a DualEncoder, and with model.lora_rank > 0 freeze
    both towers' base weights (their LoRA adapters and a transformers tower's projection train;
    everything outside the towers, the logit scale and heads, too). A locked tower's adapters are
    locked with it: locked means unchanged."""
    if (cfg.lock_image or cfg.lock_text) and not hasattr(model, "text"):
        raise ClipxError("model.lock_image and model.lock_text apply to image-text models (loss.name clip or siglip)")
    if cfg.lora_rank:
        freeze_base_(model.visual)
        freeze_base_(model.text, ("proj",) if cfg.text_tower == "hf" else ())
    if cfg.lock_image:
        lock_tower(model.visual, cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        # A transformers tower is HFTextTower(transformer, proj): its projection starts random.
        keep = ("proj",) if cfg.text_tower == "hf" else ()
        lock_tower(model.text, cfg.lock_text_unlocked_layers, keep)

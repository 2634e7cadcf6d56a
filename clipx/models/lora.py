"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for both towers.

An adapted layer computes ``W x + b + (alpha / r) * B A dropout(x)`` with A (r, in) and B (out, r);
B starts at zero, so a freshly adapted model computes exactly its base function, and with the
base weights frozen only A and B (a few per cent of the weights, or less) train.

What is adapted (``model.lora_targets``), in the repeated blocks of a tower only (modules whose
path has a list index: open_clip's ``transformer.resblocks.N``, transformers' ``encoder.layer.N``,
timm's ``blocks.N``):

- ``attn``: self-attention. open_clip's packed q/k/v projection (``FusedSelfAttention``'s
  ``in_proj_weight``, one adapter of output 3E) and its output projection; in a transformers
  tower every ``nn.Linear`` whose path names attention (BERT's query, key, value and
  ``attention.output.dense``).
- ``mlp``: every other ``nn.Linear`` of the blocks (open_clip's ``mlp.c_fc`` / ``mlp.c_proj``,
  BERT's ``intermediate.dense`` / ``output.dense``).

Adapted modules are rebuilt as subclasses of their class holding the same parameters
(clipx/models/rebuild.py), so they keep their class's behaviour and base weight names do not
change (pretrained loading, open_clip / transformers key layouts, exports); the adapter of a
``nn.Linear`` at path P is ``P.lora_A`` / ``P.lora_B`` (PEFT's names), that of an attention's packed
projection ``P.in_proj_lora_A`` / ``P.in_proj_lora_B``, so an adapter's base weight is its key with
``lora_A.weight`` replaced by ``weight`` in both cases. Adapters live inside the blocks, so FSDP's
per-block units shard them with their base weights.

Freezing the base weights is locking's business (clipx/models/lock.py:freeze_base_, which
imports this module; this module imports nothing of locking).

``merged_state_dict`` folds adapters into their base weights (what every export writes);
``peft_state`` names them as PEFT's adapter files do (``clipx export --format lora``,
clipx/apps/export_lora.py, says why clipx writes that layout itself rather than depending on peft).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from clipx.config_schema import LORA_TARGETS as TARGETS  # noqa: F401 (re-exported)
from clipx.errors import ClipxError
from clipx.models.fused_attention import FusedSelfAttention
from clipx.models.rebuild import META, adopt, replace_modules_

_IN_BLOCK = re.compile(r"(?:^|\.)\d+(?:\.|$)")
_ADAPTER_KEY = re.compile(r"(?:^|\.|_)lora_[AB]\.weight$")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA adapter's (``...lora_A.weight``, ``...in_proj_lora_B.weight``)."""
    return bool(_ADAPTER_KEY.search(key))


def _attach(module: nn.Module, prefix: str, in_features: int, out_features: int, rank: int, alpha: float,
            dropout: float, like: torch.Tensor) -> None:
    """Give ``module`` the adapter ``{prefix}lora_A`` (r, in) and ``{prefix}lora_B`` (out, r), B zero."""
    a = nn.Linear(in_features, rank, bias=False, device=like.device, dtype=like.dtype)  # Kaiming-uniform, as nn.Linear
    b = nn.Linear(rank, out_features, bias=False, device=like.device, dtype=like.dtype)
    nn.init.zeros_(b.weight)
    setattr(module, f"{prefix}lora_A", a)
    setattr(module, f"{prefix}lora_B", b)
    setattr(module, f"{prefix}lora_dropout", nn.Dropout(dropout) if dropout else nn.Identity())
    module.lora_scale = alpha / rank


class LoRALinear:
    """Mixin over an ``nn.Linear`` class: its output plus the adapter's. (..., in) -> (..., out)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    lora_scale: float
    base_weight = "weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scale  # type: ignore[misc]


class LoRASelfAttention(FusedSelfAttention):
    """``FusedSelfAttention`` with an adapter on its packed q/k/v projection (its ``out_proj`` is a
    ``LoRALinear`` of its own). Only the fast self-attention path applies adapters, so a call that
    ``nn.MultiheadAttention``'s own forward would take is refused rather than computed without them."""

    in_proj_lora_A: nn.Linear
    in_proj_lora_B: nn.Linear
    in_proj_lora_dropout: nn.Module
    lora_scale: float
    base_weight = "in_proj_weight"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.covers(query, key, value, key_padding_mask, need_weights):
            raise ClipxError("a LoRA-adapted attention layer computes self-attention without key padding masks or "
                             "returned weights only; set model.lora_targets without attn for this tower")
        return super().forward(query, key, value, None, False, attn_mask, average_attn_weights, is_causal)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.in_proj_lora_B(self.in_proj_lora_A(self.in_proj_lora_dropout(x)))  # (B, L, 3E)
        return super().in_projection(x) + lora * self.lora_scale


_LINEAR_CLASSES: dict[type, type] = {}


def _lora_linear_class(cls: type) -> type:
    """``cls`` with LoRALinear's forward; one class per base class (torch's out_proj subclass too)."""
    if cls not in _LINEAR_CLASSES:
        _LINEAR_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {})
    return _LINEAR_CLASSES[cls]


def _adapted_linear(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> nn.Module:
    """A LoRA subclass of ``linear``'s class holding its weight and bias, with a fresh adapter."""
    new = adopt(_lora_linear_class(type(linear))(linear.in_features, linear.out_features,
                                                 bias=linear.bias is not None, device=META), linear)
    _attach(new, "", linear.in_features, linear.out_features, rank, alpha, dropout, linear.weight)
    return new


def _adapted_attention(attention: FusedSelfAttention, rank: int, alpha: float, dropout: float) -> nn.Module:
    """A ``LoRASelfAttention`` holding ``attention``'s parameters, with a fresh adapter on its packed projection."""
    new = LoRASelfAttention.from_attention(attention)
    _attach(new, "in_proj_", attention.embed_dim, 3 * attention.embed_dim, rank, alpha, dropout,
            attention.in_proj_weight)
    return new


def _is_attention(path: str) -> bool:
    return any("attn" in part or "attention" in part for part in path.split("."))


def add_lora_(tower: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
              what: str = "tower") -> int:
    """Adapt ``tower``'s attention and/or MLP layers (``targets``) in place; returns how many layers
    were adapted. Refuses a tower in which the targets name nothing (e.g. a ModifiedResNet, no blocks)."""
    adapted = []

    def adapt(module: nn.Module, name: str) -> Optional[nn.Module]:
        if not _IN_BLOCK.search(name) or isinstance(module, (LoRALinear, LoRASelfAttention)):
            return None
        if isinstance(module, nn.MultiheadAttention):
            if "attn" not in targets:
                return None
            if type(module) is not FusedSelfAttention:
                raise ClipxError(f"model.lora_targets: the {what}'s attention {name} is not a packed self-attention "
                                 "that LoRA can adapt; leave attn out of model.lora_targets")
            adapted.append(name)
            return _adapted_attention(module, rank, alpha, dropout)
        if isinstance(module, nn.Linear) and ("attn" if _is_attention(name) else "mlp") in targets:
            adapted.append(name)
            return _adapted_linear(module, rank, alpha, dropout)
        return None

    replace_modules_(tower, adapt)  # a block's paths are never "", so the tower itself stays
    if not adapted:
        raise ClipxError(f"model.lora_targets {list(targets)} found no layers to adapt in the {what} "
                         f"({type(tower).__name__}: LoRA adapts transformer blocks); set model.lora_rank=0")
    return len(adapted)


def add_model_lora_(model: nn.Module, cfg) -> nn.Module:
    """With model.lora_rank > 0, adapt both towers of a DualEncoder as ``cfg`` (a ModelConfig) says."""
    if cfg.lora_rank:
        for what in ("visual", "text"):
            add_lora_(getattr(model, what), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                      tuple(cfg.lora_targets), f"{what} tower")
    return model


def _adapted(model: nn.Module):
    """(module path prefix, adapter key prefix, base weight key, scale) of every adapted layer."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASelfAttention)):
            prefix = f"{name}." if name else ""
            lora = "in_proj_" if isinstance(module, LoRASelfAttention) else ""
            yield prefix, prefix + lora, prefix + module.base_weight, module.lora_scale


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """``state`` (default: ``model.state_dict()``; e.g. ``model.clip_state_dict()``) with every adapter
    folded into its base weight, W + (alpha / r) B A (computed in fp32, stored in W's dtype), and no
    adapter keys: plain open_clip / transformers weights. A model without adapters comes back as it is."""
    state = dict(model.state_dict() if state is None else state)
    for _, lora, base, scale in _adapted(model):
        if base in state:
            delta = state[f"{lora}lora_B.weight"].float() @ state[f"{lora}lora_A.weight"].float()  # (out, in)
            state[base] = (state[base].float() + scale * delta).to(state[base].dtype)
    return {k: v for k, v in state.items() if not is_adapter_key(k)}


def peft_state(model: nn.Module, state: Optional[dict[str, torch.Tensor]] = None
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the adapters of ``state`` (default ``model.state_dict()``) in PEFT's saved names, the module
    paths PEFT must target to hold them). Names are ``base_model.model.<module path>.lora_A.weight``;
    an attention's packed projection is PEFT's ``nn.MultiheadAttention`` layer (``<attn>.lora_A``,
    its output projection under ``<attn>.base_layer.out_proj``)."""
    state = model.state_dict() if state is None else state
    out, targets = {}, []
    attentions = [p for p, lora, _, _ in _adapted(model) if lora != p]
    for prefix, lora, _, _ in _adapted(model):
        path = prefix[:-1]
        owner = next((a for a in attentions if path == f"{a}out_proj"), None)
        peft_path = f"{owner}base_layer.out_proj" if owner is not None else path
        if owner is None:
            targets.append(path)
        for part in ("A", "B"):
            out[f"base_model.model.{peft_path}.lora_{part}.weight"] = state[f"{lora}lora_{part}.weight"]
    return out, targets

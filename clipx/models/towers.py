"""Image and text towers: open_clip's, or a Hugging Face transformers text model from local disk.

Every tower maps its input to (B, embed_dim) features before normalisation; DualEncoder owns the
normalisation and the temperature.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from clipx.compat.open_clip import build_text_tower, build_vision_tower
from clipx.errors import ClipxError
from clipx.models.fused_attention import fuse_self_attention_


def build_open_clip_vision(arch: dict, patch_dropout: float = 0.0) -> nn.Module:
    """open_clip's vision tower (ViT, ModifiedResNet or timm) for an architecture dict. images (B, 3, H, W) -> (B, E).

    Its self-attention runs through ``FusedSelfAttention`` (same parameters, fewer copies).
    ``patch_dropout`` (model.patch_dropout): the fraction of patches a ViT drops in training, through
    open_clip's own PatchDropout; the architecture dict (and so an export) is left without it."""
    from open_clip.transformer import VisionTransformer

    vision_cfg = {**arch["vision_cfg"], "patch_dropout": patch_dropout} if patch_dropout else arch["vision_cfg"]
    tower = build_vision_tower(arch["embed_dim"], vision_cfg, quick_gelu=arch.get("quick_gelu", False))
    if patch_dropout and not isinstance(tower, VisionTransformer):
        raise ClipxError(f"model.patch_dropout drops ViT patches; this image tower is a {type(tower).__name__}")
    return fuse_self_attention_(tower)


def build_open_clip_text(arch: dict) -> nn.Module:
    """open_clip's text transformer for an architecture dict, with ``FusedSelfAttention``. tokens (B, L) -> (B, E)."""
    if arch["text_cfg"].get("hf_model_name"):
        raise ClipxError(
            "this open_clip architecture uses a Hugging Face text model; set model.text_tower=hf and "
            "model.hf_text_path to a local copy of it"
        )
    tower = build_text_tower(arch["embed_dim"], arch["text_cfg"], quick_gelu=arch.get("quick_gelu", False))
    # Token batches may end before the context length (data.trim_padding). open_clip slices its
    # positional embedding to the batch's length, but hands its blocks the causal mask at full
    # context size unless it also builds a padding mask.
    tower.transformer.register_forward_pre_hook(_mask_to_length, with_kwargs=True)
    return fuse_self_attention_(tower)


def _mask_to_length(transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an open_clip ``Transformer`` (x: (B, L, W), attn_mask: (C, C) or None):
    the mask's top-left (L, L) block, which is the causal mask of L tokens."""
    length = args[0].shape[1]
    if "attn_mask" in kwargs:
        mask = kwargs["attn_mask"]
        if mask is not None and mask.dim() == 2 and mask.shape[-1] != length:
            kwargs = {**kwargs, "attn_mask": mask[:length, :length]}
    elif len(args) > 1 and args[1] is not None and args[1].dim() == 2 and args[1].shape[-1] != length:
        args = (args[0], args[1][:length, :length], *args[2:])
    return args, kwargs


class HFTextTower(nn.Module):
    """A transformers encoder loaded from a local directory, pooled, then linearly projected.

    tokens: (B, L) input ids, padded with the tokenizer's pad id -> (B, embed_dim).
    """

    def __init__(self, path: str, embed_dim: int, pooling: str = "mean"):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if not os.path.isdir(path):
            raise ClipxError(f"model.hf_text_path {path} is not a directory holding a transformers model")
        # Never run code shipped with a model directory; weights load as safetensors or with
        # torch.load(weights_only=True) (transformers' default), never via unrestricted unpickling.
        try:
            self.config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except ValueError as error:  # e.g. a config that needs its own Python code (auto_map)
            raise ClipxError(f"model.hf_text_path {path}: {str(error).splitlines()[0]}") from None
        if torch.get_default_device().type == "meta":
            # A sharded build (clipx/train/sharded_init.py) takes only the shapes here; the weights
            # come from rank 0's eager build, which loads them below.
            self.transformer = AutoModel.from_config(self.config, trust_remote_code=False)
        else:
            self.transformer = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if getattr(self.transformer, "pooler", None) is not None:
            # clipx pools the hidden states itself. BERT's pooler would hold parameters that no loss
            # reaches, which DDP rejects at the first step; drop it rather than make every DDP run
            # search for unused parameters. Checkpoints that still hold it load (see below).
            self.transformer.pooler = None
            self.register_load_state_dict_pre_hook(_drop_pooler_weights)
        self.pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.pooling = pooling
        self.proj = nn.Linear(self.config.hidden_size, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_token_id).long()  # (B, L)
        hidden = self.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)
        return self.proj(pooled)


def _drop_pooler_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: ignore the pooler weights of checkpoints written while the pooler was kept."""
    for key in [k for k in state_dict if k.startswith(prefix + "transformer.pooler.")]:
        del state_dict[key]


def set_tower_grad_checkpointing(tower: nn.Module, enable: bool = True) -> None:
    """Recompute ``tower``'s activations during backward: open_clip towers through their own switch,
    a transformers tower (HFTextTower) through its model's."""
    if hasattr(tower, "set_grad_checkpointing"):
        tower.set_grad_checkpointing(enable)
    elif hasattr(tower, "transformer") and hasattr(tower.transformer, "gradient_checkpointing_enable"):
        if enable:
            tower.transformer.gradient_checkpointing_enable()
        else:
            tower.transformer.gradient_checkpointing_disable()

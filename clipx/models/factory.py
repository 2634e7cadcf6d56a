"""create_model: a DualEncoder from the model section of a config; create_text_encoder: a text tower alone."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from clipx.config import ModelConfig
from clipx.models.classifier import DualEncoderWithClassifier
from clipx.models.dual_encoder import DualEncoder, DualEncoderWithImageHead
from clipx.models.lora import add_model_lora_
from clipx.models.text_encoder import TextEncoder
from clipx.models.towers import HFTextTower, build_open_clip_text, build_open_clip_vision


def create_model(cfg: ModelConfig, image_head: Optional[nn.Module] = None,
                 classes: Optional[Sequence[int]] = None) -> DualEncoder:
    """Build towers as the config says; weights are random (checkpoints are loaded separately).
    With ``image_head``, the image tower also feeds that head (DualEncoderWithImageHead); with
    ``classes``, a linear classifier over them reads the image embedding (DualEncoderWithClassifier).
    With model.lora_rank > 0 both towers carry LoRA adapters (zero at first: the towers' function is
    unchanged); models/lock.py:lock_towers freezes their base weights for training."""
    visual = build_open_clip_vision(cfg.arch, cfg.patch_dropout)
    text = build_text_tower(cfg)
    scalars = {"init_temperature": cfg.init_temperature, "max_logit_scale": cfg.max_logit_scale,
               "init_logit_bias": cfg.init_logit_bias}
    if classes is not None:
        return add_model_lora_(DualEncoderWithClassifier(visual, text, cfg.arch["embed_dim"], classes, **scalars), cfg)
    if image_head is not None:
        return add_model_lora_(DualEncoderWithImageHead(visual, text, image_head, **scalars), cfg)
    return add_model_lora_(DualEncoder(visual, text, **scalars), cfg)


def build_text_tower(cfg: ModelConfig) -> nn.Module:
    """The text tower model.text_tower names: open_clip's for arch["text_cfg"], or a transformers model."""
    if cfg.text_tower == "hf":
        return HFTextTower(cfg.hf_text_path, cfg.arch["embed_dim"], cfg.hf_pooling)
    return build_open_clip_text(cfg.arch)


def create_text_encoder(cfg: ModelConfig, default_dropout: float = 0.0) -> TextEncoder:
    """A text tower alone (text-only training); an open_clip tower gets model.text_dropout, or
    ``default_dropout`` (the method's) when that is unset."""
    if cfg.text_tower == "hf":
        return TextEncoder(build_text_tower(cfg))
    return TextEncoder(build_text_tower(cfg), default_dropout if cfg.text_dropout is None else cfg.text_dropout)


def image_size(cfg: ModelConfig) -> int:
    """The square input resolution the vision tower expects."""
    size = cfg.arch["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else int(size[0])

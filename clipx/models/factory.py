"""create_model: a DualEncoder from the model section of a config; create_text_encoder: a text tower alone."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from clipx.config import ModelConfig, SigLip2Config
from clipx.errors import ClipxError
from clipx.models.classifier import DualEncoderWithClassifier
from clipx.models.decoders import CaptionDecoder, CoCaModel, build_coca_decoder, decoder_arch, locca_cfg
from clipx.models.dual_encoder import DualEncoder, DualEncoderWithImageHead
from clipx.models.lora import add_model_lora_
from clipx.models.siglip2 import ProjectionToPrototypes, SigLip2Model
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


def create_coca(cfg: ModelConfig) -> CoCaModel:
    """A CoCa model (clipx/models/decoders.py) for the architecture of ``cfg``: open_clip's CoCa
    layout, its decoder built from ``multimodal_cfg`` or, when the dict has none, from the text tower."""
    arch = decoder_arch(cfg.arch)
    scalars = {"init_temperature": cfg.init_temperature, "max_logit_scale": cfg.max_logit_scale,
               "init_logit_bias": cfg.init_logit_bias}
    return add_model_lora_(CoCaModel(build_open_clip_vision(arch, cfg.patch_dropout), build_open_clip_text(arch),
                                     build_coca_decoder(arch), arch, **scalars), cfg)


def create_siglip2(cfg: ModelConfig, terms: SigLip2Config) -> SigLip2Model:
    """SigLIP 2's model (clipx/models/siglip2.py) for ``cfg``'s towers: its image tower also hands out
    its patch tokens; a decoder and heads for the terms of ``terms`` whose weight is not 0."""
    vision_cfg = cfg.arch["vision_cfg"]
    if not isinstance(vision_cfg.get("layers", 12), int) or vision_cfg.get("attentional_pool"):
        raise ClipxError("loss.name=siglip2 reads a ViT's patch tokens; this image tower has none (a ModifiedResNet "
                         "or an attentional pooler)")
    arch = {**cfg.arch, "vision_cfg": {**vision_cfg, "output_tokens": True}}
    visual, width = build_open_clip_vision(arch, cfg.patch_dropout), vision_cfg["width"]
    decoder = CaptionDecoder(locca_cfg(arch, terms.decoder_layers), width) if terms.decoder_weight else None

    def head(dim: int):
        return ProjectionToPrototypes(dim, terms.head_hidden, terms.head_bottleneck, terms.prototypes)

    model = SigLip2Model(visual, build_text_tower(cfg), decoder,
                         head(cfg.arch["embed_dim"]) if terms.silc_weight else None,
                         head(width) if terms.tips_weight else None,
                         init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                         init_logit_bias=cfg.init_logit_bias)
    return add_model_lora_(model, cfg).attach_teacher()


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

"""open_clip's tower builders, which it keeps private (``open_clip.model._build_*_tower``).

open_clip's public constructors build whole models (``CLIP``, ``CustomTextCLIP``); clipx builds
each tower alone (a text tower from transformers, a tower per SSL encoder), from the same
architecture dicts. open_clip is imported when a tower is built, not when clipx is.
"""

from __future__ import annotations

import functools

import torch.nn as nn


def build_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """open_clip's image tower (ViT, ModifiedResNet or timm) for ``vision_cfg``. (B, 3, H, W) -> (B, embed_dim)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def build_text_tower(embed_dim: int, text_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """open_clip's text transformer (``TextTransformer``) for ``text_cfg``. tokens (B, L) -> (B, embed_dim)."""
    from open_clip.model import _build_text_tower

    return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)



@functools.cache
def caption_transformer_class() -> type:
    """open_clip's CoCa decoder class (``MultimodalTransformer``: causal self-attention blocks
    ``resblocks``, cross-attention blocks ``cross_attn`` over image tokens, ``ln_final``, then
    ``text_projection`` to the vocabulary), subclassed so its forward can project chosen rows only.

    The caption loss ignores padding, and at a small width the (B, L, vocabulary) logits cost more
    than the whole decoder: projecting only the positions with a label is the same loss at a
    fraction of the time. The state dict is the parent's, so open_clip loads an exported decoder."""
    from open_clip.transformer import MultimodalTransformer
    from torch.utils.checkpoint import checkpoint

    class CaptionTransformer(MultimodalTransformer):
        def forward(self, image_embs, text_embs, positions=None):
            """(image tokens (B, N, W), text tokens (B, L, W)[, positions (n,) flat indices into the
            B x L positions]) -> logits (B, L, V), or (n, V) at those positions."""
            mask = self.attn_mask[: text_embs.shape[1], : text_embs.shape[1]]
            for block, cross in zip(self.resblocks, self.cross_attn):
                if self.grad_checkpointing:
                    text_embs = checkpoint(block, text_embs, None, None, mask, use_reentrant=False)
                    text_embs = checkpoint(cross, text_embs, image_embs, image_embs, None, use_reentrant=False)
                else:
                    text_embs = block(text_embs, attn_mask=mask)
                    text_embs = cross(text_embs, k_x=image_embs, v_x=image_embs)
            out = self.ln_final(text_embs)
            return (out if positions is None else out.flatten(0, 1)[positions]) @ self.text_projection

    return CaptionTransformer


def build_multimodal_decoder(vocab_size: int, cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """A CoCa decoder (``caption_transformer_class``) as open_clip's CoCa builds one from
    ``multimodal_cfg`` (whose ``mlp_ratio`` it does not read: its blocks are 4 x wide, and so are
    these). (image_tokens (B, N, W), text_tokens (B, L, W)) -> (B, L, vocab_size)."""
    from open_clip.transformer import LayerNorm, QuickGELU

    return caption_transformer_class()(
        width=cfg["width"], layers=cfg["layers"], heads=cfg.get("heads", 8), context_length=cfg.get("context_length", 77),
        ls_init_value=cfg.get("ls_init_value"), output_dim=vocab_size,
        act_layer=QuickGELU if quick_gelu else nn.GELU, norm_layer=LayerNorm)

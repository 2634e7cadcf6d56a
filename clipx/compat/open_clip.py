"""open_clip's tower builders, which it keeps private (``open_clip.model._build_*_tower``).

open_clip's public constructors build whole models (``CLIP``, ``CustomTextCLIP``); clipx builds
each tower alone (a text tower from transformers, a tower per SSL encoder), from the same
architecture dicts. open_clip is imported when a tower is built, not when clipx is.
"""

from __future__ import annotations

import torch.nn as nn


def build_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """open_clip's image tower (ViT, ModifiedResNet or timm) for ``vision_cfg``. (B, 3, H, W) -> (B, embed_dim)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def build_text_tower(embed_dim: int, text_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """open_clip's text transformer (``TextTransformer``) for ``text_cfg``. tokens (B, L) -> (B, embed_dim)."""
    from open_clip.model import _build_text_tower

    return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)

"""Text decoders over image tokens: CoCa (open_clip's layout) and SigLIP 2's LocCa-style captioner.

Both read the image tower's tokens, so both need an open_clip ViT that hands them out
(``output_tokens``). ``decoder_arch`` turns a CLIP architecture dict into the CoCa one open_clip
builds from ``multimodal_cfg`` (unless the dict has one already): the image tower also returns its
tokens, the text tower appends a class token whose output is the text embedding (``embed_cls``) and
returns its token outputs, and the decoder is as wide and deep as the text tower. The exported dict
is what ``open_clip.create_model`` reads back into its ``CoCa`` class.

A captioner offers two calls to clipx.models.decoding.generate: ``image_context(images)`` (what
the decoder attends to, per image) and ``next_token_logits(context, tokens)`` (the next token of
every partial caption, given its image's context).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.compat.open_clip import build_multimodal_decoder
from clipx.errors import ClipxError
from clipx.models.dual_encoder import DualEncoder
from clipx.models.fused_attention import fuse_self_attention_


def decoder_arch(arch: dict) -> dict:
    """``arch`` as open_clip's CoCa configs write it: ``multimodal_cfg`` (derived from the text tower
    when missing), and towers that hand out their tokens. One-line error where open_clip's CoCa could
    not be built from it."""
    if "layers" in arch["vision_cfg"] and not isinstance(arch["vision_cfg"]["layers"], int):
        raise ClipxError("a text decoder attends to a ViT's patch tokens; this image tower is a ModifiedResNet "
                         "(vision_cfg.layers is a list)")
    if arch["text_cfg"].get("hf_model_name"):
        raise ClipxError("a text decoder needs open_clip's text transformer; this architecture names a Hugging Face one")
    text_cfg = arch["text_cfg"]
    out = copy.deepcopy(arch)
    out["vision_cfg"]["output_tokens"] = True
    out["text_cfg"].update(embed_cls=True, output_tokens=True)
    if "multimodal_cfg" not in arch:
        out["multimodal_cfg"] = {"context_length": text_cfg.get("context_length", 77),
                                 "vocab_size": text_cfg.get("vocab_size", 49408), "width": text_cfg["width"],
                                 "heads": text_cfg.get("heads", 8), "layers": text_cfg.get("layers", 12)}
    image_width = out["embed_dim"] if out["vision_cfg"].get("attentional_pool") else out["vision_cfg"]["width"]
    for name, width in (("image tokens", image_width), ("text tokens", text_cfg["width"])):
        if width != out["multimodal_cfg"]["width"]:
            raise ClipxError(f"open_clip's CoCa decoder attends to {name} {width} wide, but multimodal_cfg.width is "
                             f"{out['multimodal_cfg']['width']}: give vision_cfg, text_cfg and multimodal_cfg one width")
    return out


def init_vocab_projection_(decoder: nn.Module) -> nn.Module:
    """open_clip leaves a MultimodalTransformer's ``text_projection`` as ``torch.empty`` (its
    ``init_parameters`` is never called): give it CLIP's text-projection initialisation, so a
    seeded build is reproducible."""
    nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    return decoder


class CoCaModel(DualEncoder):
    """CoCa (Yu et al., 2022) with open_clip's attribute names (``visual``, ``text``,
    ``text_decoder``, ``logit_scale``, ``logit_bias``): its state dict is an open_clip CoCa's.

    The text embedding is the appended class token's output; the decoder reads the image tower's
    tokens and the text tower's token outputs (the unimodal text layers) and predicts each next token.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, text_decoder: nn.Module, arch: dict, **scalars):
        super().__init__(visual, text, **scalars)
        self.text_decoder = text_decoder
        self.open_clip_arch = arch  # what an export writes: open_clip builds its CoCa from it

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images)[0], dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens)[0], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """DualEncoder's four outputs, then the decoder's logits (B, L - 1, V) of tokens[:, 1:] given
        the tokens before each (teacher forcing); with ``positions`` (n,) (flat indices into
        tokens[:, 1:], clipx.data.batch.caption_positions), only theirs (n, V)."""
        image_latent, image_tokens = self.visual(images)
        text_latent, token_outputs = self.text(tokens)
        logits = self.text_decoder(image_tokens, token_outputs[:, :-1], positions)
        bias = self.logit_bias.reshape(()) if self.logit_bias is not None else None
        return F.normalize(image_latent, dim=-1), F.normalize(text_latent, dim=-1), self.scale(), bias, logits

    def image_context(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)[1]

    def next_token_logits(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_decoder(context, self.text(tokens)[1])[:, -1]


def build_coca_decoder(arch: dict) -> nn.Module:
    """open_clip's CoCa decoder for a ``decoder_arch`` dict, its self-attention fused."""
    decoder = build_multimodal_decoder(arch["multimodal_cfg"].get("vocab_size", 49408), arch["multimodal_cfg"],
                                       quick_gelu=arch.get("quick_gelu", False))
    return fuse_self_attention_(init_vocab_projection_(decoder))


class CaptionDecoder(nn.Module):
    """LocCa's decoder (Wan et al., 2024), as SigLIP 2 trains it beside the sigmoid loss: a transformer
    decoder of its own (token and position embeddings, causal self-attention, cross-attention over
    the image tower's patch tokens, projected to its width) predicting the caption's next tokens.

    Unlike CoCa's, it shares nothing with the text tower, so the text tower stays a SigLIP one.
    """

    def __init__(self, multimodal_cfg: dict, image_width: int, quick_gelu: bool = False):
        super().__init__()
        width, context = multimodal_cfg["width"], multimodal_cfg["context_length"]
        self.token_embedding = nn.Embedding(multimodal_cfg["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.image_projection = nn.Linear(image_width, width)
        self.transformer = fuse_self_attention_(init_vocab_projection_(
            build_multimodal_decoder(multimodal_cfg["vocab_size"], multimodal_cfg, quick_gelu=quick_gelu)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(image tokens (B, N, Wv), token ids (B, L)) -> logits (B, L, V) of each next token, or
        with ``positions`` (n,) (flat indices into the B x L positions) only theirs (n, V)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.transformer(self.image_projection(image_tokens), x, positions)


def locca_cfg(arch: dict, layers: Optional[int] = None) -> dict:
    """The LocCa decoder's shape for a CLIP ``arch``: the text tower's width, heads, context and
    vocabulary; ``layers`` or the text tower's depth."""
    text_cfg = arch["text_cfg"]
    return {"context_length": text_cfg.get("context_length", 77), "vocab_size": text_cfg.get("vocab_size", 49408),
            "width": text_cfg["width"], "heads": text_cfg.get("heads", 8),
            "layers": layers or text_cfg.get("layers", 12)}

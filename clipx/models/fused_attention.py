"""Self-attention for open_clip's blocks with the same parameters and state dict, and fewer copies.

open_clip's ``ResidualAttentionBlock`` calls ``nn.MultiheadAttention`` with batch-first inputs.
Its forward (``F.multi_head_attention_forward``) transposes the batch to sequence-first, splits the
packed q/k/v projection through a (3, L, B, E) contiguous copy, and moves every head to the batch
dimension with another copy; in backward, the split becomes a zero-filled (3, L, B, E) buffer that
each of q, k and v is added into. On the CPU, where these memory-bound passes cost as much as the
matmuls around them, that bookkeeping was about a tenth of the benchmark model's training step.

``FusedSelfAttention`` computes the same function from the same ``in_proj_weight``,
``in_proj_bias`` and ``out_proj``: one projection, q/k/v as strided views of it in (B, H, L, D)
layout (no copy; SDPA takes strided inputs), one attention call (``attention.attend``: SDPA, or
the explicit kernel where a run measured it faster) and the output projection. Calls it does
not cover (cross-attention, key padding masks, returned attention weights) go to the parent's
forward unchanged. ``fuse_self_attention_`` puts one in place of each such attention of a built
tower, holding the same parameter objects (clipx/models/rebuild.py); the state dict, and so every
checkpoint, pretrained load and export, stays exactly open_clip's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.compat.torch import has_packed_projection
from clipx.models.attention import attend
from clipx.models.rebuild import META, adopt, replace_modules_


class FusedSelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, packed projection, no bias_k/v) with a faster self-attention path."""

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention) -> "FusedSelfAttention":
        """A ``cls`` holding ``attention``'s parameters and ``out_proj`` (``fusable(attention)``)."""
        return adopt(cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout, batch_first=True,
                         device=META), attention)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.covers(query, key, value, key_padding_mask, need_weights):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batch, length, width = query.shape
        heads = self.num_heads
        qkv = self.in_projection(query)  # (B, L, 3E)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, attn_mask=sdpa_mask(attn_mask, batch, heads, q.dtype),
                     dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal and attn_mask is None)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out), None  # through its forward, so a LoRA adapter on it applies (models/lora.py)

    def covers(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor], need_weights: bool) -> bool:
        """Whether the fast self-attention path computes this call (otherwise MHA's own forward does)."""
        return not need_weights and key_padding_mask is None and query is key is value and query.dim() == 3

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """The packed q/k/v projection. (B, L, E) -> (B, L, 3E). LoRA's attention adds its adapter here."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)


def sdpa_mask(attn_mask: Optional[torch.Tensor], batch: int, heads: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``nn.MultiheadAttention``'s mask, as SDPA reads it: (L, S) or (B * H, L, S) -> broadcastable to
    (B, H, L, S); a boolean mask (True = may not attend, MHA's meaning) becomes an additive one,
    because SDPA reads True as "may attend"."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            attn_mask, float("-inf"))
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
    return attn_mask


def fusable(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose weights ``FusedSelfAttention`` reads as they are."""
    return (type(module) is nn.MultiheadAttention and module.batch_first and has_packed_projection(module)
            and module.bias_k is None and not module.add_zero_attn and module.in_proj_bias is not None)


def fuse_self_attention_(tower: nn.Module) -> nn.Module:
    """Put a ``FusedSelfAttention`` holding the same parameter objects (and so the same state dict)
    in place of every fusable ``nn.MultiheadAttention`` in ``tower``. Returns ``tower``, or the new
    attention if ``tower`` is itself one."""
    return replace_modules_(tower, lambda module, _: FusedSelfAttention.from_attention(module) if fusable(module)
                            else None)

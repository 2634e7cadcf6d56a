"""SigLIP 2's model: a SigLIP DualEncoder plus what its extra terms train (clipx/methods/siglip2.py).

- ``decoder``: LocCa's caption decoder over the image tower's patch tokens (decoders.CaptionDecoder);
- ``silc_head`` and ``tips_head``: DINO-style heads (an MLP, a unit-norm bottleneck, unit-norm
  prototypes) on the pooled image embedding and on each patch token;
- ``mask_token``: what a masked patch's embedding becomes in the student's masked view (TIPS);
- ``teacher``: an EMA copy of the image tower and the two heads, never seen by the optimizer.

A part whose term has weight 0 is not built. Everything runs in one ``forward`` call, so DDP sees one
forward per backward, and the teacher is a module of its own, so FSDP shards it as a unit.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx.models.decoders import CaptionDecoder
from clipx.models.dual_encoder import DualEncoder


class ProjectionToPrototypes(nn.Module):
    """DINO's head: MLP -> L2-normalised bottleneck -> cosine against unit-norm prototypes (its
    weight-normalised last layer with the norm fixed at 1). (..., D) -> (..., K)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * bottleneck ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class EmaTeacher(nn.Module):
    """The teacher: copies of the student's image tower and heads, updated only by the objective."""

    def __init__(self, visual: nn.Module, silc_head: Optional[nn.Module], tips_head: Optional[nn.Module]):
        super().__init__()
        self.visual = copy.deepcopy(visual)
        self.silc_head = copy.deepcopy(silc_head)
        self.tips_head = copy.deepcopy(tips_head)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        latent, tokens = self.visual(images)
        out = {}
        if self.silc_head is not None:
            out["teacher_silc"] = self.silc_head(latent)
        if self.tips_head is not None:
            out["teacher_tips"] = self.tips_head(tokens)
        return out


@contextlib.contextmanager
def masked_patches(visual: nn.Module, mask: torch.Tensor, token: torch.Tensor):
    """While inside, the ViT ``visual`` embeds the patches where ``mask`` (B, N) is True as ``token``:
    a forward hook on its patch embedding (``conv1``, (B, W, h, w) with N = h x w)."""

    def replace(module, args, out):
        grid = mask.view(out.shape[0], 1, *out.shape[2:])
        return torch.where(grid, token.to(out.dtype).view(1, -1, 1, 1), out)

    handle = visual.conv1.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class SigLip2Model(DualEncoder):
    """SigLIP's towers, temperature and bias, and SigLIP 2's decoder, heads and EMA teacher."""

    def __init__(self, visual: nn.Module, text: nn.Module, decoder: Optional[CaptionDecoder],
                 silc_head: Optional[nn.Module], tips_head: Optional[nn.Module], **scalars):
        super().__init__(visual, text, **scalars)
        self.decoder = decoder
        self.silc_head, self.tips_head = silc_head, tips_head
        self.mask_token = nn.Parameter(torch.zeros(visual.conv1.out_channels)) if tips_head is not None else None
        self.teacher: Optional[EmaTeacher] = None  # attach_teacher, once the student is complete

    def attach_teacher(self) -> "SigLip2Model":
        """Give the model its teacher, a copy of the student's parts as they are now (with any LoRA
        adapters, so the two have the same parameters), when a self-distillation term is on."""
        if self.silc_head is not None or self.tips_head is not None:
            self.teacher = EmaTeacher(self.visual, self.silc_head, self.tips_head)
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images)[0], dim=-1)

    def student_and_teacher(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The modules the teacher averages, and its copies of them, in the same order."""
        names = [name for name in ("visual", "silc_head", "tips_head") if getattr(self, name) is not None]
        return [getattr(self, n) for n in names], [getattr(self.teacher, n) for n in names]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, local_views: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
        """SigLIP's four outputs, then a dict of what the extra terms read: ``caption_logits``
        (B, L - 1, V) of tokens[:, 1:], or (n, V) at ``positions`` (clipx.data.batch.caption_positions); with ``local_views`` (V*B, 3, H, W), ``student_silc`` (V*B, K);
        with ``mask`` (B, N), ``student_tips`` (B, N, K) of the masked image; with either, the
        teacher's outputs on the whole image. Heads the call leaves unused are touched at weight 0
        (``unused``, a 0 to add to the loss), so DDP finds a gradient (zero) for every parameter at
        every step."""
        latent, patch_tokens = self.visual(images)
        image, text, scale, bias = F.normalize(latent, dim=-1), F.normalize(self.text(tokens), dim=-1), \
            self.scale(), self.logit_bias.reshape(())
        extra: dict[str, torch.Tensor] = {}
        if self.decoder is not None:
            extra["caption_logits"] = self.decoder(patch_tokens, tokens[:, :-1], positions)
        unused: list[torch.Tensor] = []
        if self.silc_head is not None:
            if local_views is not None:
                extra["student_silc"] = self.silc_head(self.visual(local_views)[0])
            else:
                unused.append(self.silc_head(latent.detach()).sum() * 0)
        if self.tips_head is not None:
            if mask is not None:
                with masked_patches(self.visual, mask, self.mask_token):
                    extra["student_tips"] = self.tips_head(self.visual(images)[1])
            else:
                unused.append((self.tips_head(patch_tokens.detach()).sum() + self.mask_token.sum()) * 0)
        if self.teacher is not None and (local_views is not None or mask is not None):
            extra.update(self.teacher(images))
        if unused:
            extra["unused"] = sum(unused)
        return image, text, scale, bias, extra

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """A SigLIP's weights (open_clip's CustomTextCLIP): the decoder, heads and teacher left out."""
        keep = ("visual.", "text.", "logit_scale", "logit_bias")
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    def image_context(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)[1]

    def next_token_logits(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(context, tokens)[:, -1]

"""Input mixing for contrastive losses (ssl.mix): i-Mix (Lee et al. 2021) and MixCo (Kim et al. 2020).

A ``Mixer`` mixes a micro-batch of anchor images with a permutation of the same micro-batch and
says how: per sample, the weight ``lam`` (B,) of its own image and the ``shift`` (B,) from its row
to its partner's row (partner = row + shift). A shift, unlike an index, stays true when the
loop concatenates micro-batches (feature caching) and when ranks' rows are gathered, so losses take
(lam, shift) over any concatenation of micro-batches. The losses then train each mixed anchor
towards the lambda-weighted pair of its two sources' positives (clipx/losses/mixed.py).

Where clipx follows i-Mix's code (github.com/kibok90/imix, ``builder.py``): lambda ~ Beta(alpha,
alpha) folded to max(lambda, 1 - lambda), one per sample for mixup and one per batch for cutmix
(whose lambda is then the box's exact uncovered share), and the permutation drawn per device, over
its own batch (here: per rank and micro-batch). Where it differs: ``mix_prob`` mixes only that share
of micro-batches (the others get lam = 1, shift = 0), and the draws come from torch's global CPU
generator, which checkpoints save per rank and feature caching replays, so resumes and replays
draw the same mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixDraw:
    """Mixed images (B, C, H, W), each row's own weight ``lam`` (B,) and ``shift`` (B,) to its partner."""

    images: torch.Tensor
    lam: torch.Tensor
    shift: torch.Tensor


class Mixer:
    """``Mixer(mode, alpha, prob)(images) -> MixDraw``: mode mixup or cutmix (ssl.mix)."""

    def __init__(self, mode: str, alpha: float = 1.0, prob: float = 1.0):
        if mode not in ("mixup", "cutmix"):
            raise ValueError(f"mode must be mixup or cutmix; got {mode!r}")
        self.mode, self.alpha, self.prob = mode, alpha, prob

    def __call__(self, images: torch.Tensor) -> MixDraw:
        b = len(images)
        # Every draw happens (on the CPU generator) whether or not this micro-batch mixes, so the
        # generator advances alike in both cases.
        apply = torch.rand(()).item() < self.prob
        perm = torch.randperm(b)
        beta = torch.distributions.Beta(torch.tensor(float(self.alpha)), torch.tensor(float(self.alpha)))
        lam = beta.sample((b,) if self.mode == "mixup" else ()).to(torch.get_default_dtype())
        lam = torch.maximum(lam, 1 - lam)
        corner = torch.rand(2)
        if not apply:
            return unmixed(images)
        partner = images[perm.to(images.device)]
        if self.mode == "mixup":
            weight = lam.to(images.device, images.dtype).view(-1, *[1] * (images.dim() - 1))
            mixed = weight * images + (1 - weight) * partner
        else:
            mixed, lam = paste_box(images, partner, lam, corner)
            lam = lam.expand(b)
        return MixDraw(mixed, lam.to(images.device), (perm - torch.arange(b)).to(images.device))


def unmixed(images: torch.Tensor) -> MixDraw:
    """The identity mix: every row its own source (lam 1, shift 0)."""
    b = len(images)
    return MixDraw(images, torch.ones(b, device=images.device), torch.zeros(b, dtype=torch.long, device=images.device))


def paste_box(images: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, corner: torch.Tensor):
    """CutMix: a box of about (1 - lam) of the area from ``partner`` pasted into ``images``, centred
    at ``corner`` (two uniforms in [0, 1)) and clipped at the border; returns (mixed, the share of
    each image still its own)."""
    h, w = images.shape[-2:]
    cut = (1 - lam).sqrt()
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(corner[0] * h), int(corner[1] * w)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, torch.tensor(1 - (bottom - top) * (right - left) / (h * w), dtype=torch.get_default_dtype())

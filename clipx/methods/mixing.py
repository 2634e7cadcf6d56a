"""ssl.mix (i-Mix / MixCo): what the mixed objectives share. Each mixed objective lives with its
method (``MixedSimCLRObjective`` in simclr.py, ``MixedMoCoObjective`` in moco.py,
``MixedContrastiveObjective`` in clip.py): it is that method's objective with the anchor images
mixed in ``features`` (clipx/ssl/mixing.py) and the loss given the mixes' virtual labels
(clipx/losses/mixed.py). This module imports no method.

The mix is drawn in ``features``, per micro-batch, from torch's CPU generator: feature caching
restores that generator before it replays a micro-batch, and checkpoints carry it per rank, so a
replay and a resumed run mix exactly as the first pass and the unbroken run did. Its (lam, shift)
travel with the features (``mix_lam``, ``mix_shift``; a shift stays valid when micro-batches are
concatenated) and are targets only: no gradient reaches them.
"""

from __future__ import annotations

import torch

from clipx.ssl.mixing import Mixer


def mixer_of(ssl_cfg) -> Mixer:
    """The configured ``Mixer`` (ssl.mix, ssl.mix_alpha, ssl.mix_prob)."""
    return Mixer(ssl_cfg.mix, ssl_cfg.mix_alpha, ssl_cfg.mix_prob)


def mix_features(mix, suffix: str = "") -> dict[str, torch.Tensor]:
    """A draw's (lam, shift) as features, named ``mix_lam<suffix>`` and ``mix_shift<suffix>``."""
    return {f"mix_lam{suffix}": mix.lam, f"mix_shift{suffix}": mix.shift}

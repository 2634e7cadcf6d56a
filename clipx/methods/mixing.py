"""ssl.mix (i-Mix / MixCo) for the methods whose loss it is defined for: SimCLR's NT-Xent, MoCo v2
and v3, and CLIP. Each mixed objective is its method's objective with the anchor images mixed in
``features`` (clipx/ssl/mixing.py) and the loss given the mixes' virtual labels
(clipx/losses/mixed.py).

The mix is drawn in ``features``, per micro-batch, from torch's CPU generator: feature caching
restores that generator before it replays a micro-batch, and checkpoints carry it per rank, so a
replay and a resumed run mix exactly as the first pass and the unbroken run did. Its (lam, shift)
travel with the features (``mix_lam``, ``mix_shift``; a shift stays valid when micro-batches are
concatenated) and are targets only: no gradient reaches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx.data.batch import IMAGE, VIEWS
from clipx.losses.mixed import mixed_batch_infonce, mixed_clip, mixed_ntxent, mixed_queue_infonce
from clipx.methods.image_text import ContrastiveObjective
from clipx.methods.moco import MoCoObjective
from clipx.methods.simclr import SimCLRObjective
from clipx.precision import upcast
from clipx.ssl.mixing import Mixer


def mixer_of(ssl_cfg) -> Mixer:
    """The configured ``Mixer`` (ssl.mix, ssl.mix_alpha, ssl.mix_prob)."""
    return Mixer(ssl_cfg.mix, ssl_cfg.mix_alpha, ssl_cfg.mix_prob)


def _mix_features(mix, suffix: str = "") -> dict[str, torch.Tensor]:
    return {f"mix_lam{suffix}": mix.lam, f"mix_shift{suffix}": mix.shift}


class MixedSimCLRObjective(SimCLRObjective):
    """SimCLR with view 1 mixed (i-Mix): ``mixed_ntxent``."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, mixer: Mixer):
        super().__init__(model, loss)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        mix = self.mixer(first)
        return {**super().features({VIEWS: [mix.images, second]}), **_mix_features(mix)}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        loss = mixed_ntxent(features["view1"], features["view2"], features["mix_lam"], features["mix_shift"],
                            self.loss.temperature, self.loss.gather)
        return {"loss": loss, "metrics": {}}


class MixedMoCoObjective(MoCoObjective):
    """MoCo with mixed queries and clean keys: v2 (MixCo's own and partner key against the queue)
    mixes view 1; v3 mixes both views' queries, each with its own draw."""

    def __init__(self, model: torch.nn.Module, ssl_cfg, global_batch: int, mixer: Mixer):
        super().__init__(model, ssl_cfg, global_batch)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        if self.version == 2:
            mix = self.mixer(first)
            return {"query": upcast(self.model(mix.images)), "key": self._keys(second), **_mix_features(mix)}
        mix1, mix2 = self.mixer(first), self.mixer(second)
        queries = upcast(self.model(torch.cat([mix1.images, mix2.images])))  # (2B, P)
        keys = self._keys(torch.cat([first, second]))  # (2B, P), of the clean views
        b = len(first)
        return {"query1": queries[:b], "query2": queries[b:], "key1": keys[:b], "key2": keys[b:],
                **_mix_features(mix1, "1"), **_mix_features(mix2, "2")}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        t = self.cfg.temperature
        if self.version == 2:
            key = features["key"].detach()
            loss = mixed_queue_infonce(features["query"], key, self.queue.features, features["mix_lam"],
                                       features["mix_shift"], t)
            self.stage("keys", F.normalize(key, dim=1))  # enqueued only if the step is applied
        else:
            loss = (mixed_batch_infonce(features["query1"], features["key2"].detach(), features["mix_lam1"],
                                        features["mix_shift1"], t)
                    + mixed_batch_infonce(features["query2"], features["key1"].detach(), features["mix_lam2"],
                                          features["mix_shift2"], t))
        return {"loss": loss, "metrics": {}}


class MixedContrastiveObjective(ContrastiveObjective):
    """CLIP with mixed images and clean captions: ``mixed_clip``."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, mixer: Mixer):
        super().__init__(model, loss)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        mix = self.mixer(batch[IMAGE])
        return {**super().features({**batch, IMAGE: mix.images}), **_mix_features(mix)}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        loss = mixed_clip(features["image"], features["text"], features["logit_scale"], features["mix_lam"],
                          features["mix_shift"], self.loss.gather)
        return {"loss": loss, "metrics": {"logit_scale": features["logit_scale"].detach().clone()}}

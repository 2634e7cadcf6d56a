"""MoCo v2 (a queue of momentum-encoded negatives) and v3 (in-batch keys, symmetric, predictor).

The model is an online encoder that the optimizer trains and its momentum copy that it never does.
The momentum update and the enqueue run in ``after_step``, after the optimizer has stepped: never
inside a forward, so a replayed forward (gradient caching) cannot update anything twice, and never
for a refused step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.config import BATCHNORM_MODES
from clipx.data.batch import VIEWS
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.losses.mixed import mixed_batch_infonce, mixed_queue_infonce
from clipx.losses.moco import batch_infonce, queue_infonce
from clipx.methods.mixing import mix_features, mixer_of
from clipx.methods.objective import Objective
from clipx.methods.views import ViewsMethod
from clipx.precision import upcast
from clipx.ssl.batchnorm import shuffled_forward
from clipx.ssl.encoder import ImageEncoder, projection_head
from clipx.ssl.mixing import Mixer
from clipx.ssl.momentum import momentum_at, update_momentum_
from clipx.ssl.queue import FeatureQueue


class MoCoModel(nn.Module):
    """encoder (+ predictor, MoCo v3) -> queries; momentum_encoder -> keys.

    The momentum encoder's parameters have ``requires_grad=False``: the optimizer never sees them,
    DDP does not reduce them, and they change only in ``MoCoObjective.after_step``.
    """

    def __init__(self, encoder: ImageEncoder, predictor_hidden: int | None):
        super().__init__()
        self.encoder = encoder
        out = encoder.head[-1].out_features
        self.predictor = projection_head(out, predictor_hidden, out) if predictor_hidden else None
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.feature_dim = encoder.feature_dim  # what encode_image returns, for the probes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm backbone features of the online encoder (what MoCo evaluates)."""
        return self.encoder.encode_image(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) queries."""
        queries = self.encoder(images)
        return self.predictor(queries) if self.predictor is not None else queries

    @torch.no_grad()
    def keys(self, images: torch.Tensor, shuffle: bool) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) keys from the momentum encoder, BatchNorm-shuffled if asked."""
        if shuffle:
            return shuffled_forward(self.momentum_encoder, images)
        return self.momentum_encoder(images)


class MoCoObjective(Objective):
    """A MoCoModel (possibly Accelerate-wrapped) trained with InfoNCE against momentum keys."""

    def __init__(self, model: torch.nn.Module, ssl_cfg, global_batch: int):
        self.model, self.cfg = model, ssl_cfg
        self.version, self.moco = ssl_cfg.moco.version, ssl_cfg.moco
        self.queue = None
        if self.version == 2:
            if self.moco.queue_size % global_batch:
                raise ClipxError(f"ssl.moco.queue_size={self.moco.queue_size} must be a multiple of the global batch "
                                 f"{global_batch} (batch_size x accum_steps x processes), so every step's keys "
                                 "fit between the pointer and the end of the queue")
            device = next(unwrap(model).parameters()).device
            initial = F.normalize(torch.randn(self.moco.queue_size, ssl_cfg.head_out, device=device), dim=1)
            self.queue = FeatureQueue(self.moco.queue_size, ssl_cfg.head_out, device, init=dist.broadcast_(initial))

    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return upcast(unwrap(self.model).keys(images, shuffle=self.cfg.batchnorm == "shuffle"))

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        if self.version == 2:
            return {"query": upcast(self.model(first)), "key": self._keys(second)}
        both = torch.cat([first, second])
        queries, keys = upcast(self.model(both)), self._keys(both)  # (2B, P) each
        b = len(first)
        return {"query1": queries[:b], "query2": queries[b:], "key1": keys[:b], "key2": keys[b:]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        t = self.cfg.temperature
        # Keys are targets, never differentiated: detached here so that gradient caching, which
        # turns every cached feature into a leaf, gives them no gradient to replay.
        if self.version == 2:
            key = features["key"].detach()
            loss = queue_infonce(features["query"], key, self.queue.features, t)
            self.stage("keys", F.normalize(key, dim=1))  # enqueued only if the step is applied
        else:
            loss = (batch_infonce(features["query1"], features["key2"].detach(), t)
                    + batch_infonce(features["query2"], features["key1"].detach(), t))
        return {"loss": loss, "metrics": {}}

    def after_step(self, step: int, total_steps: int) -> None:
        inner = unwrap(self.model)
        update_momentum_(inner.encoder, inner.momentum_encoder,
                         momentum_at(step, total_steps, self.moco.momentum, self.moco.momentum_cosine))
        if self.queue is not None and self.staged("keys"):
            # Every rank enqueues the same global batch of keys, so the queues never diverge.
            self.queue.enqueue(dist.gather_no_grad(torch.cat(self.staged("keys"))))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.queue.state_dict("moco_queue") if self.queue is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.queue is not None:
            self.queue.load_state_dict(state, "moco_queue")


class MixedMoCoObjective(MoCoObjective):
    """MoCo with mixed queries and clean keys (ssl.mix, clipx/methods/mixing.py): v2 (MixCo's own and
    partner key against the queue) mixes view 1; v3 mixes both views' queries, each with its own draw."""

    def __init__(self, model: torch.nn.Module, ssl_cfg, global_batch: int, mixer: Mixer):
        super().__init__(model, ssl_cfg, global_batch)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        if self.version == 2:
            mix = self.mixer(first)
            return {"query": upcast(self.model(mix.images)), "key": self._keys(second), **mix_features(mix)}
        mix1, mix2 = self.mixer(first), self.mixer(second)
        queries = upcast(self.model(torch.cat([mix1.images, mix2.images])))  # (2B, P)
        keys = self._keys(torch.cat([first, second]))  # (2B, P), of the clean views
        b = len(first)
        return {"query1": queries[:b], "query2": queries[b:], "key1": keys[:b], "key2": keys[b:],
                **mix_features(mix1, "1"), **mix_features(mix2, "2")}

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


class MoCo(ViewsMethod):
    variants = {"v2": {"ssl.moco.version": 2, "ssl.batchnorm": "shuffle"}, "v3": {"ssl.moco.version": 3}}
    batchnorm_modes = BATCHNORM_MODES
    updated_outside_optimizer = ("momentum_encoder.",)  # k <- m k + (1 - m) q after each step
    mixing = True

    def validate(self, config) -> None:
        s = config.ssl.moco
        if s.version == 2 and s.queue_size == 0:
            raise ClipxError("MoCo v2 needs ssl.moco.queue_size > 0 negatives (or ssl.moco.version=3, which needs none)")
        per_process = config.train.batch_size * config.train.accum_steps
        if s.version == 2 and s.queue_size % per_process:
            # The full rule (a multiple of the global batch) needs the process count, checked when the
            # objective is built; this part of it is known before any process starts.
            raise ClipxError(f"ssl.moco.queue_size={s.queue_size} must be a multiple of the global batch, hence of "
                             f"train.batch_size x train.accum_steps = {per_process}")

    def build_network(self, config, encoder):
        return MoCoModel(encoder, config.ssl.moco.predictor_hidden if config.ssl.moco.version == 3 else None)

    def objective(self, model, config):
        t = config.train
        global_batch = t.batch_size * t.accum_steps * dist.world_size()
        if config.ssl.mix != "none":
            return MixedMoCoObjective(model, config.ssl, global_batch, mixer_of(config.ssl))
        return MoCoObjective(model, config.ssl, global_batch)

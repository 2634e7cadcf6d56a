"""MoCo v2 (a queue of momentum-encoded negatives) and v3 (in-batch keys, symmetric, predictor).

The momentum update and the enqueue run in ``after_step``, after the optimizer has stepped: never
inside a forward, so a replayed forward (gradient caching) cannot update anything twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx import dist
from clipx.data.batch import VIEWS
from clipx.errors import ClipxError
from clipx.objectives.base import Objective
from clipx.objectives.clip import unwrap
from clipx.ssl.momentum import momentum_at, update_momentum_
from clipx.ssl.queue import FeatureQueue


class MoCoObjective(Objective):
    """A MoCoModel (possibly Accelerate-wrapped) trained with InfoNCE against momentum keys."""

    def __init__(self, model: torch.nn.Module, ssl_cfg, global_batch: int):
        self.model, self.cfg = model, ssl_cfg
        self.version = ssl_cfg.moco_version
        self.queue = None
        if self.version == 2:
            if ssl_cfg.queue_size % global_batch:
                raise ClipxError(f"ssl.queue_size={ssl_cfg.queue_size} must be a multiple of the global batch "
                                 f"{global_batch} (batch_size x accum_steps x processes), so every step's keys "
                                 "fit between the pointer and the end of the queue")
            device = next(unwrap(model).parameters()).device
            initial = F.normalize(torch.randn(ssl_cfg.queue_size, ssl_cfg.head_out, device=device), dim=1)
            self.queue = FeatureQueue(ssl_cfg.queue_size, ssl_cfg.head_out, device, init=dist.broadcast_(initial))

    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return unwrap(self.model).keys(images, shuffle=self.cfg.batchnorm == "shuffle").float()

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        if self.version == 2:
            return {"query": self.model(first).float(), "key": self._keys(second)}
        both = torch.cat([first, second])
        queries, keys = self.model(both).float(), self._keys(both)  # (2B, P) each
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
                         momentum_at(step, total_steps, self.cfg.momentum, self.cfg.momentum_cosine))
        if self.queue is not None and self.staged("keys"):
            # Every rank enqueues the same global batch of keys, so the queues never diverge.
            self.queue.enqueue(dist.gather_no_grad(torch.cat(self.staged("keys"))))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.queue.state_dict("moco_queue") if self.queue is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.queue is not None:
            self.queue.load_state_dict(state, "moco_queue")


def queue_infonce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v2: each query (B, P) against its key (B, P) and the queue's negatives (K, P)."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.T  # (B, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def batch_infonce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3: queries (B, P) against the keys of the global batch; scaled by 2T as in the paper."""
    q = F.normalize(query, dim=1)
    k = dist.gather_no_grad(F.normalize(key, dim=1))  # (N, P), no gradient to the momentum encoder
    labels = torch.arange(len(q), device=q.device) + dist.rank() * len(q)
    return F.cross_entropy(q @ k.T / temperature, labels) * 2 * temperature

"""SwAV: predict the code (Sinkhorn assignment to prototypes) of one global view from every other view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx.data.batch import VIEWS
from clipx.objectives.base import Objective
from clipx.objectives.clip import unwrap
from clipx.ssl.queue import FeatureQueue
from clipx.ssl.swav import sinkhorn

GLOBAL_VIEWS = 2  # codes come from the two full-resolution views, never from small crops


class SwAVObjective(Objective):
    """A SwAVModel (possibly Accelerate-wrapped) with per-view feature queues for small batches."""

    def __init__(self, model: torch.nn.Module, ssl_cfg):
        self.model, self.cfg = model, ssl_cfg
        device = next(unwrap(model).parameters()).device
        self.queues = ([FeatureQueue(ssl_cfg.queue_size, ssl_cfg.head_out, device) for _ in range(GLOBAL_VIEWS)]
                       if ssl_cfg.queue_size else [])
        self.steps_done = 0  # checkpointed: freezing and the queue start depend on it after a resume

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch[VIEWS]
        learn = self.steps_done >= self.cfg.freeze_prototypes_steps
        z, scores = self.model(views, learn_prototypes=learn)
        b, v = len(views[0]), len(views)
        # Sample-major (B, V, ...) so that micro-batches concatenate along the batch dimension.
        return {"z": z.float().view(v, b, -1).transpose(0, 1), "scores": scores.float().view(v, b, -1).transpose(0, 1)}

    def _codes(self, scores: torch.Tensor, view: int) -> torch.Tensor:
        """(B, K) codes for one global view, computed with the queued projections when in use."""
        queue = self.queues[view] if self.queues else None
        if queue is not None and queue.full and self.steps_done >= self.cfg.queue_start_step:
            prototypes = unwrap(self.model).prototypes.weight.detach().float()
            stored = queue.features @ prototypes.T  # (Q, K) scored by today's prototypes
            return sinkhorn(torch.cat([stored, scores]), self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters)[-len(scores):]
        return sinkhorn(scores, self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters)

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        scores = features["scores"]  # (B, V, K)
        views = scores.shape[1]
        log_probs = F.log_softmax(scores / self.cfg.temperature, dim=-1)
        loss = scores.new_zeros(())
        for view in range(GLOBAL_VIEWS):
            codes = self._codes(scores[:, view].detach(), view)  # (B, K), no gradient
            for other in range(views):
                if other != view:
                    loss = loss - (codes * log_probs[:, other]).sum(dim=-1).mean()
        self.stage("z", features["z"][:, :GLOBAL_VIEWS])  # (B, 2, P), enqueued only if the step is applied
        return {"loss": loss / (GLOBAL_VIEWS * (views - 1)), "metrics": {}}

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done = step
        unwrap(self.model).normalize_prototypes_()
        if self.queues and self.staged("z"):
            stored = torch.cat(self.staged("z"))  # (B, 2, P), this rank's only: each rank keeps its own queue
            for view, queue in enumerate(self.queues):
                queue.enqueue(stored[-queue.size:, view])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps_done": torch.tensor(self.steps_done)}
        for view, queue in enumerate(self.queues):
            state.update(queue.state_dict(f"swav_queue{view}"))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps_done = int(state["steps_done"])
        for view, queue in enumerate(self.queues):
            queue.load_state_dict(state, f"swav_queue{view}")

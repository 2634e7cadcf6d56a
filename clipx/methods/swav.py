"""SwAV: predict the code (Sinkhorn assignment to prototypes) of one global view from every other view.

The model is an image encoder with learnable prototypes (unit vectors, renormalised after every
applied step); small batches borrow stored projections from per-view queues for the assignment.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.data.batch import VIEWS
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.losses.swav import sinkhorn, swapped_prediction
from clipx.methods.objective import Objective
from clipx.methods.views import ViewsMethod
from clipx.precision import upcast
from clipx.ssl.encoder import ImageEncoder
from clipx.ssl.queue import FeatureQueue

GLOBAL_VIEWS = 2  # codes come from the two full-resolution views, never from small crops


class SwAVModel(nn.Module):
    """ImageEncoder -> unit-norm projections z; prototypes (K unit vectors) -> scores z . c_k."""

    def __init__(self, encoder: ImageEncoder, prototypes: int):
        super().__init__()
        self.encoder = encoder
        self.prototypes = nn.Linear(encoder.head[-1].out_features, prototypes, bias=False)
        self.normalize_prototypes_()
        self.feature_dim = encoder.feature_dim  # what encode_image returns, for the probes

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project the prototypes back onto the unit sphere (after every optimizer step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images)

    def forward(self, views: list[torch.Tensor], learn_prototypes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """V views of B images (sizes may differ) -> z (V*B, P) and scores (V*B, K), view-major.

        While the prototypes are frozen they still take part in the graph, with zero gradient, so
        that DDP sees every parameter used; the optimizer then leaves them as they are.
        """
        z = F.normalize(self.encoder(views), dim=1)
        weight = self.prototypes.weight
        if not learn_prototypes:
            weight = weight.detach() + 0.0 * weight
        return z, z @ weight.T


class SwAVObjective(Objective):
    """A SwAVModel (possibly Accelerate-wrapped) with per-view feature queues for small batches."""

    def __init__(self, model: torch.nn.Module, ssl_cfg):
        self.model, self.cfg, self.swav = model, ssl_cfg, ssl_cfg.swav
        device = next(unwrap(model).parameters()).device
        self.queues = ([FeatureQueue(self.swav.queue_size, ssl_cfg.head_out, device) for _ in range(GLOBAL_VIEWS)]
                       if self.swav.queue_size else [])
        self.steps_done = 0  # checkpointed: freezing and the queue start depend on it after a resume

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch[VIEWS]
        learn = self.steps_done >= self.swav.freeze_prototypes_steps
        z, scores = self.model(views, learn_prototypes=learn)
        b, v = len(views[0]), len(views)
        # Sample-major (B, V, ...) so that micro-batches concatenate along the batch dimension.
        return {"z": upcast(z).view(v, b, -1).transpose(0, 1), "scores": upcast(scores).view(v, b, -1).transpose(0, 1)}

    def _codes(self, scores: torch.Tensor, view: int) -> torch.Tensor:
        """(B, K) codes for one global view, computed with the queued projections when in use."""
        queue = self.queues[view] if self.queues else None
        if queue is not None and queue.full and self.steps_done >= self.swav.queue_start_step:
            # Outside the model's forward a sharded (FSDP) weight is a DTensor: score with the whole of it.
            prototypes = dist.full_tensor(unwrap(self.model).prototypes.weight.detach()).float()
            stored = queue.features @ prototypes.T  # (Q, K) scored by today's prototypes
            return sinkhorn(torch.cat([stored, scores]), self.swav.sinkhorn_epsilon, self.swav.sinkhorn_iters)[-len(scores):]
        return sinkhorn(scores, self.swav.sinkhorn_epsilon, self.swav.sinkhorn_iters)

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        scores = features["scores"]  # (B, V, K)
        codes = [self._codes(scores[:, view].detach(), view) for view in range(GLOBAL_VIEWS)]  # no gradient
        self.stage("z", features["z"][:, :GLOBAL_VIEWS])  # (B, 2, P), enqueued only if the step is applied
        return {"loss": swapped_prediction(scores, codes, self.cfg.temperature), "metrics": {}}

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


class SwAV(ViewsMethod):
    multi_crop = True

    def validate(self, config) -> None:
        if config.ssl.views.count != 2:
            raise ClipxError("SwAV swaps predictions between 2 global views (ssl.views.count=2); add "
                             "ssl.views.small_crops for more")

    def build_network(self, config, encoder):
        return SwAVModel(encoder, config.ssl.swav.prototypes)

    def objective(self, model, config):
        return SwAVObjective(model, config.ssl)

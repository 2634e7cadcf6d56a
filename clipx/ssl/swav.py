"""SwAV's pieces: an encoder with learnable prototypes, and Sinkhorn–Knopp over the global batch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipx import dist
from clipx.ssl.encoder import ImageEncoder


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


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Equipartitioned soft assignments of the global batch to prototypes (SwAV's Sinkhorn–Knopp).

    scores (N, K) are this rank's rows; the marginals are taken over the rows of all ranks. Returns
    (N, K) codes: each row sums to 1 and, at convergence, each prototype receives an equal share
    (N_global / K) of the global batch.
    """
    logits = scores.float() / epsilon
    logits = logits - dist.all_reduce_max_(logits.max().clone())  # the exponent stays finite
    q = torch.exp(logits).T  # (K, N)
    k = q.shape[0]
    n_global = dist.all_reduce_sum_(torch.tensor(float(q.shape[1]), device=q.device))
    q /= dist.all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total mass 1/N
        q /= n_global
    return (q * n_global).T

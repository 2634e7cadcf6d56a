"""SwAV's pieces on features: Sinkhorn–Knopp over the global batch, and the swapped prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx import dist
from clipx.precision import upcast


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Equipartitioned soft assignments of the global batch to prototypes (SwAV's Sinkhorn–Knopp).

    scores (N, K) are this rank's rows; the marginals are taken over the rows of all ranks. Returns
    (N, K) codes: each row sums to 1 and, at convergence, each prototype receives an equal share
    (N_global / K) of the global batch.
    """
    logits = upcast(scores) / epsilon
    logits = logits - dist.all_reduce_max_(logits.max().clone())  # the exponent stays finite
    q = torch.exp(logits).T  # (K, N)
    k = q.shape[0]
    # Filled on the device (new_full), not copied there from a Python number (torch.tensor(...,
    # device=...)), which on a GPU is a blocking host-to-device copy at every step.
    n_global = dist.all_reduce_sum_(q.new_full((), float(q.shape[1])))
    q /= dist.all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total mass 1/N
        q /= n_global
    return (q * n_global).T


def swapped_prediction(scores: torch.Tensor, codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """scores (B, V, K) of V views; codes[g] (B, K) of global view g: every other view predicts each
    global view's code, cross-entropy averaged over the pairs."""
    views = scores.shape[1]
    log_probs = F.log_softmax(scores / temperature, dim=-1)
    terms = [-(code * log_probs[:, other]).sum(dim=-1).mean()
             for view, code in enumerate(codes) for other in range(views) if other != view]
    return torch.stack(terms).mean()

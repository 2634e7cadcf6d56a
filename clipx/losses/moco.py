"""MoCo's InfoNCE: queries against momentum keys (targets, never differentiated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipx import dist


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

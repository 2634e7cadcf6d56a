"""Cross-entropy of query rows against many key columns without ever holding the (B, N) logits.

For B local queries and N gathered keys the forward pass keeps only a running log-sum-exp per row;
the backward pass recomputes one (B, chunk) block of logits at a time. Memory is O(B x chunk) for
logits, so the loss's memory grows with N only through the (N, D) features themselves.
"""

from __future__ import annotations

import torch

from clipx.precision import upcast


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i [ logsumexp_j(s q_i . k_j) - s q_i . k_{t_i} ]  for queries (B, D), keys (N, D), targets (B,)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, targets, chunk: int):
        # fp32 with autocast off in both passes: backward recomputes the blocks and must reproduce
        # exactly the log-sum-exp that forward accumulated.
        ctx.dtypes = (queries.dtype, keys.dtype, scale.dtype)
        with torch.autocast(queries.device.type, enabled=False):
            return ChunkedCrossEntropy._forward(ctx, upcast(queries), upcast(keys), upcast(scale), targets, chunk)

    @staticmethod
    def _forward(ctx, queries, keys, scale, targets, chunk: int):
        lse = torch.full((queries.shape[0],), float("-inf"), dtype=queries.dtype, device=queries.device)
        for start in range(0, keys.shape[0], chunk):
            block = scale * queries @ keys[start:start + chunk].T  # (B, c), transient
            lse = torch.logaddexp(lse, torch.logsumexp(block, dim=1))
        positive = scale * (queries * keys[targets]).sum(dim=1)  # (B,)
        ctx.save_for_backward(queries, keys, scale, targets, lse)
        ctx.chunk = chunk
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False):
            grads = ChunkedCrossEntropy._backward(ctx, upcast(grad_loss))
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None)

    @staticmethod
    def _backward(ctx, grad_loss):
        queries, keys, scale, targets, lse = ctx.saved_tensors
        batch = queries.shape[0]
        d_queries = torch.zeros_like(queries)
        d_keys = torch.zeros_like(keys)
        d_scale = torch.zeros_like(scale)
        rows = torch.arange(batch, device=queries.device)
        for start in range(0, keys.shape[0], ctx.chunk):
            key_block = keys[start:start + ctx.chunk]
            similarity = queries @ key_block.T  # (B, c)
            d_block = torch.exp(scale * similarity - lse[:, None])  # softmax probabilities
            inside = (targets >= start) & (targets < start + key_block.shape[0])
            d_block[rows[inside], targets[inside] - start] -= 1.0  # minus the one-hot targets
            d_block *= grad_loss / batch
            d_queries += scale * d_block @ key_block
            d_keys[start:start + ctx.chunk] = scale * d_block.T @ queries
            d_scale += (d_block * similarity).sum()
        return d_queries, d_keys, d_scale

"""Gradients for one optimizer step from K micro-batches: naive accumulation or feature caching.

Feature caching (GradCache, Gao et al. 2021; open_clip's "accumulate features") gives the gradient
of one step at batch K x B with the memory of a micro-batch: embed every micro-batch without
autograd, compute the contrastive loss once over all K x B features, then re-run each micro-batch
with autograd and feed it the gradient its features received.

Only the features the loss differentiates carry a gradient into the replay: targets such as MoCo's
momentum keys are detached by their objective and get none. Under fp16 the replayed gradients are
multiplied by the loss scale, exactly as ``accelerator.backward`` scales a loss, so the loss scaler
unscales and checks them like any other step's.
"""

from __future__ import annotations

import contextlib

import torch

from clipx.train.sharding import gradient_sync_off, is_sharded


def micro_batch_gradients(accelerator, model, objective, micro_batches: list[dict], mode: str) -> dict:
    """Accumulate gradients of ``micro_batches`` into the model; returns the objective's output."""
    if mode == "features" and len(micro_batches) > 1:
        return _feature_cache(accelerator, model, objective, micro_batches)
    return _naive(accelerator, model, objective, micro_batches)


def _sync_last(accelerator, model, index: int, count: int):
    """DDP all-reduces (FSDP reduce-scatters) gradients once, after the last micro-batch's backward."""
    if index == count - 1:
        return contextlib.nullcontext()
    return gradient_sync_off(model) if is_sharded(model) else accelerator.no_sync(model)


def _naive(accelerator, model, objective, micro_batches: list[dict]) -> dict:
    """K independent losses of B samples each, averaged: fewer negatives than one batch of K x B."""
    count = len(micro_batches)
    losses = []
    for index, batch in enumerate(micro_batches):
        with _sync_last(accelerator, model, index, count):
            out = objective(batch)
            accelerator.backward(out["loss"] / count)
        losses.append(out["loss"].detach())
    return {"loss": torch.stack(losses).mean(), "metrics": out["metrics"]}


def _feature_cache(accelerator, model, objective, micro_batches: list[dict]) -> dict:
    count = len(micro_batches)
    scaler = accelerator.scaler
    rng_states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state())
            cached.append(objective.features(batch))
    # Non-float features (a mask of which samples have a hard negative) carry no gradient.
    leaves = [{k: v.detach().requires_grad_(v.is_floating_point()) for k, v in features.items()} for features in cached]
    out = objective.loss_from_features(_concat(leaves))
    out["loss"].backward()  # gradients w.r.t. the cached features only: the towers are not in this graph
    for index, (batch, features) in enumerate(zip(micro_batches, leaves)):
        _restore_rng_state(rng_states[index])  # the replay must see the same randomness as the first pass
        with _sync_last(accelerator, model, index, count):
            replayed = objective.replay_features(batch, features)
            tensors, grads = [], []
            for name, value in replayed.items():
                if value.ndim == 0:
                    # Scalars (logit scale, bias) entered the loss once, from the first micro-batch;
                    # each replay carries an equal share of their gradient.
                    grad = leaves[0][name].grad
                    grad = None if grad is None else grad / count
                else:
                    grad = features[name].grad
                if grad is None:
                    continue
                if not value.requires_grad:
                    raise RuntimeError(f"feature {name!r} received a gradient from the loss but its replay does not "
                                       "require grad; an objective must detach the features it uses as targets")
                tensors.append(value)
                grads.append(scaler.scale(grad) if scaler is not None else grad)
            torch.autograd.backward(tensors, grads)
    return {"loss": out["loss"].detach(), "metrics": out["metrics"]}


def _concat(per_micro_batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-sample tensors along the batch dim; 0-dim scalars come from the first entry.

    Scalars are the same in every micro-batch (parameters do not change within a step), and
    using one copy gives the loss exactly the graph of a single large batch.
    """
    first = per_micro_batch[0]
    return {name: first[name] if first[name].ndim == 0 else torch.cat([f[name] for f in per_micro_batch])
            for name in first}


class BufferSnapshot:
    """A copy of a model's buffers (BatchNorm running statistics and counters), to put back when a
    step is refused: forward passes move them even though no update is applied."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(saved)

    @torch.no_grad()
    def restore_unless(self, applied: torch.Tensor) -> None:
        """``restore`` when the 0-dim bool ``applied`` is false, decided on the device (no host read)."""
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(torch.where(applied, buffer, saved))


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _restore_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)

"""EMA weights (``train.ema_decay``): an fp32 exponential moving average of the trainable parameters.

After every applied optimizer step, ``ema <- d * ema + (1 - d) * param`` (timm's ModelEmaV3, without
its warm-up). A refused step leaves it alone, like every other per-step state of a run.

Only trainable parameters are averaged. Everything else in the model's state dict (BatchNorm
statistics, locked towers, a momentum encoder) is read from the live model whenever the EMA model is
used or saved: the loop puts buffers back after a refused step, so the live values are those of the
last applied step, exactly what copying them after each applied step (timm's ``exclude_buffers``)
would hold, without a second copy.

Sharded (``train.sharding: fsdp``): a parameter is a DTensor, and so is its average, with the same
placement: a rank holds 1/world of the EMA and updates its local shards without communicating.

Checkpoints carry the EMA model as ``model_ema.safetensors`` (or per-rank ``model_ema-shard<r>``
trees when sharded), a whole state dict that consumers load like ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from clipx.run_layout import EMA_SHARD, EMA_WEIGHTS, has_weights
from clipx.train.sharding import local_part
from clipx.train.state_io import fsync_file, save_tree
from clipx.weights import read_model_state


class ModelEma:
    """The moving average of ``model``'s trainable parameters (``model`` unwrapped, and already
    sharded if it is to be: the averages take the parameters' placement)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.names = [name for name, _ in trainable]
        # The parameter objects the optimizer updates: under FSDP the sharded DTensors, which a
        # forward pass swaps out of the modules while it runs.
        self.params = [param for _, param in trainable]
        with torch.no_grad():
            self.averages = [param.detach().float().clone() for param in self.params]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """Fold in the parameters as they are now, after an optimizer step; with ``applied`` (the
        guard's 0-dim bool), only if it is true, decided on the device (no host read)."""
        weight: float | torch.Tensor = 1.0 - self.decay
        if applied is not None:
            weight = applied.to(torch.float32) * weight  # 0 after a refused step: the average stays bitwise
        torch._foreach_lerp_([local_part(a) for a in self.averages],
                             [local_part(p).detach().float() for p in self.params], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> average (DTensors when sharded)."""
        return dict(zip(self.names, self.averages))

    def model_state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA model's state dict: ``weights`` (the model's own state dict) with every trainable
        parameter replaced by its average, in the parameter's dtype."""
        return {**weights, **{name: average.to(weights[name].dtype) for name, average in self.state_dict().items()}}

    @torch.no_grad()
    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the averages from an EMA model's whole state dict (as ``model_state`` saved it, from
        any number of ranks); each rank keeps its own rows when sharded."""
        for name, average in self.state_dict().items():
            value = state[name].reshape(average.shape).to(local_part(average).device, torch.float32)
            if isinstance(average, DTensor):  # every rank has the whole tensor: no scatter needed
                value = distribute_tensor(value, average.device_mesh, average.placements, src_data_rank=None)
            local_part(average).copy_(local_part(value))

    @contextlib.contextmanager
    def applied(self):
        """Context: the model's trainable parameters hold the averages (for evaluation); the trained
        values come back afterwards, bitwise."""
        _reshard(self.model)  # no gathered copy of the trained values may outlive the swap
        live = [local_part(p) for p in self.params]
        with torch.no_grad():
            trained = [t.clone() for t in live]
            torch._foreach_copy_(live, [local_part(a).to(t.dtype) for a, t in zip(self.averages, live)])
        try:
            yield self.model
        finally:
            _reshard(self.model)  # nor a gathered copy of the averages (a root kept gathered after forward)
            with torch.no_grad():
                torch._foreach_copy_(live, trained)


def _reshard(model: torch.nn.Module) -> None:
    """Free every FSDP unit's gathered parameters, so the next forward gathers the shards as they are."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def save_ema(folder: Path, rank: int, weights: dict, ema: ModelEma, sharded: bool, main: bool) -> None:
    """Write the EMA model beside the model: this rank's shards, or (rank 0) the whole file."""
    state = ema.model_state(weights)
    if sharded:
        save_tree(folder / EMA_SHARD.format(rank=rank), state)
    elif main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / EMA_WEIGHTS))
        fsync_file(folder / EMA_WEIGHTS)


def load_ema(checkpoint: Path, ema: ModelEma) -> bool:
    """Restore ``ema`` from ``checkpoint``; False when the checkpoint holds no EMA (its run had none)."""
    if not has_weights(checkpoint, "ema"):
        return False
    ema.load_model_state(read_model_state(checkpoint, "ema"))
    return True

"""A sharded model (``train.sharding: fsdp``) built without the whole model on every rank.

Every rank builds the model on the meta device (shapes, no storage), locks and prepares it, shards it
(``sharding.shard_model``) and only then allocates storage: its own rows of every parameter. What
goes into those rows must be exactly what an eager single-process build gives for the same seed,
because sharded runs are checked against DDP and one-process runs bitwise (tests/matrix/sharded.py,
tests/test_fsdp_init.py). Replaying each tower's random initialisation per shard would need every
library's init code re-run in the eager order, overwritten draws included; instead rank 0 runs the
eager build once (``reference``) and streams it, one tensor at a time, to every rank, which keeps its
rows (buffers whole: non-persistent ones such as the text tower's causal mask are not in any state
dict). The cost, stated: rank 0 holds one full fp32 copy of the model during the build, as every rank
did before; every other rank holds its shard plus one full tensor at a time (the largest one, a
token embedding, say). The random stream every rank goes on with (queues, dropout) is rank 0's after
its build, as if each rank had built the model itself.

Pretrained weights (``model.pretrained``) are read after that, shard by shard: each rank reads only its
rows of each tensor from the memory-mapped safetensors file (``models/pretrained.py:pretrained_rows``).

A method whose ``prepare`` reads the weights (``Method.prepare_reads_weights``: classification's
zero-shot head, from the pretrained text tower) cannot prepare a meta model: ``build_trainer`` keeps
the eager build on every rank for it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from clipx import dist
from clipx.models.lock import lock_towers
from clipx.models.pretrained import check_pretrained_fits, pretrained_rows
from clipx.train.sharding import scalars_to_vectors_, shard_model


def build_sharded_model(method, config, accelerator, eager: Callable[[], nn.Module]) -> nn.Module:
    """``method``'s model for ``config``, sharded over the processes with only each rank's rows
    materialised and equal to ``eager()``'s (the eager build, without pretrained weights), then
    ``model.pretrained`` loaded shard by shard."""
    tcfg = config.train
    rng = torch.get_rng_state()
    with torch.device("meta"):
        model = method.build_model(config)
    lock_towers(model, config.model)
    model = method.prepare(model, accelerator, config)
    if tcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = shard_model(model, tcfg, accelerator.device.type, accelerator.num_processes)
    # With CPU offload FSDP keeps the shards in host memory and wants them materialised there.
    model.to_empty(device="cpu" if tcfg.fsdp_cpu_offload else accelerator.device)
    torch.set_rng_state(rng)
    materialise_from_rank0(model, eager if dist.rank() == 0 else None, accelerator.device)
    if config.model.pretrained:
        load_pretrained_shards(model, config.model.pretrained, config.model.text_tower)
    return model


def materialise_from_rank0(model: nn.Module, eager: Callable[[], nn.Module] | None, device: torch.device) -> None:
    """Fill ``model`` (sharded, storage allocated) with the weights and buffers of rank 0's
    ``eager()`` model, one tensor at a time: each rank keeps its rows of a parameter, a buffer whole.
    Every rank then continues with rank 0's random stream after its build. The tensors travel on
    ``device``, the process group's (NCCL has no CPU tensors), whatever device the shards live on."""
    reference = _reference_tensors(eager()) if eager is not None else None
    for name, target in _tensors(model):
        full = reference.pop(name).to(device) if reference is not None else \
            torch.empty(target.shape, dtype=target.dtype, device=device)
        dist.broadcast_(full, src=0)
        with torch.no_grad():
            local = _local(target)
            local.copy_(full[own_rows(full.shape[0], target)] if isinstance(target, DTensor) else full)
    state = dist.broadcast_(torch.get_rng_state().to(device), src=0)
    torch.set_rng_state(state.cpu())


def _reference_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    scalars_to_vectors_(model)  # the sharded model's shapes
    return {name: t.detach() for name, t in _tensors(model)}


def _tensors(model: nn.Module):
    """Parameters and every buffer (non-persistent ones too), in one order on every rank."""
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def own_rows(rows: int, target: torch.Tensor) -> slice:
    """This rank's rows of a dim-0 sharded tensor of ``rows`` rows: FSDP2's split (``torch.chunk``,
    the last ranks possibly short or empty); plain tensors are whole."""
    if not isinstance(target, DTensor):
        return slice(0, rows)
    mesh = target.device_mesh
    size = math.ceil(rows / mesh.size()) if rows else 0
    start = min(mesh.get_local_rank() * size, rows)
    found = slice(start, min(start + size, rows))
    assert found.stop - found.start == target.to_local().shape[0], "FSDP2 split rows another way"
    return found


def load_pretrained_shards(model: nn.Module, path, text_tower: str) -> None:
    """``path``'s weights into the sharded ``model``, each rank reading only its rows of each tensor."""
    tensors = dict(_tensors(model))
    expected = {k: tensors[k] for k in model.clip_state_dict()}
    sources = check_pretrained_fits(pretrained_rows(path), {k: v.shape for k, v in expected.items()}, path,
                                    text_tower)
    with torch.no_grad():
        for name, source in sources.items():
            target = expected[name]
            if target.ndim == 0:  # a 0-dim buffer (BatchNorm's num_batches_tracked): whole on every rank
                _local(target).copy_(source.rows(0, 1).reshape(()))
                continue
            rows = own_rows(target.shape[0], target)
            # A stored 0-dim scalar is sharding's 1-element vector here (on one rank; empty on the others).
            part = source.rows(rows.start, rows.stop) if source.shape else source.rows(0, 1).reshape(1)[rows]
            _local(target).copy_(part)

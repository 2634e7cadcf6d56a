"""FSDP2 (``train.sharding: fsdp``): parameters, gradients and optimizer state sharded over the ranks.

clipx calls torch's ``fully_shard`` itself instead of going through Accelerate's FSDP plugin:
Accelerate enables that plugin only for GPU process groups and silently runs DDP on a CPU group,
while ``fully_shard`` runs on CPU tensors over gloo exactly as on GPUs over NCCL. Accelerate keeps
everything else: the process group, the device, autocast and the fp16 loss scaler.

Sharding units, innermost first (each unit all-gathers its parameters for its own forward and
backward, then frees them):
  0. every BatchNorm layer, kept in fp32 under a bf16/fp16 policy (its kernels want the weights in
     the dtype of its fp32 running statistics);
  1. every member of every ``nn.ModuleList`` (the transformer blocks of open_clip towers and of
     transformers text models);
  2. every direct child of the model that is itself made of modules (the towers, MoCo's momentum
     encoder), so that an objective may call such a child outside the model's own forward;
  3. the model itself, which keeps what is left (``logit_scale``, ``logit_bias``, single layers
     such as SwAV's prototypes, whose weight the model reads directly).

FSDP2 shards every parameter along dim 0 and refuses 0-dim parameters, so the scalars become
1-element vectors before sharding (``DualEncoder`` returns them as scalars whatever their shape);
checkpoint consolidation gives them their 0-dim shape back, so ``model.safetensors`` and exports
stay exactly open_clip's.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from clipx import dist
from clipx.compat.accelerate import set_grad_scaler
from clipx.compat.torch import is_batchnorm, scaler_overflow_flags
from clipx.errors import ClipxError
from clipx.run_layout import MODEL_SHARD
from clipx.train.state_io import load_tree, merge_shards, save_tree
from clipx.weights import read_sharded_model

# train.precision -> the dtype parameters are gathered in for compute; gradients are reduced in fp32.
PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_SHARD = "optimizer-shard{rank}"  # beside run_layout.MODEL_SHARD in a sharded checkpoint


def check_sharding(train_cfg, device_type: str) -> None:
    """Refuse, before any process starts, the sharding settings that cannot run."""
    if train_cfg.fsdp_cpu_offload and train_cfg.sharding != "fsdp":
        raise ClipxError("train.fsdp_cpu_offload needs train.sharding=fsdp")
    if train_cfg.fsdp_cpu_offload and device_type == "cpu":
        raise ClipxError("train.fsdp_cpu_offload keeps shards in host memory between uses on GPUs; on CPU "
                         "processes they are there already: drop it")
    if train_cfg.sharding == "fsdp" and train_cfg.compile is True:  # the default (false) leaves sharded runs uncompiled
        raise ClipxError("train.compile is not supported with train.sharding=fsdp yet; drop one of them")


def shard_model(model: nn.Module, train_cfg, device_type: str, world_size: int) -> nn.Module:
    """``model`` sharded in place over ``world_size`` ranks of ``device_type``; returns it.

    Build the optimizer afterwards: sharding replaces every parameter by a DTensor.
    """
    scalars_to_vectors_(model)
    if world_size == 1 and not torch.distributed.is_initialized():
        # One process started without a launcher (one GPU with train.fsdp_cpu_offload, say): Accelerate formed no
        # process group, and a device mesh needs one; a group of one needs no rendezvous.
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device_type, (world_size,))
    options = {"mesh": mesh, "reshard_after_forward": train_cfg.fsdp_reshard_after_forward,
               "mp_policy": MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[train_cfg.precision],
                                                 reduce_dtype=torch.float32),
               "offload_policy": CPUOffloadPolicy() if train_cfg.fsdp_cpu_offload else OffloadPolicy()}
    for norm in (m for m in model.modules() if is_batchnorm(m)):
        # BatchNorm's kernels want its weights in the dtype of its fp32 running statistics.
        fully_shard(norm, **{**options, "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32)})
    for unit in sharding_units(model):
        fully_shard(unit, **options)
    # The root's parameters are used in the last forward ops and the loss: keep them gathered.
    fully_shard(model, **{**options, "reshard_after_forward": False})
    return model


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """Blocks (members of ModuleLists), then the model's direct children built of modules."""
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList)
              for block in module if _has_parameters(block)]
    children = [child for child in model.children()
                if _has_parameters(child) and any(True for _ in child.children())]
    return blocks + [c for c in children if not any(c is b for b in blocks)]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def scalars_to_vectors_(model: nn.Module) -> None:
    """Replace 0-dim parameters by 1-element vectors (FSDP2 shards along dim 0)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync_off(model: nn.Module):
    """Context: a sharded model accumulates gradients locally (no reduce-scatter) until the last
    micro-batch, FSDP's counterpart of DDP's ``no_sync``.

    Units with nothing to train (a frozen tower, SigLIP 2's EMA teacher) are left syncing: they
    reduce no gradient anyway, and torch 2.14's post-backward, with the sync off, reads the gathered
    parameter of every unit, which a unit that has not run a forward yet (the teacher before its
    terms start) does not have."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and any(p.requires_grad for p in m.parameters())]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def use_sharded_scaler(accelerator, init_scale: float) -> None:
    """fp16 with sharded gradients: each rank unscales only its shards, so an overflow seen by one
    rank must skip the step (and back the scale off) on all of them. Replaces Accelerate's scaler
    before the optimizer is prepared (the prepared optimizer keeps the scaler it was given)."""
    set_grad_scaler(accelerator, SyncedGradScaler(accelerator.device.type, init_scale=init_scale))


class SyncedGradScaler(torch.amp.GradScaler):
    """A GradScaler whose overflow check is the same on every rank (the maximum over ranks).

    torch's FSDP1 ShardedGradScaler does the same, but keeps a 1-element flag that its fused AdamW
    (clipx's optimizer) cannot subtract from its 0-dim step counters; this keeps torch's 0-dim flag.
    """

    def unscale_(self, optimizer) -> None:
        super().unscale_(optimizer)
        for found_inf in scaler_overflow_flags(self, optimizer):
            dist.all_reduce_max_(found_inf)


def autocast_forward(model: nn.Module, accelerator) -> None:
    """Run ``model.forward`` under Accelerate's autocast, as ``accelerator.prepare`` does for the
    models it wraps (a sharded model is not handed to it). FSDP's own hooks stay outside."""
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_autocast(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = forward_in_autocast


# ---------------------------------------------------------------------------------------- checkpoints

def local_part(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return value.to_local() if isinstance(value, DTensor) else value


def save_shards(folder: Path, rank: int, weights: dict, model: nn.Module, optimizer) -> None:
    """Rank ``rank``'s shards of the model (``weights``, its state_dict) and of the optimizer state,
    as ``model-shard<rank>`` and ``optimizer-shard<rank>`` trees (clipx.train.state_io; no pickle).
    The optimizer state is keyed by parameter name, so any number of ranks can load it."""
    save_tree(folder / MODEL_SHARD.format(rank=rank), weights)
    save_tree(folder / OPTIMIZER_SHARD.format(rank=rank), get_optimizer_state_dict(model, _bare(optimizer)))


def load_shards(folder: Path, world_size: int, model: nn.Module, optimizer) -> None:
    """What ``save_shards`` wrote from ``world_size`` ranks, resharded over this run's ranks.

    Every rank reads all the shards and keeps its own rows: simple, and fine up to ViT-L sizes; far
    larger models on many ranks would want each rank to read only the rows it keeps."""
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, read_sharded_model(folder, world_size), options=whole)
    optimizer_state = merge_shards([load_tree(folder / OPTIMIZER_SHARD.format(rank=r)) for r in range(world_size)])
    set_optimizer_state_dict(model, _bare(optimizer), optimizer_state, options=whole)


def _bare(optimizer):
    """The torch optimizer inside Accelerate's wrapper: the state-dict API walks its param groups."""
    return getattr(optimizer, "optimizer", optimizer)

"""Collectives that are valid at world size 1 without any process group.

Losses call these instead of torch.distributed directly, so the same loss code runs in a unit test,
on one GPU, and across nodes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from clipx.errors import ClipxError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module")
        assert isinstance(inner, torch.nn.Module)
        model = inner
    return model


def full_tensor(x):
    """The whole tensor behind a sharded DTensor (FSDP; a collective every rank must call); any other
    value as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, to each rank, the sum over ranks of its slice's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss contributes to every slice
        return grad.chunk(world_size(), dim=0)[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradients flowing back to every rank's slice.

    (B, ...) -> (world_size * B, ...), ordered by rank. The backward pass sums the gradients that
    all ranks computed for a slice and returns them to the rank that owns it.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


@contextlib.contextmanager
def collective_timeout_guard(timeout_s: float):
    """Turn a collective that timed out into a one-line error naming this rank.

    A rank that stops calling collectives (a crash, a hang in its data) leaves the others waiting;
    the process group's timeout ends the wait, and this says which rank gave up and why.
    """
    try:
        yield
    except (RuntimeError, getattr(dist, "DistBackendError", RuntimeError)) as error:
        message = str(error)
        if "timeout" not in message.lower() and "timed out" not in message.lower():
            raise
        raise ClipxError(f"rank {rank()} of {world_size()}: a collective operation waited longer than "
                         f"{timeout_s:g} s (train.collective_timeout_s) for the other ranks; see their logs "
                         "for the rank that stopped") from None


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (tensors, lists, dicts), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def on_rank0(read):
    """``read()`` run by rank 0 only (one read of a remote store, not one per rank), its result
    broadcast to every rank; a ClipxError it raises is raised on every rank alike."""
    result = None
    if rank() == 0:
        try:
            result = read()
        except ClipxError as error:
            result = error
    result = broadcast_object(result)
    if isinstance(result, ClipxError):
        raise ClipxError(str(result))
    return result


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without autograd: (B, ...) -> (world_size * B, ...), in rank order."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op at world size 1); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_reduce_max_(x: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (a no-op at world size 1); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets rank ``src``'s ``x`` (a no-op at world size 1); returns ``x``."""
    if is_distributed():
        dist.broadcast(x, src)
    return x

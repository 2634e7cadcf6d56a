"""Nested training state (optimizer, scheduler, RNG, queues) as safetensors + JSON: nothing is pickled.

``save_tree(stem, tree)`` writes ``stem.safetensors`` (every tensor and NumPy array) and ``stem.json``
(the structure, with placeholders where tensors were). ``load_tree(stem)`` puts them back together.
A checkpoint from an untrusted source can therefore hold only numbers: loading it never runs code.

Sharded (FSDP) state: a DTensor is stored as this rank's local shard plus the global shape, and
loads as a ``LocalShard``; ``merge_shards`` joins the trees of all ranks into whole tensors (FSDP2
shards along dim 0, rank by rank), whatever number of ranks wrote them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

_TENSOR, _ARRAY, _TUPLE, _DICT, _SHARD = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__shard__"


class LocalShard(NamedTuple):
    """One rank's rows (dim 0) of a sharded tensor of ``shape``."""

    tensor: torch.Tensor
    shape: tuple[int, ...]


def save_tree(stem: Path, tree) -> list[Path]:
    """Write ``tree`` as ``stem.safetensors`` + ``stem.json`` (both fsynced); returns the two paths."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(tree, "t", tensors)
    tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(tensors, str(tensor_path))
    fsync_file(tensor_path)
    write_text_synced(json_path, json.dumps(structure))
    return [tensor_path, json_path]


def load_tree(stem: Path, device: str | torch.device = "cpu"):
    """The tree ``save_tree`` wrote (tensors on ``device``, NumPy arrays as arrays)."""
    tensors = load_file(str(stem.with_suffix(".safetensors")), device=str(device))
    return _join(json.loads(stem.with_suffix(".json").read_text()), tensors)


def _split(obj, key: str, tensors: dict):
    if isinstance(obj, DTensor):
        tensors[key] = obj.to_local().detach().cpu().contiguous().clone()
        return {_SHARD: key, "shape": list(obj.shape)}
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {_ARRAY: key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state is keyed by parameter index)
        return {_DICT: [[k, _split(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")


def _join(obj, tensors: dict):
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _SHARD in obj:
        return LocalShard(tensors[obj[_SHARD]], tuple(obj["shape"]))
    if _ARRAY in obj:
        return tensors[obj[_ARRAY]].cpu().numpy()
    if _TUPLE in obj:
        return tuple(_join(v, tensors) for v in obj[_TUPLE])
    return {k: _join(v, tensors) for k, v in obj[_DICT]}


def merge_shards(trees: list):
    """The trees of ranks 0..N-1 as one: every LocalShard joined with its peers into the whole tensor,
    everything else taken from rank 0 (it is the same on every rank)."""
    first = trees[0]
    if isinstance(first, LocalShard):
        whole = torch.cat([t.tensor for t in trees]) if first.shape else first.tensor
        if tuple(whole.shape) != first.shape:
            raise ValueError(f"shards of {len(trees)} ranks join to {tuple(whole.shape)}, not {first.shape}")
        return whole
    if isinstance(first, dict):
        return {k: merge_shards([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        merged = [merge_shards([t[i] for t in trees]) for i in range(len(first))]
        return type(first)(merged) if isinstance(first, tuple) else merged
    return first


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable (POSIX: fsync the directory itself)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())

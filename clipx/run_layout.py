"""Where a run keeps its checkpoints, and finding them: shared by training (which writes them) and
every consumer (which reads them). A leaf module: it imports nothing of clipx but its errors."""

from __future__ import annotations

import re
from pathlib import Path

from clipx.errors import ClipxError

CHECKPOINT_DIRNAME = "checkpoints"
MANIFEST = "manifest.json"  # written last: a checkpoint directory without it is incomplete
TMP_PREFIX = ".tmp-"
MODEL_WEIGHTS = "model.safetensors"  # the whole model (DDP runs, or consolidated from shards)
MODEL_SHARD = "model-shard{rank}"  # rank r's shards of the model (train.sharding=fsdp), a clipx.train.state_io tree
EMA_WEIGHTS = "model_ema.safetensors"  # the model with its EMA weights (train.ema_decay), whole
EMA_SHARD = "model_ema-shard{rank}"  # rank r's shards of the EMA model (train.sharding=fsdp)
# Which weights of a checkpoint: its whole file and its per-rank shard stem.
WEIGHT_FILES = {"raw": (MODEL_WEIGHTS, MODEL_SHARD), "ema": (EMA_WEIGHTS, EMA_SHARD)}
WEIGHT_CHOICES = ("auto", "ema", "raw")  # what --weights and load(weights=...) take; auto: ema when saved
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIRNAME / f"step-{step:09d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) in step order."""
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    if not folder.is_dir():
        return []
    steps = {p: int(m.group(1)) for p in folder.iterdir() if (m := _STEP_RE.match(p.name)) and (p / MANIFEST).is_file()}
    return sorted(steps, key=steps.__getitem__)


def as_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory; ClipxError otherwise."""
    path = Path(path)
    if (path / CHECKPOINT_DIRNAME).is_dir():
        checkpoints = list_checkpoints(path)
        if checkpoints:
            return checkpoints[-1]
    if not (path / "config.yaml").is_file() or not ((path / MODEL_WEIGHTS).is_file() or model_shards(path)):
        raise ClipxError(
            f"{path} is not a clipx checkpoint (expected config.yaml and model.safetensors or model shards, or a "
            "run directory with checkpoints/)"
        )
    return path


def model_shards(checkpoint: Path, weights: str = "raw") -> int:
    """How many ranks wrote the model shards of ``checkpoint`` (0: it holds none); ``weights``: raw or ema."""
    stem = WEIGHT_FILES[weights][1]
    count = 0
    while (checkpoint / f"{stem.format(rank=count)}.safetensors").is_file():
        count += 1
    return count


def has_weights(checkpoint: Path, weights: str) -> bool:
    """Whether ``checkpoint`` holds the ``weights`` (raw or ema) model, whole or as shards."""
    return (checkpoint / WEIGHT_FILES[weights][0]).is_file() or model_shards(checkpoint, weights) > 0

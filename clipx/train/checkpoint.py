"""Checkpoint directories: written atomically, verified on load, never unpickled.

Layout of ``<output_dir>/checkpoints/step-000000100/``:
  model.safetensors          the model's weights (what evaluators load)
  model_ema.safetensors      with train.ema_decay: the model with its EMA weights (clipx.train.ema)
  state.safetensors/.json    optimizer, LR scheduler and loss scaler (the same on every rank)
  model-shard<r>.*, optimizer-shard<r>.*, model_ema-shard<r>.*
                             with train.sharding=fsdp, instead of model.safetensors, the optimizer
                             in state.* and model_ema.safetensors: rank r's shards (clipx.train.sharding)
  rank<r>.safetensors/.json  rank r's RNG states, its objective's state (MoCo/SwAV queues) and its
                             loader workers' data positions
  config.yaml                the resolved config: rebuilds the model with no other file
  trainer_state.json         step, epoch, batches consumed, world size, attention kernel
  manifest.json              written last: the SHA-256 of every other file

A checkpoint is written into ``checkpoints/.tmp-step-.../``, every file fsynced, then renamed into
place: a crash at any moment leaves either no new checkpoint or a complete one, and only
directories with a manifest count. Old checkpoints are pruned after the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipx import dist
from clipx.config import Config, dump_config
from clipx.errors import ClipxError
from clipx.run_layout import CHECKPOINT_DIRNAME, MANIFEST, TMP_PREFIX, as_checkpoint, checkpoint_dir, list_checkpoints
from clipx.train.ema import ModelEma, load_ema, save_ema
from clipx.train.sharding import is_sharded, load_shards, local_part, save_shards
from clipx.train.state_io import fsync_dir, fsync_file, load_tree, save_tree, write_text_synced


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed on this rank
    epoch: int = 0
    world_size: int = 1  # processes that wrote the checkpoint: the sample order depends on it
    guard: dict = field(default_factory=dict)  # UpdateGuard's counters and running loss mean
    skips_by_epoch: dict = field(default_factory=dict)  # finished epochs' skipped inputs, summed over ranks
    # The attention kernel the run settled on: a resume continues with it rather than measuring
    # anew (AttentionKernel.resume_with). None in checkpoints from before it was saved.
    attention_kernel: str | None = None


@dataclass
class Stateful:
    """What a checkpoint saves and restores besides the counters."""

    model: torch.nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: object
    objective: object
    scaler: object | None = None
    data: object | None = None  # the data stream (its workers' positions)
    ema: ModelEma | None = None  # train.ema_decay's moving average


def save_checkpoint(accelerator, output_dir: str | Path, config: Config, state: TrainerState, parts: Stateful,
                    keep: int | None = None) -> Path:
    """Save everything needed to resume and to evaluate; every rank must call this."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    sharded = is_sharded(parts.model)
    weights = parts.model.state_dict()
    broken = nonfinite_tensors(weights, sharded)
    if broken:  # a checkpoint must never carry NaN or inf: resuming from it could only repeat the failure
        raise ClipxError(f"step {state.step}: {len(broken)} weight tensor(s) hold NaN or inf (first: {broken[0]}); "
                         "not saving. The last complete checkpoint is still usable")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    save_tree(tmp / f"rank{rank}", {"rng": rng_state(), "objective": parts.objective.state_dict(),
                                    "data": parts.data.state_dict() if parts.data is not None else {}})
    if sharded:
        save_shards(tmp, rank, weights, parts.model, parts.optimizer)
    if parts.ema is not None:
        save_ema(tmp, rank, weights, parts.ema, sharded, accelerator.is_main_process)
    if accelerator.is_main_process:
        if not sharded:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
            fsync_file(tmp / "model.safetensors")
        save_tree(tmp / "state", {"optimizer": None if sharded else parts.optimizer.state_dict(),
                                  "scheduler": parts.scheduler.state_dict(),
                                  "scaler": parts.scaler.state_dict() if parts.scaler is not None else None})
        dump_config(config, tmp / "config.yaml")
        fsync_file(tmp / "config.yaml")
        write_text_synced(tmp / "trainer_state.json", json.dumps(asdict(state)))
    accelerator.wait_for_everyone()  # every rank's files are on disk before the manifest vouches for them
    if accelerator.is_main_process:
        write_text_synced(tmp / MANIFEST, json.dumps({"step": state.step, "sha256": {
            p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}}, indent=1))
        fsync_dir(tmp)
        if final.exists():  # the same step saved again after an earlier resume: the new one wins
            discard(final)
        tmp.rename(final)
        fsync_dir(final.parent)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                discard(old)
    accelerator.wait_for_everyone()
    return final


def nonfinite_tensors(weights: dict, sharded: bool) -> list[str]:
    """Names of floating-point tensors holding NaN or inf. Sharded: every rank checks its shards and
    learns the others' count, so that all ranks refuse the save together."""
    local = [name for name, value in weights.items()
             if value.is_floating_point() and not torch.isfinite(local_part(value)).all()]
    if not sharded:
        return local
    total = int(dist.all_reduce_sum_(torch.tensor([float(len(local))])).item())
    return local if local else ["(on another rank)"] * total


def discard(checkpoint: Path) -> None:
    """Delete a checkpoint so that no crash can leave it half deleted yet still listed: first rename
    it out of the listing (atomic), then remove the files."""
    trash = checkpoint.with_name(f"{TMP_PREFIX}discard-{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    checkpoint.rename(trash)
    fsync_dir(checkpoint.parent)
    shutil.rmtree(trash)


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete what an interrupted save left behind (``.tmp-*`` directories); returns what went."""
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    stray = sorted(folder.glob(TMP_PREFIX + "*")) if folder.is_dir() else []
    for path in stray:
        shutil.rmtree(path, ignore_errors=True)
    return stray


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint under output_dir, or None when there is none yet
    (so one job script serves the first submission and every requeue); otherwise ``resume`` is a
    checkpoint path, which must be complete."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = as_checkpoint(resume)
    if not (path / MANIFEST).is_file():
        raise ClipxError(f"--resume {resume}: {path} has no {MANIFEST}, so it is not a complete training checkpoint")
    return path


def verify_checkpoint(path: Path) -> dict:
    """The manifest of ``path`` after checking every file it lists; ClipxError naming the first bad one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ClipxError(f"{path}/{MANIFEST} is missing or damaged ({error}); resume from another checkpoint") from None
    for name, digest in expected.items():
        file = path / name
        if not file.is_file() or file_digest(file) != digest:
            raise ClipxError(f"{file} is missing or does not match its checksum in {MANIFEST}; the checkpoint is "
                             "damaged: resume from another one")
    return manifest


def load_trainer_state(path: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ClipxError(f"{path}/trainer_state.json is damaged ({error}); resume from another checkpoint") from None


def load_training_state(accelerator, path: Path, parts: Stateful) -> TrainerState:
    """Restore what ``save_checkpoint`` wrote, after verifying every file against the manifest."""
    verify_checkpoint(path)
    state = load_trainer_state(path)
    elastic = state.world_size != accelerator.num_processes
    missing = [r for r in range(state.world_size) if not (path / f"rank{r}.json").is_file()]
    if missing:
        raise ClipxError(f"{path} was written by {state.world_size} process(es) but holds no state of rank "
                         f"{missing[0]}; resume from a complete checkpoint")
    try:
        # Read onto the host: load_state_dict copies into the parameters wherever they live, and
        # safetensors refuses device strings such as "cpu:0" that Accelerate can report.
        shared = load_tree(path / "state")
        if is_sharded(parts.model):
            load_shards(path, state.world_size, parts.model, parts.optimizer)
        else:
            parts.model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
            parts.optimizer.load_state_dict(shared["optimizer"])
        parts.scheduler.load_state_dict(shared["scheduler"])
        if parts.ema is not None and not load_ema(path, parts.ema):
            accelerator.print(f"{path} holds no EMA weights: train.ema_decay averages from the resumed weights on")
        if parts.scaler is not None and shared["scaler"] is not None:
            parts.scaler.load_state_dict(shared["scaler"])
        # Another number of processes: rank r takes old rank r mod N's objective state (queues) and
        # the data stream continues the epoch from every old rank's positions (clipx.train.elastic).
        mine = load_tree(path / f"rank{accelerator.process_index % state.world_size}")  # queues copy_ onto their device
        parts.objective.load_state_dict(mine["objective"])
        # Another number of processes, loader workers, shuffle buffer or batch size: the positions
        # no longer fit this run's data stream, which then finishes the epoch from all of them.
        split = parts.data is not None and (elastic or parts.data.needs_elastic(mine.get("data", {})))
        if split:
            parts.data.load_elastic([load_tree(path / f"rank{r}").get("data", {}) for r in range(state.world_size)])
        elif parts.data is not None:
            parts.data.load_state_dict(mine.get("data", {}))
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError, json.JSONDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipxError(f"cannot resume from {path}: {first_line} (was it written by a different model, "
                         "optimizer or objective config?)") from None
    if elastic:  # each new rank its own random stream, from the run's seed and the step
        seed_everything_for(config_seed(path), state.step, accelerator.process_index)
    else:
        set_rng_state(mine["rng"])
    state.world_size = accelerator.num_processes
    return state


def config_seed(path: Path) -> int:
    import yaml

    return int(yaml.safe_load((path / "config.yaml").read_text())["train"]["seed"])


def seed_everything_for(seed: int, step: int, rank: int) -> None:
    value = hash((seed, step, rank)) & 0x7FFF_FFFF
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_state() -> dict:
    """Every random stream training draws from: Python, NumPy, torch CPU and CUDA."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

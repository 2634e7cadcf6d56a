"""Checkpoint directories: Accelerate's training state + the resolved config + trainer counters.

Layout of ``<output_dir>/checkpoints/step-000000100/``:
  model.safetensors          DualEncoder weights (what evaluators load)
  optimizer.bin, scheduler.bin, random_states_*.pkl, ...   accelerator.save_state
  objective_state_<rank>.safetensors   the objective's own state (MoCo/SwAV queues), one per rank
  config.yaml                the resolved config: rebuilds the model with no other file
  trainer_state.json         step, epoch, batches consumed (written last: marks the checkpoint complete)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipx.config import Config, dump_config, load_config
from clipx.errors import ClipxError

CHECKPOINT_DIRNAME = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed on this rank
    epoch: int = 0


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIRNAME / f"step-{step:09d}"


def objective_state_file(path: Path, rank: int) -> Path:
    return path / f"objective_state_{rank}.safetensors"


def save_checkpoint(accelerator, output_dir: str | Path, config: Config, state: TrainerState, objective) -> Path:
    """Save everything needed to resume and to evaluate; every rank must call this."""
    path = checkpoint_dir(output_dir, state.step)
    accelerator.save_state(str(path))
    objective_state = objective.state_dict()
    if objective_state:
        save_file({k: v.contiguous() for k, v in objective_state.items()},
                  str(objective_state_file(path, accelerator.process_index)))
    accelerator.wait_for_everyone()  # every rank's files exist before the completion marker
    if accelerator.is_main_process:
        dump_config(config, path / "config.yaml")
        (path / "trainer_state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json is written last) in step order."""
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint under output_dir, or None when there is none yet
    (so one job script serves the first submission and every requeue); otherwise ``resume`` is a
    checkpoint path, which must exist."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = as_checkpoint(resume)
    if not (path / "trainer_state.json").is_file():
        raise ClipxError(f"--resume {resume}: {path} has no trainer_state.json, so it is not a complete "
                         "training checkpoint")
    return path


def load_trainer_state(path: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ClipxError(f"{path}/trainer_state.json is damaged ({error}); resume from another checkpoint") from None


def load_training_state(accelerator, path: Path, objective) -> TrainerState:
    """Restore model, optimizer, scheduler, RNG and objective states saved by ``save_checkpoint``."""
    state = load_trainer_state(path)
    if objective.state_dict():
        file = objective_state_file(path, accelerator.process_index)
        if not file.is_file():
            raise ClipxError(f"cannot resume from {path}: it has no {file.name} (was it written by fewer "
                             "processes, or another objective?)")
        objective.load_state_dict(load_file(str(file), device=str(accelerator.device)))
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipxError(f"cannot resume from {path}: {first_line} (was it written by a different model "
                         "or optimizer config?)") from None
    return state


def as_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory; ClipxError otherwise."""
    path = Path(path)
    if (path / CHECKPOINT_DIRNAME).is_dir():
        checkpoints = list_checkpoints(path)
        if checkpoints:
            return checkpoints[-1]
    if not (path / "config.yaml").is_file() or not (path / "model.safetensors").is_file():
        raise ClipxError(
            f"{path} is not a clipx checkpoint (expected config.yaml and model.safetensors, or a run directory "
            "with checkpoints/)"
        )
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) from a checkpoint directory, built from its own config.yaml alone."""
    from clipx.objectives import build_model

    path = as_checkpoint(path)
    config = load_config(path / "config.yaml")
    model = build_model(config)
    try:
        weights = load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ClipxError(f"{path}/model.safetensors cannot be read: {str(error).splitlines()[0]}") from None
    # DDP-wrapped models can save with a "module." prefix.
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ClipxError(f"{path}/model.safetensors does not match its config.yaml: {detail}") from None
    return model.to(device).eval(), config

"""Objective: the one thing that differs between training methods.

The training loop only does ``out = objective(batch)``, backpropagates ``out["loss"]``, asks the
update guard, steps the optimizer if the guard agrees, and calls ``objective.end_step(...)``; it
never asks which method it runs. Objectives whose loss couples samples across the batch split
``__call__`` into ``features`` and ``loss_from_features``, which lets the loop cache features across
micro-batches (GradCache).

Per-step state (queues, prototypes, momentum encoders, counters) changes only when a step's update
is applied. ``loss_from_features`` may *stage* what a step would store (``self.stage``); ``after_step``
commits it, and runs only for accepted steps. Whatever was staged is dropped at the end of every
step, so a refused step (non-finite, a loss spike, an fp16 overflow) leaves no trace.
"""

from __future__ import annotations

import torch


class Objective:
    """Model + loss. Subclasses implement ``features`` and ``loss_from_features``."""

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch -> named tensors: per-sample ones with a leading batch dim, and 0-dim scalars."""
        raise NotImplementedError

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        """features (of one or several micro-batches, concatenated) -> {"loss": scalar, "metrics": {...}}."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        return self.loss_from_features(self.features(batch))

    def stage(self, name: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (detached) for ``after_step`` of this step; dropped if the step is refused."""
        self.__dict__.setdefault("_staged", {}).setdefault(name, []).append(tensor.detach())

    def staged(self, name: str) -> list[torch.Tensor]:
        """What this step staged under ``name``, in staging order (one entry per loss evaluation)."""
        return self.__dict__.get("_staged", {}).get(name, [])

    def end_step(self, step: int, total_steps: int, accepted: bool) -> None:
        """Called by the loop once per optimizer step, after the update decision."""
        try:
            if accepted:
                self.after_step(step, total_steps)
        finally:
            self.__dict__.pop("_staged", None)

    def after_step(self, step: int, total_steps: int) -> None:
        """Runs after optimizer step number ``step`` (1-based) of ``total_steps`` was applied:
        momentum encoders and queues update here, never inside forward."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Training state outside the model (queues, counters) that a checkpoint must carry, as
        tensors; each rank saves its own."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""

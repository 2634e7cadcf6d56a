"""Objective: the one thing that differs between training methods.

The training loop only does ``out = objective(batch)``, backpropagates ``out["loss"]``, steps the
optimizer, and calls ``objective.after_step(step, total_steps)``; it never asks which method it runs. Objectives
whose loss couples samples across the batch split ``__call__`` into ``features`` and
``loss_from_features``, which lets the loop cache features across micro-batches (GradCache).
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

    def after_step(self, step: int, total_steps: int) -> None:
        """Runs after optimizer step number ``step`` (1-based) of ``total_steps``: momentum encoders
        and queues update here, never inside forward."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Training state outside the model (queues, counters) that a checkpoint must carry, as
        tensors; each rank saves its own."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters the optimizer updates."""
        raise NotImplementedError

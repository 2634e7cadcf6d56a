"""Objective: the one thing that differs between training methods.

The training loop only does ``out = objective(batch)``, backpropagates ``out["loss"]``, steps the
optimizer, and calls ``objective.after_step()``; it never asks which method it runs.
"""

from __future__ import annotations

import torch


class Objective:
    """Model + loss. Subclasses implement ``__call__`` and may override ``after_step``."""

    def __call__(self, batch: dict) -> dict:
        """batch (on device) -> {"loss": scalar tensor, "metrics": {name: scalar tensor}}."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Runs after every optimizer step (momentum encoders update here, never inside forward)."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters the optimizer updates."""
        raise NotImplementedError

"""FLIP's patch dropout over a run: the configured rate, then every patch for the last steps.

The dropping itself is open_clip's ``PatchDropout`` (built into the ViT by ``towers.py``; active
in training mode only). What FLIP adds is the schedule: after masked pre-training, a short
"unmasked tuning" phase trains on all patches so the model meets at training time the full token
sequences it will see at evaluation. The rate is a function of the step alone, so a resumed run
drops exactly what the unbroken run dropped (the random draws come from the checkpointed RNG).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn
from open_clip.transformer import PatchDropout


class PatchDropoutSchedule:
    """Sets every ``PatchDropout`` of a model to ``rate``, or to 0 in the last ``unmasked_steps`` steps."""

    def __init__(self, model: nn.Module, rate: float, unmasked_steps: int):
        self.layers = [m for m in model.modules() if isinstance(m, PatchDropout)]
        self.rate, self.unmasked_steps = rate, unmasked_steps

    def rate_at(self, step: int, total_steps: int) -> float:
        """The dropout rate of optimizer step ``step`` (1-based) of ``total_steps``."""
        return 0.0 if step > total_steps - self.unmasked_steps else self.rate

    def before_step(self, step: int, total_steps: int) -> None:
        self._set(self.rate_at(step, total_steps))

    def _set(self, rate: float) -> None:
        for layer in self.layers:
            layer.prob = rate

    @contextlib.contextmanager
    def masked(self) -> Iterator[None]:
        """The configured rate inside, whatever the step; the current one restored after. The run's
        attention kernel is chosen on the masked phase's sequence lengths inside this, so a run
        resumed in the unmasked phase chooses what the unbroken run chose."""
        current = self.layers[0].prob if self.layers else self.rate  # before_step sets one rate for all
        self._set(self.rate)
        try:
            yield
        finally:
            self._set(current)

"""A fixed-size ring buffer of feature vectors (MoCo's negatives, SwAV's stored embeddings)."""

from __future__ import annotations

import torch


class FeatureQueue:
    """``size`` rows of ``dim`` features; ``enqueue`` overwrites the oldest rows in order.

    ``filled`` counts rows written so far (capped at ``size``), so a consumer can wait until the
    queue holds only real features.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", init: torch.Tensor | None = None):
        self.features = init.clone().to(device) if init is not None else torch.zeros(size, dim, device=device)
        self.pointer = 0
        self.filled = size if init is not None else 0

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write ``rows`` (N, dim) at the pointer, wrapping around; N must not exceed the size."""
        count = rows.shape[0]
        if count > self.size:
            raise ValueError(f"cannot enqueue {count} rows into a queue of {self.size}")
        end = self.pointer + count
        first = min(end, self.size) - self.pointer
        self.features[self.pointer:self.pointer + first] = rows[:first].to(self.features.dtype)
        if first < count:  # wrap around to the start
            self.features[:count - first] = rows[first:].to(self.features.dtype)
        self.pointer = end % self.size
        self.filled = min(self.size, self.filled + count)

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.features": self.features.detach().cpu().clone(),
                f"{prefix}.pointer": torch.tensor(self.pointer), f"{prefix}.filled": torch.tensor(self.filled)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        features = state[f"{prefix}.features"]
        if features.shape != self.features.shape:
            raise ValueError(f"queue {prefix} has shape {tuple(features.shape)} in the checkpoint, "
                             f"{tuple(self.features.shape)} in this config")
        self.features.copy_(features)
        self.pointer, self.filled = int(state[f"{prefix}.pointer"]), int(state[f"{prefix}.filled"])

"""Samples per second of a run, over training time only."""

from __future__ import annotations

import contextlib
import time


class Throughput:
    """Samples per second over training time only: evaluation and checkpoint pauses are excluded."""

    def __init__(self, samples_per_step: int, step: int):
        self.samples_per_step = samples_per_step
        self.start = self.window_start = time.perf_counter()
        self.window_step = step
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        pause = time.perf_counter() - began
        self.paused_seconds += pause
        self.window_start += pause

    def window_rate(self, step: int) -> float:
        """Rate since the previous call, then start a new window."""
        now = time.perf_counter()
        rate = (step - self.window_step) * self.samples_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        return rate

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return self.wall_seconds() - self.paused_seconds

"""Guards that every rank evaluates together: preemption signals and non-finite steps.

Each decision is all-reduced, so all ranks stop at the same step or skip the same update; a rank
that decided alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from clipx import dist
from clipx.errors import ClipxError

# Exit status of a run that saved a checkpoint because it was asked to stop (SIGTERM/SIGINT);
# EX_TEMPFAIL: "try again later", which is what `--resume latest` does.
EXIT_PREEMPTED = 75


def any_rank(flag: bool, device) -> bool:
    """True when ``flag`` is true on at least one rank (no collective at world size 1)."""
    if not dist.is_distributed():
        return flag
    return bool(dist.all_reduce_max_(torch.tensor([float(flag)], device=device)).item())


class StopRequest:
    """SIGTERM or SIGINT set a flag that the loop reads at step boundaries.

    After the signal the process has ``grace_s`` seconds: if saving takes longer, a watchdog exits
    with EXIT_PREEMPTED anyway (the previous complete checkpoint is still there), so the job never
    outstays a scheduler's kill deadline. A second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name
            watchdog = threading.Timer(self.grace_s, os._exit, args=(EXIT_PREEMPTED,))
            watchdog.daemon = True
            watchdog.start()

    def agreed(self, device) -> bool:
        """Whether any rank has received a stop signal."""
        return any_rank(self.received is not None, device)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm was not finite on some rank; those steps apply no
    update. ``limit`` consecutive ones stop the run with a message naming the step."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.total = 0

    def allows_update(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        # One device-side flag and one host read per step (after the all-reduce, if any).
        broken = (~(torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm).all())).float().reshape(1)
        if not bool(dist.all_reduce_max_(broken).item()):
            self.streak = 0
            return True
        self.streak += 1
        self.total += 1
        if self.streak >= self.limit:
            raise ClipxError(f"step {step}: the loss or gradient norm was not finite on some rank for {self.streak} "
                             f"consecutive steps (train.max_nonfinite_steps), so no update was applied; lower "
                             "train.lr, set train.grad_clip_norm, or look for broken samples")
        return False

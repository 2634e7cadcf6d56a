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


class UpdateGuard:
    """Decides, identically on every rank, whether a step's update may be applied.

    A step is refused when its loss or gradient norm is not finite on some rank, or (with
    ``spike_factor``) when the loss averaged over ranks exceeds ``spike_factor`` times the running
    mean of accepted losses, once ``spike_warmup`` steps have been accepted. Refused steps apply no
    update and are counted; ``limit`` refused steps in a row stop the run with a message naming the
    step. The running mean is the same on every rank (it follows the rank-averaged loss) and
    travels in checkpoints, so a resumed run makes the same decisions.

    Under fp16 a finite loss with non-finite gradients while the loss scale is at least 1 is an
    *overflow*: the loss scaler's business (it halves the scale and the step is retried on the next
    batch), routine in the first steps at scale 65536. Overflows are refused and counted apart; they
    do not count towards ``limit``. Below scale 1 the gradients are non-finite on their own account.
    """

    EMA_DECAY = 0.98  # a running mean over roughly the last 50 accepted steps

    def __init__(self, limit: int, spike_factor: float | None = None, spike_warmup: int = 100):
        self.limit, self.spike_factor, self.spike_warmup = limit, spike_factor, spike_warmup
        self.streak = 0
        self.nonfinite = 0  # refused steps, by cause
        self.spikes = 0
        self.overflows = 0
        self.accepted = 0
        self.loss_mean = 0.0  # EMA of accepted rank-averaged losses (bias-corrected when read)

    def allows_update(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
                      loss_scale: float | None = None) -> bool:
        """Whether step ``step`` may apply its update; ``loss_scale`` is the fp16 scaler's scale, if any."""
        loss = loss.detach().float().reshape(())
        bad_loss = (~torch.isfinite(loss)).float()
        bad_grad = (~torch.isfinite(grad_norm.detach()).all()).float()
        # One all-reduce and one host read per step: [ranks with a bad loss, with bad gradients, loss sum].
        summed = dist.all_reduce_sum_(torch.stack([bad_loss, bad_grad, loss]))
        bad_losses, bad_grads, loss_sum = summed.tolist()
        if bad_losses == 0 and bad_grads > 0 and loss_scale is not None and loss_scale >= 1.0:
            self.overflows += 1
            return False
        if bad_losses > 0 or bad_grads > 0:
            self.nonfinite += 1
            return self._refuse(step, "the loss or gradient norm was not finite on some rank")
        mean_loss = loss_sum / dist.world_size()
        if self._is_spike(mean_loss):
            self.spikes += 1
            return self._refuse(step, f"the loss spiked above {self.spike_factor} x its running mean "
                                      f"{self.running_mean():.4g} (train.loss_spike_factor)")
        self.streak = 0
        self.accepted += 1
        self.loss_mean = self.EMA_DECAY * self.loss_mean + (1 - self.EMA_DECAY) * mean_loss
        return True

    def running_mean(self) -> float:
        return self.loss_mean / (1 - self.EMA_DECAY ** self.accepted) if self.accepted else float("nan")

    def _is_spike(self, loss: float) -> bool:
        return (self.spike_factor is not None and self.accepted >= self.spike_warmup
                and loss > self.spike_factor * self.running_mean())

    def _refuse(self, step: int, why: str) -> bool:
        self.streak += 1
        if self.streak >= self.limit:
            raise ClipxError(f"step {step}: {why}; {self.streak} consecutive steps applied no update "
                             "(train.max_nonfinite_steps), so the run stops. Lower train.lr, set "
                             "train.grad_clip_norm, or look for broken samples")
        return False

    @property
    def refused(self) -> int:
        return self.nonfinite + self.spikes + self.overflows

    def state_dict(self) -> dict:
        return {"streak": self.streak, "nonfinite": self.nonfinite, "spikes": self.spikes,
                "overflows": self.overflows, "accepted": self.accepted, "loss_mean": self.loss_mean}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

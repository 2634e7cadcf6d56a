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

# Exit status of a run that saved a checkpoint because it was asked to stop (SIGTERM/SIGINT/SIGUSR1);
# EX_TEMPFAIL: "try again later", which is what `--resume latest` does.
EXIT_PREEMPTED = 75


class StopRequest:
    """SIGTERM, SIGINT or SIGUSR1 set a flag that the loop reads at step boundaries.

    SIGUSR1 is what SLURM sends ahead of a job's time limit when asked to (``--signal=USR1@120``):
    the run saves and exits with EXIT_PREEMPTED as on SIGTERM, and the job script requeues it.

    After the signal the process has ``grace_s`` seconds: if saving takes longer, a watchdog exits
    with EXIT_PREEMPTED anyway (the previous complete checkpoint is still there), so the job never
    outstays a scheduler's kill deadline. A second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received: str | None = None
        self._previous = {}
        self._lagged: LaggedRead | None = None  # the ranks' flags of the previous call, when distributed
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
        """Whether any rank had received a stop signal by the previous call.

        Across ranks the answer is one call late: each call all-reduces this rank's flag and reads
        the previous call's result, which the device has finished long ago, so no step waits for
        the collective on a GPU, and every rank still stops at the same step. Alone, at once."""
        if not dist.is_distributed():
            return self.received is not None
        if self._lagged is None:
            self._lagged = LaggedRead(device)
        # torch.full fills on the device; torch.tensor(..., device=...) would copy from the host and, on
        # a GPU, wait for the queued step at every call.
        flag = torch.full((1,), float(self.received is not None), device=device)
        self._lagged.post(dist.all_reduce_max_(flag))
        earlier = self._lagged.read()
        return earlier is not None and earlier[0] > 0

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Verdict:
    """Whether one step's update may be applied, as a 0-dim bool tensor on the device.

    Everything the loop does with a verdict (the optimizer step, the EMA, putting BatchNorm
    statistics back, the objective's end of step) can take ``applied`` as a tensor, so on a GPU the
    step never waits for the device to say whether the step was good. ``bool(verdict)`` reads it on
    the host: a device sync, for the few consumers that must branch in Python.
    """

    def __init__(self, applied: torch.Tensor, known: bool | None = None):
        self.applied = applied
        self._known = known

    def __bool__(self) -> bool:
        if self._known is None:
            self._known = bool(self.applied.item())
        return self._known


def _counter(name: str) -> property:
    """A read-only property: UpdateGuard's counter ``name`` read on the host."""
    return property(lambda guard: int(guard.counts[guard.COUNTERS.index(name)]))


class UpdateGuard:
    """Decides, identically on every rank, whether a step's update may be applied.

    A step is refused when its loss or gradient norm is not finite on some rank, or (with
    ``spike_factor``) when the loss averaged over ranks exceeds ``spike_factor`` times the running
    mean of accepted losses, once ``spike_warmup`` steps have been accepted. Refused steps apply no
    update and are counted; ``limit`` refused steps in a row stop the run with a message naming the
    step. The running mean is the same on every rank (it follows the rank-averaged loss) and
    travels in checkpoints, so a resumed run makes the same decisions.

    The decision and every counter live on the device and are never read inside a step: ``judge``
    returns a ``Verdict`` tensor. Whether the run must stop is read one step late (``check``): by
    the time step N+1 has been queued, step N's counters are on the host without stalling the
    device, and every rank reads the same step's counters, so all stop at the same step.

    Under fp16 a finite loss with non-finite gradients while the loss scale is at least 1 is an
    *overflow*: the loss scaler's business (it halves the scale and the step is retried on the next
    batch), routine in the first steps at scale 65536. Overflows are refused and counted apart; they
    do not count towards ``limit``. Below scale 1 the gradients are non-finite on their own account.
    """

    EMA_DECAY = 0.98  # a running mean over roughly the last 50 accepted steps
    COUNTERS = ("streak", "nonfinite", "spikes", "overflows", "accepted", "limit_step", "limit_cause")
    CAUSES = {1: "the loss or gradient norm was not finite on some rank",
              2: "the loss spiked above {factor} x its running mean {mean:.4g} (train.loss_spike_factor)"}

    def __init__(self, limit: int, spike_factor: float | None = None, spike_warmup: int = 100):
        self.limit, self.spike_factor, self.spike_warmup = limit, spike_factor, spike_warmup
        # COUNTERS; limit_step: the step at which ``limit`` refusals in a row were reached (0: not
        # yet), limit_cause: that step's refusal (a key of CAUSES).
        self.counts = torch.zeros(len(self.COUNTERS), dtype=torch.int64)
        self.loss_mean = torch.zeros((), dtype=torch.float32)  # EMA of accepted rank-averaged losses
        self.posted: LaggedRead | None = None

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
              loss_scale: float | None = None) -> Verdict:
        """Step ``step``'s verdict; ``loss_scale`` is the fp16 scaler's scale, if any."""
        device = loss.device
        if self.counts.device != device:
            self.counts, self.loss_mean = self.counts.to(device), self.loss_mean.to(device)
        loss = loss.detach().float().reshape(())
        bad_loss = (~torch.isfinite(loss)).float()
        bad_grad = (~torch.isfinite(grad_norm.detach()).all()).float()
        # One all-reduce per step: [ranks with a bad loss, with bad gradients, loss sum].
        bad_losses, bad_grads, loss_sum = dist.all_reduce_sum_(torch.stack([bad_loss, bad_grad, loss])).unbind()
        finite = (bad_losses == 0) & (bad_grads == 0)
        overflow = (bad_losses == 0) & (bad_grads > 0) & (loss_scale is not None and loss_scale >= 1.0)
        nonfinite = ~finite & ~overflow
        mean_loss = loss_sum / dist.world_size()
        spike = finite & self._is_spike(mean_loss)
        applied = finite & ~spike
        streak, nonfinites, spikes, overflows, accepted, limit_step, limit_cause = self.counts.unbind()
        refused = nonfinite | spike  # overflows neither count towards the limit nor end a streak
        streak = torch.where(applied, 0, streak + refused.long())
        reached = (limit_step == 0) & (streak >= self.limit)
        self.counts = torch.stack([  # in the order of COUNTERS
            streak, nonfinites + nonfinite.long(), spikes + spike.long(), overflows + overflow.long(),
            accepted + applied.long(), torch.where(reached, step, limit_step),
            torch.where(reached, 1 + spike.long(), limit_cause)])
        decay = self.EMA_DECAY
        self.loss_mean = torch.where(applied, decay * self.loss_mean + (1 - decay) * mean_loss, self.loss_mean)
        # Under fp16 the scaler has synced already (its scale was read): knowing the verdict costs nothing.
        return Verdict(applied, known=bool(applied.item()) if loss_scale is not None else None)

    def post(self) -> None:
        """Start copying this step's counters to the host, for ``check`` at the next step."""
        if self.posted is None:
            self.posted = LaggedRead(self.counts.device)
        self.posted.post(self.counts)

    def check(self, current: bool = False) -> None:
        """Stop the run (ClipxError) if the counters posted one step ago show ``limit`` refusals in a row;
        with ``current``, post and read the latest counters now (before a checkpoint is written, so
        none holds a run that had to stop)."""
        if current:
            self.post()
        read = self.posted.read(latest=current) if self.posted is not None else None
        if read is None:
            return
        counts = dict(zip(self.COUNTERS, read))
        if counts["limit_step"]:
            why = self.CAUSES[counts["limit_cause"]].format(factor=self.spike_factor, mean=self.running_mean())
            raise ClipxError(f"step {counts['limit_step']}: {why}; {self.limit} consecutive steps applied no update "
                             "(train.max_nonfinite_steps), so the run stops. Lower train.lr, set "
                             "train.grad_clip_norm, or look for broken samples")

    def _is_spike(self, loss: torch.Tensor) -> torch.Tensor:
        if self.spike_factor is None:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        accepted = self.counts[self.COUNTERS.index("accepted")]
        mean = self.loss_mean / (1 - self.EMA_DECAY ** accepted.float()).clamp_min(1e-12)
        return (accepted >= self.spike_warmup) & (loss > self.spike_factor * mean)

    def running_mean(self) -> float:
        """The bias-corrected running mean of accepted losses (a host read)."""
        accepted = self.accepted
        return float(self.loss_mean) / (1 - self.EMA_DECAY ** accepted) if accepted else float("nan")

    # The counters, each a host read (a device sync): for logs, summaries and tests, not for steps.
    nonfinite = _counter("nonfinite")
    spikes = _counter("spikes")
    overflows = _counter("overflows")
    accepted = _counter("accepted")

    @property
    def refused(self) -> int:
        return self.nonfinite + self.spikes + self.overflows

    def state_dict(self) -> dict:
        return {**dict(zip(self.COUNTERS, self.counts.tolist())), "loss_mean": float(self.loss_mean)}

    def load_state_dict(self, state: dict) -> None:
        device = self.counts.device
        self.counts = torch.tensor([int(state.get(name, 0)) for name in self.COUNTERS], dtype=torch.int64,
                                   device=device)
        self.loss_mean = torch.tensor(float(state["loss_mean"]), dtype=torch.float32, device=device)


class LaggedRead:
    """A device tensor posted at every step and read on the host one step later, without stalling.

    ``post`` starts an asynchronous copy into pinned host memory and records an event; ``read``
    gives the post before the latest one, whose event the device passed long ago while the latest
    step was being queued behind it, so waiting for it costs nothing. Two host buffers take turns.
    On the CPU every copy is immediate.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.slots: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # the last two posts, oldest first

    def post(self, value: torch.Tensor) -> None:
        cuda = self.device.type == "cuda"
        host = (self.slots.pop(0)[0] if len(self.slots) == 2
                else torch.empty(value.shape, dtype=value.dtype, pin_memory=cuda))
        host.copy_(value.detach(), non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        self.slots.append((host, done))

    def read(self, latest: bool = False) -> list | None:
        """The values of the post before the latest one (None before the second post); with
        ``latest``, of the latest post, waiting for the device to finish it."""
        if len(self.slots) < (1 if latest else 2):
            return None
        host, done = self.slots[-1 if latest else -2]
        if done is not None:
            done.synchronize()
        return host.tolist()

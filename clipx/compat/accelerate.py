"""Accelerate's process-wide state and the Accelerator attributes clipx writes.

Accelerate has no public way to forget its settings within a process (``AcceleratorState`` is a
singleton that refuses another precision), nor to run fp16 autocast with a loss scaler on the CPU
or to hand it another scaler; clipx does all three, through ``AcceleratorState._reset_state`` and
writes to an Accelerator's ``native_amp`` and ``scaler`` (undocumented attributes that its
``autocast``, ``backward`` and ``prepare`` read).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


def reset_accelerator_state() -> None:
    """Forget Accelerate's settings (precision, device choice), but not the process group, so that the
    next Accelerator of this process gets the settings it asks for."""
    AcceleratorState._reset_state(reset_partial_state=False)


def enable_native_autocast(accelerator: Accelerator) -> None:
    """Make ``accelerator.autocast()`` autocast to its mixed precision where Accelerate would not
    (fp16 on the CPU). Before ``accelerator.prepare``, which reads it."""
    accelerator.native_amp = True


def set_grad_scaler(accelerator: Accelerator, scaler: torch.amp.GradScaler) -> None:
    """Make ``scaler`` the loss scaler of ``accelerator``: its backward, clipping and the optimizers it
    prepares afterwards (a prepared optimizer keeps the scaler it was given) use it."""
    accelerator.scaler = scaler

"""The Accelerator every clipx process runs under (in a group that torchrun, `accelerate launch`, srun
or an MPI launcher started), the check that the launcher formed a real group, and the scope that puts
torch's thread count back when a run ends."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs, InitProcessGroupKwargs

from clipx.cluster_env import launched_world_size, torch_variables
from clipx.compat.accelerate import enable_native_autocast, reset_accelerator_state, set_grad_scaler
from clipx.errors import ClipxError


def make_accelerator(precision: str = "no", collective_timeout_s: int = 1800,
                     fp16_init_scale: float = 2.0 ** 16) -> Accelerator:
    """An Accelerator that also forms a process group of CPU processes.

    Without ``cpu=True`` Accelerate treats torchrun-launched CPU processes as independent
    single-process runs (DistributedType.NO): each would train alone on its shard split. A launcher
    that started more processes than Accelerate sees is refused rather than run wrong. Processes that
    srun or an MPI launcher started get torch's variables first (``adopt_launcher_variables``).
    """
    adopt_launcher_variables()
    # Accelerate keeps its settings in a process-wide singleton: forget them (not the process group),
    # so that each run in a process (tests, sweeps, notebooks) gets the precision it asks for.
    reset_accelerator_state()
    try:
        # Accumulation is done by clipx.train.step (it needs feature caching), not by Accelerate.
        accelerator = Accelerator(
            mixed_precision=precision, cpu=not torch.accelerator.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout_s)),
                             GradScalerKwargs(init_scale=fp16_init_scale)])
    except ValueError as error:  # e.g. a precision this device cannot run
        raise ClipxError(f"train.precision={precision}: {str(error).splitlines()[0]}") from None
    if precision == "fp16" and accelerator.device.type == "cpu":
        enable_cpu_fp16(accelerator, fp16_init_scale)
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise ClipxError(f"the launcher started {launched} processes but Accelerate formed a group of "
                         f"{accelerator.num_processes}; start them with srun, torchrun or accelerate launch")
    return accelerator


def adopt_launcher_variables() -> None:
    """Name this process's rank, local rank, world size and rendezvous in the variables torch and
    Accelerate read (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), when srun (one task per
    GPU) or an MPI launcher started it with only its own (``clipx.cluster_env.torch_variables``);
    nothing when torchrun or `accelerate launch` did. Must run before the process group forms. They
    stay set: a process that such a launcher started is the run's, and a second run in it finds the
    group described the same way."""
    os.environ.update(torch_variables(os.environ))


def launched_processes() -> int:
    """How many processes the launcher says it started: torchrun/Accelerate's WORLD_SIZE, else the
    task count of an `srun` step or an MPI launcher (which start processes without WORLD_SIZE)."""
    return launched_world_size(os.environ)


def enable_cpu_fp16(accelerator: Accelerator, init_scale: float) -> None:
    """fp16 autocast and a loss scaler on the CPU, where Accelerate silently falls back to fp32.

    CPUs have no fast fp16 (use bf16 for speed), so this exists for one reason: the loss-scaler
    path that GPU fp16 runs take (scaled backward, unscale, overflow check, back-off) then runs and
    is tested on the CPU too, with torch's CPU GradScaler in place of the CUDA one. Must run before
    ``accelerator.prepare``, which reads both settings.
    """
    enable_native_autocast(accelerator)
    set_grad_scaler(accelerator, torch.amp.GradScaler("cpu", init_scale=init_scale))


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Put torch's intra-op thread count back as it was when the block exits, normally or by an error.

    A run sets it (train.threads in ``build_trainer``; Accelerate too, for a CPU process group formed
    without OMP_NUM_THREADS), and a process that trains and then goes on (a notebook, a sweep, the
    tests) should get its own count back. Inter-op threads are not touched: torch lets them be set
    only once, before any parallel work, and clipx never sets them.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

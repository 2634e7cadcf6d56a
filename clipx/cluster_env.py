"""A process's place in a group that srun or an MPI launcher started, in the variables torch reads.

torchrun and `accelerate launch` hand every process RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. `srun` with one task per GPU, and mpirun, start the processes themselves and name
their place in their own variables (SLURM_PROCID, OMPI_COMM_WORLD_RANK, ...). ``torch_variables``
translates those into torch's; everything here is a pure function of a mapping (``os.environ`` in a
run, which ``clipx/train/runtime.py`` updates), so nothing in this module reads or changes the process.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional

from clipx.errors import ClipxError

# A SLURM job's rendezvous port when MASTER_PORT is not set: PORT_BASE + job id mod PORT_SPAN, so every
# task of the job derives the same one, unprivileged and below Linux's ephemeral range (32768-60999),
# from which the kernel picks the ports of outgoing connections.
PORT_BASE, PORT_SPAN = 20000, 10000
STEP_STRIDE = 997  # a step's port is this far from the previous step's (a prime: steps cycle through the span)
DEFAULT_PORT = 29500  # torch's own default, for an MPI launch outside SLURM: a constant every rank agrees on
LOOPBACK = "127.0.0.1"
# Where rank 0 runs: the step's first host (srun places task 0 there), else the job's.
NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True)
class Launcher:
    """A launcher's variables: for each quantity, the names it may be in (the first one set wins)."""

    name: str
    rank: tuple[str, ...]
    local_rank: tuple[str, ...]
    size: tuple[str, ...]
    local_size: tuple[str, ...]


# MPI launchers before srun: mpirun inside a batch script hands every process the batch step's
# SLURM_PROCID (0) and SLURM_NTASKS, but its own variables are each process's.
LAUNCHERS = (
    Launcher("Open MPI", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_SIZE",),
             ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    Launcher("MVAPICH", ("MV2_COMM_WORLD_RANK",), ("MV2_COMM_WORLD_LOCAL_RANK",), ("MV2_COMM_WORLD_SIZE",),
             ("MV2_COMM_WORLD_LOCAL_SIZE",)),
    # Not SLURM_LOCALID: under mpiexec in a batch script every process inherits the batch step's 0.
    Launcher("PMI (MPICH, Intel MPI)", ("PMI_RANK",), ("MPI_LOCALRANKID",), ("PMI_SIZE",),
             ("MPI_LOCALNRANKS",)),
    # SLURM_STEP_NUM_TASKS counts this srun step's tasks, and only srun sets it: the batch script itself
    # also has SLURM_PROCID=0 and the job's SLURM_NTASKS, and a `clipx train` typed there without srun
    # must train alone rather than wait for peers that were never started.
    Launcher("srun", ("SLURM_PROCID",), ("SLURM_LOCALID",), ("SLURM_STEP_NUM_TASKS",), ()),
)


@dataclass(frozen=True)
class Placement:
    """Where this process stands in the group its launcher started."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: Optional[int]  # processes on this host, where the launcher says


def _number(env: Mapping[str, str], names: tuple[str, ...]) -> Optional[int]:
    """The first of ``names`` that is set, as a non-negative integer; None when none is set."""
    for name in names:
        if name in env:
            value = env[name].strip()
            if not value.isdigit():
                raise ClipxError(f"{name}={env[name]!r} is not a non-negative integer; it names this process's place "
                                 "in its launcher's group: launch with srun, mpirun or torchrun unchanged")
            return int(value)
    return None


def placement(env: Mapping[str, str]) -> Optional[Placement]:
    """This process's place in a group of several that srun or an MPI launcher started; None when a
    torch launcher did (WORLD_SIZE is set: torchrun, `accelerate launch`), when no launcher did, or
    when it started one process."""
    if "WORLD_SIZE" in env:
        return None
    for launcher in LAUNCHERS:
        rank, size = _number(env, launcher.rank), _number(env, launcher.size)
        if rank is None or size is None:
            continue
        if size <= 1:
            return None
        local_size = _number(env, launcher.local_size)
        if local_size is None and launcher.name == "srun":
            local_size = _slurm_local_size(env)
        local_rank = _number(env, (*launcher.local_rank, "LOCAL_RANK"))
        if local_rank is None:
            if local_size != size:
                raise ClipxError(f"{launcher.name} started {size} processes without saying which GPU this one is "
                                 f"({' or '.join(launcher.local_rank)} is not set): export LOCAL_RANK")
            local_rank = rank  # every process on this host
        if rank >= size or local_rank >= (local_size or size):
            raise ClipxError(f"{launcher.name}'s variables disagree: rank {rank}, local rank {local_rank} of "
                             f"{size} processes ({local_size or '?'} on this host); launch with srun, mpirun or "
                             "torchrun unchanged")
        return Placement(launcher.name, rank, local_rank, size, local_size)
    return None


def launched_world_size(env: Mapping[str, str]) -> int:
    """How many processes the launcher started: WORLD_SIZE, else srun's or an MPI launcher's count."""
    if env.get("WORLD_SIZE", "").strip().isdigit():
        return int(env["WORLD_SIZE"])
    where = placement(env)
    return where.world_size if where is not None else 1


def torch_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that make torch and Accelerate see the group srun or an MPI launcher started:
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (where known), MASTER_ADDR and MASTER_PORT (kept
    when set). Empty when there is nothing to translate (``placement`` is None)."""
    where = placement(env)
    if where is None:
        return {}
    variables = {"RANK": str(where.rank), "LOCAL_RANK": str(where.local_rank), "WORLD_SIZE": str(where.world_size),
                 "MASTER_ADDR": master_addr(env, where), "MASTER_PORT": master_port(env)}
    if where.local_world_size is not None:
        variables["LOCAL_WORLD_SIZE"] = str(where.local_world_size)
    return variables


def master_addr(env: Mapping[str, str], where: Placement) -> str:
    """MASTER_ADDR if set; else the first host of the SLURM step or job (where rank 0 runs); else the
    loopback address when every process is on this host."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    # An MPI launcher's processes on other nodes run inside steps of their own (mpirun starts its
    # daemons with srun), whose step host lists differ: only the job's list is the same everywhere.
    for name in NODELISTS if where.launcher == "srun" else NODELISTS[1:]:
        if env.get(name):
            return first_host(env[name], name)
    if where.local_world_size == where.world_size:
        return LOOPBACK
    raise ClipxError(f"{where.launcher} started {where.world_size} processes and nothing says which host runs "
                     "rank 0 (no MASTER_ADDR, no SLURM nodelist): export MASTER_ADDR=<rank 0's host> before launching")


def master_port(env: Mapping[str, str]) -> str:
    """MASTER_PORT if set; else one derived from SLURM_JOB_ID and SLURM_STEP_ID (every task of a step
    derives the same, and two steps of one job running at once differ); else torch's default."""
    if env.get("MASTER_PORT"):
        return env["MASTER_PORT"]
    if env.get("SLURM_JOB_ID"):
        return str(port_of_job(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "0")))
    return str(DEFAULT_PORT)


def port_of_job(job_id: str, step_id: str = "0") -> int:
    """A SLURM step's rendezvous port: PORT_BASE + (job id + STEP_STRIDE x step id) mod PORT_SPAN
    (a stable hash of an id that is not a number); step 0 takes the job's own port."""
    def number(text: str) -> int:
        text = text.strip()
        return int(text) if text.isdigit() else zlib.crc32(text.encode())

    return PORT_BASE + (number(job_id) + STEP_STRIDE * number(step_id)) % PORT_SPAN


# Slurm's compressed host lists: hosts separated by commas, each a name in which bracketed lists of
# numbers and ranges stand for several (gpu[01-04,07],cpu3). One character per repetition, so that a
# malformed list fails at once instead of backtracking.
_RANGES = r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*"
_HOST = rf"(?:[A-Za-z0-9_.-]|\[{_RANGES}\])+"
_NODELIST = re.compile(rf"{_HOST}(?:,{_HOST})*")


def first_host(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a Slurm host list, zero padding kept: ``gpu[01-04,07],cpu3`` -> ``gpu01``,
    ``node-a[9-11]`` -> ``node-a9``. ``name``: the variable it came from, for the error."""
    text = nodelist.strip()
    ranges = re.findall(r"(\d+)-(\d+)", "".join(re.findall(r"\[[^\]]*\]", text)))
    if not _NODELIST.fullmatch(text) or any(int(low) > int(high) for low, high in ranges):
        raise ClipxError(f"{name}={nodelist!r} is not a Slurm host list (like gpu[01-04,07],cpu3): "
                         "export MASTER_ADDR=<rank 0's host> to name the rendezvous host yourself")
    first = re.match(_HOST, text).group(0)
    return re.sub(r"\[(\d+)[^\]]*\]", r"\1", first)


def tasks_per_node(spec: str, name: str = "SLURM_STEP_TASKS_PER_NODE") -> list[int]:
    """Slurm's compressed task counts per node: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.strip().split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ClipxError(f"{name}={spec!r} is not a Slurm task count per node (like 2(x3),1): launch with srun "
                             "unchanged, or with torchrun")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_local_size(env: Mapping[str, str]) -> Optional[int]:
    """srun's tasks on this node: this node's entry (SLURM_NODEID) of the step's tasks per node."""
    node = _number(env, ("SLURM_NODEID",))
    name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(n)), None)
    if node is None or name is None:
        return None
    counts = tasks_per_node(env[name], name)
    return counts[node] if node < len(counts) else None

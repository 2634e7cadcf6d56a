"""Cluster launch as clusters do it: `srun` with one task per GPU (and MPI launchers) start a run
without torchrun, and SLURM's warning signal before the time limit (SIGUSR1) saves and exits 75.

The translation of the launchers' variables (clipx/cluster_env.py) is tested as pure functions of
hand-written environments; one test starts two real processes the way srun does (plain processes
with SLURM's variables, no torchrun) and checks them bitwise against a torchrun run, through a
SIGUSR1 and a `--resume latest`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from clipx.cluster_env import (
    DEFAULT_PORT,
    LOOPBACK,
    PORT_BASE,
    PORT_SPAN,
    first_host,
    launched_world_size,
    placement,
    port_of_job,
    tasks_per_node,
    torch_variables,
)
from clipx.errors import ClipxError
from clipx.train.checkpoint import list_checkpoints
from tests.conftest import DEMO, REPO, tiny_overrides

# What srun hands task 1 of a 2 x 4 step on nodes gpu[01-02] (SLURM_NODEID: the step's second node).
SRUN = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "4242"}


# ---- host lists and task counts ----------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("gpu[01-04,07],cpu3", "gpu01"), ("node-a[9-11]", "node-a9"), ("localhost", "localhost"),
    ("127.0.0.1", "127.0.0.1"), ("n[007,010-012]", "n007"), ("cpu3,gpu[01-04]", "cpu3"),
    ("rack[2-3]-node[0004-0009]", "rack2-node0004"), ("a.b.example.org", "a.b.example.org"),
    ("gpu[5]", "gpu5"), (" gpu[01-02] ", "gpu01"),
])
def test_the_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[01-04", "gpu01-04]", "gpu[]", "gpu[a-b]", "gpu[04-01]",
                                      "(null)", "gpu[01-04],,cpu3", "gpu[01;02]", "a b"])
def test_a_malformed_host_list_is_one_line_naming_the_variable_and_the_fix(nodelist):
    with pytest.raises(ClipxError) as caught:
        first_host(nodelist, "SLURM_JOB_NODELIST")
    message = str(caught.value)
    assert "\n" not in message and "SLURM_JOB_NODELIST" in message and "export MASTER_ADDR" in message


@pytest.mark.parametrize("spec, counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]), ("1,3", [1, 3])])
def test_slurm_task_counts_per_node(spec, counts):
    assert tasks_per_node(spec) == counts


def test_a_malformed_task_count_is_one_line():
    with pytest.raises(ClipxError) as caught:
        tasks_per_node("2(3)")
    assert "\n" not in str(caught.value) and "SLURM_STEP_TASKS_PER_NODE" in str(caught.value)


# ---- the launchers' variables -> torch's ----------------------------------------------------------------

def test_srun_tasks_get_rank_local_rank_world_size_and_the_jobs_first_host():
    assert torch_variables(SRUN) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "gpu01", "MASTER_PORT": str(port_of_job("4242"))}
    assert launched_world_size(SRUN) == 8


def test_the_steps_host_list_and_task_count_come_before_the_jobs():
    """A step on part of the job's nodes: its rank 0 is on the step's first node, and it has the
    step's tasks, not the job's."""
    step = {**SRUN, "SLURM_STEP_NODELIST": "gpu02", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "4"}
    variables = torch_variables(step)
    assert (variables["MASTER_ADDR"], variables["WORLD_SIZE"], variables["LOCAL_WORLD_SIZE"]) == ("gpu02", "4", "4")
    assert torch_variables({**SRUN, "SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "c[3-4]"})["MASTER_ADDR"] == "c3"
    # The batch script's own environment (no srun step): SLURM_PROCID=0 and the job's SLURM_NTASKS,
    # but no SLURM_STEP_NUM_TASKS. A `clipx train` there trains alone instead of waiting for peers.
    batch_script = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NUM_TASKS"} | {"SLURM_PROCID": "0"}
    assert torch_variables(batch_script) == {}


def test_master_addr_and_port_from_the_environment_win():
    variables = torch_variables({**SRUN, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "31000"})
    assert (variables["MASTER_ADDR"], variables["MASTER_PORT"]) == ("10.0.0.7", "31000")


def test_the_port_is_the_same_for_every_task_of_a_job_and_unprivileged():
    ports = {port_of_job(job) for job in ("1", "4242", "99999999", "123456_7", "abc")}
    assert all(PORT_BASE <= port < PORT_BASE + PORT_SPAN < 32768 for port in ports) and len(ports) == 5
    assert port_of_job("4242") == port_of_job(" 4242") == port_of_job("4242", "0") == PORT_BASE + 4242
    # two srun steps of one job at once (a training step and an evaluation step, say) do not collide
    assert len({port_of_job("4242", str(step)) for step in range(8)}) == 8
    assert torch_variables({**SRUN, "SLURM_STEP_ID": "1"})["MASTER_PORT"] == str(port_of_job(SRUN["SLURM_JOB_ID"], "1"))
    tasks = [torch_variables({**SRUN, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4),
                              "SLURM_NODEID": str(r // 4)}) for r in range(8)]
    assert {(t["MASTER_ADDR"], t["MASTER_PORT"], t["WORLD_SIZE"]) for t in tasks} == {
        ("gpu01", str(PORT_BASE + 4242), "8")}
    assert [int(t["RANK"]) for t in tasks] == list(range(8)) and [t["LOCAL_RANK"] for t in tasks] == list("01230123")


def test_a_torch_launcher_one_task_or_no_launcher_is_left_alone():
    assert torch_variables({**SRUN, "WORLD_SIZE": "8", "RANK": "5"}) == {}  # torchrun under srun
    assert launched_world_size({**SRUN, "WORLD_SIZE": "16"}) == 16
    one = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert torch_variables(one) == {} and launched_world_size(one) == 1
    assert torch_variables({}) == {} and launched_world_size({}) == 1
    # an salloc shell: the job's task count but no task of a step
    assert torch_variables({"SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]"}) == {}


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "head"}, ("3", "1", "4", "2", "head", str(DEFAULT_PORT))),
    ({"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_LOCAL_RANK": "2", "MV2_COMM_WORLD_SIZE": "4",
      "MV2_COMM_WORLD_LOCAL_SIZE": "4"}, ("2", "2", "4", "4", LOOPBACK, str(DEFAULT_PORT))),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_PORT": "30001"},
     ("1", "1", "2", "2", LOOPBACK, "30001")),
    # mpirun inside a batch script: the batch step's SLURM_PROCID (0) is every process's, the MPI rank is its own
    ({"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "16",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "g[07-08]",
      "SLURM_JOB_ID": "77"}, ("9", "1", "16", "8", "g07", str(PORT_BASE + 77))),
    # ... on the second node, a child of the daemon mpirun started there with srun: that step's host
    # list names its own node only; the job's list, the same on every node, names the rendezvous
    ({"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "16",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "SLURM_STEP_NODELIST": "g08", "SLURM_JOB_NODELIST": "g[07-08]",
      "SLURM_JOB_ID": "77"}, ("9", "1", "16", "8", "g07", str(PORT_BASE + 77))),
])
def test_mpi_launchers_map_to_torchs_variables(env, expected):
    variables = torch_variables(env)
    assert tuple(variables[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                        "MASTER_PORT")) == expected


def test_mpi_across_hosts_without_a_rendezvous_host_says_to_export_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ClipxError) as caught:
        torch_variables(env)
    message = str(caught.value)
    assert "\n" not in message and "Open MPI" in message and "export MASTER_ADDR" in message
    assert launched_world_size(env) == 4  # the count alone needs no host


@pytest.mark.parametrize("change, named", [
    ({"SLURM_PROCID": "one"}, "SLURM_PROCID"), ({"SLURM_STEP_NUM_TASKS": "-2"}, "SLURM_STEP_NUM_TASKS"),
    ({"SLURM_PROCID": "8"}, "rank 8"), ({"SLURM_LOCALID": "4"}, "local rank 4"),
    ({"SLURM_JOB_NODELIST": "gpu[01-"}, "SLURM_JOB_NODELIST"),
])
def test_bad_launcher_variables_are_one_line(change, named):
    with pytest.raises(ClipxError) as caught:
        torch_variables({**SRUN, **change})
    assert "\n" not in str(caught.value) and named in str(caught.value)


def test_a_launcher_that_names_no_local_rank_across_hosts_is_refused():
    env = {"PMI_RANK": "1", "PMI_SIZE": "4"}  # no MPI_LOCALRANKID or LOCAL_RANK
    with pytest.raises(ClipxError, match="export LOCAL_RANK"):
        placement(env)
    # mpiexec in a batch script: the batch step's SLURM_LOCALID (0) is every process's, not its GPU
    with pytest.raises(ClipxError, match="export LOCAL_RANK"):
        placement({**env, "SLURM_LOCALID": "0"})
    assert placement({**env, "LOCAL_RANK": "0"}).local_rank == 0


# ---- two processes started as srun starts them ----------------------------------------------------------

TORCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def free_job_id() -> str:
    """A SLURM_JOB_ID whose derived rendezvous port (port_of_job) is free on this machine now."""
    for job in range(os.getpid() % PORT_SPAN, os.getpid() % PORT_SPAN + 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port_of_job(str(job))))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port in clipx's SLURM port range")


def srun_like(command: list[str], job_id: str, logs) -> list[subprocess.Popen]:
    """Two processes as `srun --ntasks=2` on one node starts them: SLURM's variables only (no
    torchrun, no RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), one thread each, output to files."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_")) and k not in TORCH_VARIABLES}
    processes = []
    for rank in (0, 1):
        env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "0",
               "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id}
        out = open(logs / f"rank{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, *command], env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT, text=True))
        out.close()
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    """The processes' exit statuses; any still running after ``timeout`` seconds is killed."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


def tails(logs) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(logs.glob("rank*.log")))


def model_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_srun_started_processes_train_like_torchrun_and_sigusr1_requeues_bitwise(tmp_path, digits_dir,
                                                                                   tiny_model_json):
    """Two processes with SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and a host list, no torchrun:
    `python -m clipx.train` forms the group itself; SIGUSR1 to both (what `--signal=USR1@120` does)
    makes them save the same step and exit 75; that checkpoint equals a torchrun run's at the same
    step, and `--resume latest` launched the same way ends bitwise equal to the unbroken torchrun run."""
    from tests.distributed.launch import torchrun

    steps = 30
    extra = {"train.steps": steps, "train.checkpoint_every": 1000, "data.val": "null", "data.workers": 0,
             "train.batch_size": 16, "train.collective_timeout_s": 120}
    run, logs = tmp_path / "srun", tmp_path / "logs"
    logs.mkdir()
    train = ["-m", "clipx.train", "--config", str(DEMO), *tiny_overrides(digits_dir, tiny_model_json, run, **extra)]
    job = free_job_id()

    processes = srun_like(train, job, logs)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):  # a few steps in, on both ranks
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), tails(logs)
            time.sleep(0.05)
        for p in processes:
            p.send_signal(signal.SIGUSR1)
    finally:
        codes = wait_all(processes)
    assert codes == [75, 75], tails(logs)
    assert "--resume latest" in (logs / "rank0.log").read_text()
    (saved,) = list_checkpoints(run)
    stopped_at = int(saved.name.split("-")[1])
    assert 3 <= stopped_at < steps

    # The reference: torchrun, 2 processes, checkpoints at the step the signal stopped at and at the end.
    reference = tmp_path / "torchrun"
    overrides = tiny_overrides(digits_dir, tiny_model_json, reference,
                               **{**extra, "train.checkpoint_every": stopped_at})
    result = torchrun(["-m", "clipx.train", "--config", str(DEMO), *overrides], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {int(c.name.split("-")[1]): model_weights(c) for c in list_checkpoints(reference)}
    assert bitwise_equal(model_weights(saved), expected[stopped_at]), "srun's processes trained unlike torchrun's"

    for log in logs.glob("rank*.log"):
        log.unlink()
    assert wait_all(srun_like([*train, "--resume", "latest"], job, logs)) == [0, 0], tails(logs)
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    assert bitwise_equal(model_weights(list_checkpoints(run)[-1]), expected[steps])

"""Run a case of tests/distributed/cases.py in 2 real processes (torchrun, gloo, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# What a launch prints when a port it binds (the rendezvous' or the workers' TCPStore) was taken by
# another process between choosing and binding it: c10d's "name: EADDRINUSE, message: address already
# in use", or a Python socket's "[Errno 98] Address already in use".
PORT_CLASH = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


def torchrun(arguments: list[str], cwd: Path, timeout: int = 300, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node PROCESSES ARGUMENTS`` (a script, or ``-m module``), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def port_clash(result: subprocess.CompletedProcess) -> bool:
    """Whether a launch failed because another process took its port: the one failure that says
    nothing about the code launched, and the only one a test may relaunch after."""
    return result.returncode != 0 and PORT_CLASH.search(result.stderr or "") is not None


def torchrun_once_more_on_port_clash(arguments_in, out: Path, fresh, timeout: int, processes: int = 2,
                                     what: str = "launch") -> tuple[subprocess.CompletedProcess, Path]:
    """``torchrun(arguments_in(out), out)``, relaunched once in ``fresh()`` (a new folder) if and only
    if it failed for a port clash (``port_clash``). Any other failure is returned as it is, so the test
    fails with the first launch's errors: a relaunch after any failure would turn an intermittent bug
    into a warning. Returns the result that counts and its folder."""
    result = torchrun(arguments_in(out), out, timeout, processes)
    if port_clash(result):
        (out / "port_clash_stderr.txt").write_text(result.stderr)
        warnings.warn(f"{what}: another process took the launch's port (address already in use); relaunching once. "
                      f"stderr tail: {result.stderr[-800:]}")
        out = fresh()
        result = torchrun(arguments_in(out), out, timeout, processes)
    return result, out


def run_two_processes(case: str, out_dir: Path, *args: str, timeout: int = 300) -> list[dict]:
    """Launch ``cases.py CASE OUT_DIR ARGS`` on 2 processes; return each rank's saved results.

    Every rank saves ``rank{r}.pt`` holding at least its world size, so a launcher that silently
    started one process cannot pass.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [str(REPO / "tests" / "distributed" / "cases.py"), case, str(out_dir), *args]
    # Relaunched (in the same folder: each rank rewrites its results) only if another process took
    # the port; any other failure fails the test with this launch's errors.
    result, _ = torchrun_once_more_on_port_clash(lambda _: command, out_dir, lambda: out_dir, timeout,
                                                 what=f"2-process case {case}")
    if result.returncode != 0:
        raise AssertionError(f"2-process case {case} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2], "the launcher did not start 2 processes"
    assert [r["rank"] for r in results] == [0, 1]
    return results

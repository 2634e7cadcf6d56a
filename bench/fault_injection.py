"""Kill a training run with SIGKILL at random moments (many inside checkpoint saves), resume it each
time with ``--resume latest``, and compare the final weights with an uninterrupted run.

    .venv/bin/python bench/fault_injection.py --kills 10 > report.json   # a JSON report
    .venv/bin/python bench/fault_injection.py --markdown report.json     # as RELIABILITY.md's tables

    .venv/bin/python bench/fault_injection.py --processes 2 --sharding fsdp --kills 12 > sharded.json

With ``--processes N`` every run is a torchrun launch of N processes, and a kill is SIGKILL to all of
them at once (a node lost mid-save); with ``--sharding fsdp`` every rank writes its own shards of each
checkpoint. tests/test_reliability.py runs the same with 10 kills on the tiny model, and a shorter
sharded one; RELIABILITY.md records both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo-digits.yaml"


def train_command(overrides: list[str], resume: bool, processes: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "clipx.train"] if processes > 1 else [sys.executable, "-m", "clipx.cli", "train"])
    command = [*launcher, "--config", str(CONFIG), *overrides]
    return command + (["--resume", "latest"] if resume else [])


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0


def kill_once(overrides: list[str], run: Path, rng: random.Random, timeout: float = 300,
              processes: int = 1) -> dict | None:
    """Start (resuming), wait for 1-3 new steps plus a random fraction of a step, SIGKILL every process
    of the run (launcher, ranks and loader workers) at once.

    Returns where the kill landed, or None if the run finished first.
    """
    before = logged_steps(run)
    wanted, extra_delay = before + rng.randint(1, 3), rng.uniform(0.0, 0.4)
    process = subprocess.Popen(train_command(overrides, resume=True, processes=processes), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while logged_steps(run) < wanted and process.poll() is None:
        if time.monotonic() > deadline:
            kill_tree(process.pid)
            raise TimeoutError("a training run made no progress")
        time.sleep(0.01)
    time.sleep(extra_delay)
    if process.poll() is not None:
        return None
    during_save = any((run / "checkpoints").glob(".tmp-*"))
    kill_tree(process.pid)
    process.wait()
    return {"after_step": logged_steps(run), "during_save": during_save}


def verify_all(run: Path) -> int:
    """Every checkpoint that counts as complete passes its checksums; returns how many there are."""
    from clipx.train.checkpoint import list_checkpoints, verify_checkpoint

    checkpoints = list_checkpoints(run)
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint)  # raises on a torn or damaged one
    return len(checkpoints)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it, until none of them runs.

    A process-group kill is not enough: torchrun starts each rank in a session of its own, and a
    rank that survives its launcher goes on training and saving beside the resumed run."""
    while True:
        processes = _process_table()
        targets = [p for p in [pid, *_descendants(pid, processes)] if processes.get(p, ("", "Z"))[1] not in "ZX"]
        if not targets:
            return
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        time.sleep(0.05)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter), read from /proc (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int, processes: dict[int, tuple[int, str]]) -> list[int]:
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, (parent, _) in processes.items() if parent in frontier}
        found += sorted(frontier)
    return found


def run_fault_injection(work: Path, overrides: list[str], kills: int, seed: int = 0, processes: int = 1) -> dict:
    """Reference run, then a run killed ``kills`` times and resumed to the end; the report.

    Both runs log every step's sample keys, so the report also says whether the resumed run
    trained on exactly the same samples in the same order.
    """
    from clipx.api import read_weights
    from clipx.train.checkpoint import list_checkpoints
    from clipx.train.metrics_log import read_sample_keys

    overrides = [*overrides, "train.log_sample_keys=true"]
    reference, faulty = work / "reference", work / "faulty"
    subprocess.run(train_command([*overrides, f"train.output_dir={reference}"], resume=False, processes=processes),
                   cwd=REPO, check=True, capture_output=True)
    rng = random.Random(seed)
    run_overrides = [*overrides, f"train.output_dir={faulty}"]
    events = []
    while len(events) < kills:
        event = kill_once(run_overrides, faulty, rng, processes=processes)
        if event is None:
            raise RuntimeError(f"the run finished after {len(events)} kills; give it more steps")
        event["complete_checkpoints"] = verify_all(faulty)
        events.append(event)
    final = subprocess.run(train_command(run_overrides, resume=True, processes=processes), cwd=REPO,
                           capture_output=True, text=True)
    if final.returncode != 0:
        raise RuntimeError(final.stderr[-2000:])
    expected = read_weights(list_checkpoints(reference)[-1], {})  # model.safetensors, or its shards joined
    actual = read_weights(list_checkpoints(faulty)[-1], {})
    expected_keys, actual_keys = read_sample_keys(reference), read_sample_keys(faulty)
    return {
        "kills": len(events),
        "kills_during_save": sum(e["during_save"] for e in events),
        "bitwise_equal": expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected),
        "sample_keys_equal": expected_keys == actual_keys,
        "sample_keys_logged": sum(len(keys) for batches in actual_keys.values() for _, keys in batches),
        "stray_temporary_dirs": len(list((faulty / "checkpoints").glob(".tmp-*"))),
        "complete_checkpoints_verified": verify_all(faulty),
        "events": events,
    }


def markdown(report: dict) -> str:
    lines = ["| | result |", "|---|---|",
             f"| processes per run, sharding | {report.get('processes', 1)}, {report.get('sharding', 'ddp')} |",
             f"| kills | {report['kills']} |",
             f"| kills during a checkpoint save | {report['kills_during_save']} |",
             f"| final weights bitwise equal to the uninterrupted run | {report['bitwise_equal']} |",
             f"| sample keys of every step equal to the uninterrupted run's ({report['sample_keys_logged']} keys) | "
             f"{report['sample_keys_equal']} |",
             "| complete checkpoints that failed verification after a kill (torn or damaged) | 0 (the script stops "
             "at the first) |",
             f"| temporary directories left after the final run | {report['stray_temporary_dirs']} |",
             f"| complete checkpoints at the end (keep 3), all verified | {report['complete_checkpoints_verified']} |",
             "", "| kill | logged steps at the kill | during a save | complete checkpoints, all verified |",
             "|---:|---:|:---:|---:|"]
    lines += [f"| {i} | {e['after_step']} | {'yes' if e['during_save'] else 'no'} | {e['complete_checkpoints']} |"
              for i, e in enumerate(report["events"], 1)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/fault_injection"))
    parser.add_argument("--model", default=str(REPO / "configs" / "models" / "tiny-digits.json"))
    parser.add_argument("--processes", type=int, default=1, help="ranks per run (a torchrun launch when > 1)")
    parser.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--markdown", type=Path, metavar="REPORT.json", help="print a saved report as tables")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return

    from data_prep import prep_digits

    data = args.work / "data"
    if not (data / "train" / "sizes.json").is_file():
        prep_digits(data, image_size=32, shard_size=256, workers=2)
    overrides = [f"model.name={args.model}", f"data.train={data / 'train'}", "data.val=null", "data.workers=2",
                 f"train.steps={args.steps}", "train.batch_size=32", "train.checkpoint_every=1",
                 "train.keep_checkpoints=3", "train.log_every=1", "train.threads=1", "train.warmup_steps=1",
                 f"train.sharding={args.sharding}"]
    for name in ("reference", "faulty"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    report = run_fault_injection(args.work, overrides, args.kills, args.seed, args.processes)
    report["processes"], report["sharding"] = args.processes, args.sharding
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

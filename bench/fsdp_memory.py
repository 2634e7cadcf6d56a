"""Per-rank memory of model state with DDP and with FSDP (train.sharding), at 1, 2 and 4 CPU processes.

    .venv/bin/python bench/fsdp_memory.py                  # writes runs/bench/fsdp_memory.json
    .venv/bin/python bench/fsdp_memory.py --markdown runs/bench/fsdp_memory.json

Each configuration is one torchrun launch of this script (``--worker``): every rank tunes glibc's
malloc as a run does (``host_memory.tune_host_memory``: freed memory retained under DDP, returned
under FSDP), builds the trainer a run would build (``build_trainer``) for an image-text model of
about 100 M parameters (configs/models/bench-100m.json, at 32 px so that activations stay small next
to the state), takes 2 optimizer steps on a synthetic batch, then a third backward, and counts the
bytes it holds:
  - state: its parameters, their gradients and AdamW's moments, as local tensors (a sharded
    parameter counts its shard only), measured after the third backward;
  - resident growth: the process's resident memory after the third backward minus before the
    trainer was built (each after malloc_trim, so that freed memory glibc kept does not count),
    which also holds what the state count does not see (DDP's gradient buckets, FSDP's gathered
    blocks, activations); and the peak resident memory (ru_maxrss), which includes the libraries,
    rank 0's one eager build of the whole model (train/sharded_init.py; under FSDP the other ranks
    materialise only their rows) and the transient buffers of each step.
`clipx plan`'s per-rank state figure for the same world size is printed beside the measurement. Then
FSDP's host-memory policy's cost in speed: 12-step FSDP runs on 2 processes with
train.retain_host_memory true and false, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import digits_shards, run_or_render  # noqa: E402

MODEL = REPO / "configs" / "models" / "bench-100m.json"
BATCH = 4  # per rank


def overrides(sharding: str, data: str, out: Path) -> list[str]:
    return [f"model.name={MODEL}", f"data.train={data}", "data.val=null", "data.workers=0",
            f"train.batch_size={BATCH}", "train.steps=2", "train.warmup_steps=0", "train.threads=1",
            f"train.sharding={sharding}", f"train.output_dir={out}"]


def worker(args) -> None:
    import torch

    from clipx import dist
    from clipx.config import load_config
    from clipx.dist import unwrap
    from clipx.train.build import build_trainer
    from clipx.train.host_memory import tune_host_memory
    from clipx.train.loop import train_step
    from clipx.train.sharding import local_part
    from clipx.train.step import micro_batch_gradients

    config = load_config(None, overrides(args.sharding, args.data, args.work / "run"))
    tune_host_memory(config.train, "cpu")  # glibc tuned as a run is (clipx.train.loop.fit): retained, or for FSDP returned
    before = resident_bytes()
    trainer = build_trainer(config)
    generator = torch.Generator().manual_seed(dist.rank())
    batch = {"image": torch.randn(BATCH, 3, 32, 32, generator=generator),
             "text": torch.randint(1, 400, (BATCH, 16), generator=generator)}
    for step in (1, 2):
        train_step(trainer, [batch], step)
    micro_batch_gradients(trainer.accelerator, trainer.model, trainer.objective, [batch], "features")
    model = unwrap(trainer.model)

    def nbytes(tensors) -> int:
        return sum(local_part(t).numel() * local_part(t).element_size() for t in tensors)

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    found = torch.tensor([float(nbytes(model.parameters())), float(nbytes(p.grad for p in model.parameters()
                                                                       if p.grad is not None)),
                          float(nbytes(moments)), float(resident_bytes() - before),
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    per_rank = dist.gather_no_grad(found[None]).tolist()
    if dist.rank() == 0:
        args.out.write_text(json.dumps({"ranks": [dict(zip(("params", "grads", "moments", "rss_growth", "peak_rss"), r))
                                                  for r in per_rank]}))


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), after handing freed heap memory back to the kernel:
    glibc keeps freed blocks (the whole model each rank built before sharding it, say) resident."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def launch(args, world: int, sharding: str) -> dict:
    out = args.work / f"{sharding}-w{world}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               __file__, "--worker", "--sharding", sharding, "--data", args.data, "--work",
               str(args.work / f"{sharding}-w{world}"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{sharding} at {world} processes failed:\n{result.stderr[-3000:]}")
    ranks = json.loads(out.read_text())["ranks"]
    state = [r["params"] + r["grads"] + r["moments"] for r in ranks]
    return {"state_bytes_max": max(state), "state_bytes": state, "peak_rss_max": max(r["peak_rss"] for r in ranks),
            "rss_growth_max": max(r["rss_growth"] for r in ranks), "ranks": ranks}


def planned(world: int, sharding: str, data: str) -> int:
    from clipx.apps.plan import plan_memory
    from clipx.config import load_config

    plan = plan_memory(load_config(None, overrides(sharding, data, Path("unused"))), world)
    return plan.model_state_fsdp if sharding == "fsdp" else plan.model_state


def measure(args) -> dict:
    import torch

    from clipx.config import load_config
    from clipx.methods import build_model

    args.work.mkdir(parents=True, exist_ok=True)
    args.data = args.data or digits_shards(args.work)
    model = build_model(load_config(None, overrides("ddp", args.data, Path("unused"))))
    results = {"parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__, "runs": {}}
    for world in (1, 2, 4):
        for sharding in ("ddp", "fsdp"):
            found = launch(args, world, sharding)
            found["planned_state_bytes"] = planned(world, sharding, args.data)
            results["runs"][f"{sharding}-w{world}"] = found
            print(f"{sharding} w{world}: state {found['state_bytes_max'] / 2**20:.0f} MiB, resident growth "
                  f"{found['rss_growth_max'] / 2**20:.0f} MiB, peak RSS {found['peak_rss_max'] / 2**20:.0f} MiB",
                  file=sys.stderr)
    results["host_memory_speed"] = policy_speed(args)
    return results


def policy_speed(args, alternations: int = 2) -> dict[str, list[float]]:
    """What returning freed host memory (FSDP's default on CPU processes) costs: samples/s of a 12-step FSDP run on 2
    processes with train.retain_host_memory true and false, alternating (summary.json's rate)."""
    rates: dict[str, list[float]] = {"true": [], "false": []}
    for index in range(alternations):
        for retain in (("true", "false") if index % 2 == 0 else ("false", "true")):
            out = args.work / f"speed-{retain}-{index}"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "clipx.train", "--config", str(REPO / "configs" / "demo-digits.yaml"),
                       *overrides("fsdp", args.data, out), "train.batch_size=8", "train.steps=12", "train.plots=false",
                       f"train.retain_host_memory={retain}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"the speed run with retain_host_memory={retain} failed:\n{result.stderr[-3000:]}")
            rates[retain].append(json.loads((out / "summary.json").read_text())["samples_per_second"])
            print(f"fsdp w2, retain_host_memory={retain}: {rates[retain][-1]:.2f} samples/s", file=sys.stderr)
    return rates


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [f"Model: `configs/models/bench-100m.json`, {results['parameters'] / 1e6:.1f} M parameters, "
             f"fp32, AdamW; {BATCH} samples per rank at 32 px; torch {results['torch']}; gloo on CPU processes.", "",
             "| processes | sharding | state per rank, MiB (max) | `clipx plan`, MiB | state / DDP's | "
             "resident growth per rank, MiB (max) | growth / DDP's | peak RSS per rank, MiB (max) | peak / DDP's |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for world in (1, 2, 4):
        ddp = runs[f"ddp-w{world}"]
        for sharding in ("ddp", "fsdp"):
            run = runs[f"{sharding}-w{world}"]
            lines.append(f"| {world} | {sharding} | {run['state_bytes_max'] / 2**20:.0f} | "
                         f"{run['planned_state_bytes'] / 2**20:.0f} | "
                         f"{run['state_bytes_max'] / ddp['state_bytes_max']:.3f} | "
                         f"{run['rss_growth_max'] / 2**20:.0f} | "
                         f"{run['rss_growth_max'] / ddp['rss_growth_max']:.3f} | {run['peak_rss_max'] / 2**20:.0f} | "
                         f"{run['peak_rss_max'] / ddp['peak_rss_max']:.3f} |")
    errors = [abs(r["planned_state_bytes"] - r["state_bytes_max"]) / r["state_bytes_max"] for r in runs.values()]
    lines += ["", f"Largest difference between `clipx plan` and the measured state: {max(errors):.2%} "
              f"(median {statistics.median(errors):.2%})."]
    speed = results.get("host_memory_speed")
    if speed:
        kept, returned = statistics.median(speed["true"]), statistics.median(speed["false"])
        lines += ["", "FSDP on 2 processes, 8 samples per rank, 12 steps, by host-memory policy (alternating, medians):", "",
                  "| train.retain_host_memory | samples/s | runs |", "|---|---:|---|",
                  f"| true (the default, but for FSDP on CPU) | {kept:.2f} | {', '.join(f'{r:.2f}' for r in speed['true'])} |",
                  f"| false (FSDP's default on CPU) | {returned:.2f} | {', '.join(f'{r:.2f}' for r in speed['false'])} |",
                  "", f"Returning freed host memory runs at {returned / kept:.2f}x the retained rate here."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "fsdp-memory")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "fsdp_memory.json")
    parser.add_argument("--data", default=None, help="training shards (default: digits shards written under --work)")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()

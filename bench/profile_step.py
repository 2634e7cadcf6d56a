"""Where a training step's CPU time goes: torch.profiler over forward + loss + backward + AdamW.

    .venv/bin/python bench/profile_step.py [--model configs/models/bench-small.json] [--batch 128]

Prints the operators with the most self time and the share of each phase of the step; the phases
are timed separately (forward, backward, optimizer step, zero_grad) over a few steps after two warm-ups.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "configs" / "models" / "bench-small.json")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from clipx.config import load_config
    from clipx.methods import build_model, build_objective
    from clipx.train.host_memory import retain_freed_host_memory
    from clipx.train.optim import build_optimizer

    retain_freed_host_memory()
    torch.set_num_threads(args.threads)
    config = load_config(REPO / "configs" / "bench-small.yaml", [f"model.name={args.model.resolve()}",
                                                                  "data.train=unused"])
    model = build_model(config)
    objective = build_objective(model, config)
    optimizer = build_optimizer(model, config.train)
    arch = config.model.arch
    size, context = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    batch = {"image": torch.randn(args.batch, 3, size, size),
             "text": torch.randint(0, arch["text_cfg"]["vocab_size"], (args.batch, context))}
    phases = {"forward + loss": 0.0, "backward": 0.0, "optimizer step": 0.0, "zero_grad": 0.0}

    def step(timed: bool) -> None:
        marks = [time.perf_counter()]
        loss = objective(batch)["loss"]
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if timed:
            for name, start, end in zip(phases, marks, marks[1:]):
                phases[name] += end - start

    for _ in range(2):
        step(timed=False)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step(timed=True)
    total = sum(phases.values())
    print(f"model {args.model.name}, batch {args.batch}, {args.threads} threads, {args.steps} profiled steps: "
          f"{total / args.steps:.3f} s per step\n")
    print("| phase | s per step | share |\n|---|---:|---:|")
    for name, seconds in phases.items():
        print(f"| {name} | {seconds / args.steps:.3f} | {seconds / total:.1%} |")
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    all_self = sum(e.self_cpu_time_total for e in events)
    print("\n| operator | self CPU share | calls per step |\n|---|---:|---:|")
    for event in events[:10]:
        print(f"| `{event.key}` | {event.self_cpu_time_total / all_self:.1%} | {event.count // args.steps} |")


if __name__ == "__main__":
    main()

"""Where a training step's CPU time goes: torch.profiler over forward + loss + backward + AdamW.

    .venv/bin/python bench/profile_step.py [--precision bf16|fp32] [--model configs/models/bench-small.json] [--batch 128]

Prints the operators with the most self time and the share of each phase of the step; the phases
are timed separately (forward, backward, optimizer step, zero_grad) over a few steps after two warm-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_step(model_path: Path, batch_size: int, threads: int, precision: str, fused_attention: bool = True,
               text_length: int | None = None, overrides: tuple[str, ...] = ()):
    """clipx's training step on random inputs of the benchmark's shapes, as ``step(phases)``: forward
    with the loss under autocast (bf16) and the run's attention kernel (measured as train.attention=auto
    measures it), backward, fused AdamW, zero_grad; ``phases`` (a dict) accumulates each phase's seconds.
    ``fused_attention=False``: the towers keep open_clip's nn.MultiheadAttention (for the comparison).
    ``text_length``: tokens per caption (None: the context length); ``overrides``: config overrides."""
    from clipx.config import load_config
    from clipx.methods import build_model, build_objective
    from clipx.models.attention import AttentionKernel
    from clipx.train.optim import build_optimizer

    torch.set_num_threads(threads)
    config = load_config(REPO / "configs" / "bench-small.yaml", [f"model.name={model_path.resolve()}",
                                                                  "data.train=unused", *overrides])
    with contextlib.nullcontext() if fused_attention else unfused_attention():
        model = build_model(config)
    objective = build_objective(model, config)
    optimizer = build_optimizer(model, config.train)
    arch = config.model.arch
    size, context = arch["vision_cfg"]["image_size"], text_length or arch["text_cfg"]["context_length"]
    batch = {"image": torch.randn(batch_size, 3, size, size),
             "text": torch.randint(0, arch["text_cfg"]["vocab_size"], (batch_size, context))}

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    kernel = AttentionKernel("auto")
    with autocast():
        kernel.settle(lambda: objective.features(batch), backward=True)

    def step(phases: dict | None = None) -> None:
        marks = [time.perf_counter()]
        with autocast(), kernel.scope():
            loss = objective(batch)["loss"]
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if phases is not None:
            for name, start, end in zip(PHASES, marks, marks[1:]):
                phases[name] = phases.get(name, 0.0) + end - start

    return step, kernel.kernel


PHASES = ("forward + loss", "backward", "optimizer step", "zero_grad")


@contextlib.contextmanager
def unfused_attention():
    """Towers built inside keep open_clip's nn.MultiheadAttention (towers.py's swap made a no-op)."""
    from clipx.models import towers

    swap = towers.fuse_self_attention_
    towers.fuse_self_attention_ = lambda tower: tower
    try:
        yield
    finally:
        towers.fuse_self_attention_ = swap


def phase_seconds(model_path: Path, batch_size: int, threads: int, precision: str, steps: int = 5,
                  text_length: int | None = None) -> dict:
    """Seconds per step of each phase (compute only: no data loading), after two warm-up steps; and
    the whole step with open_clip's nn.MultiheadAttention instead of FusedSelfAttention, the two
    steps alternating (medians)."""
    step, kernel = build_step(model_path, batch_size, threads, precision, text_length=text_length)
    unfused, _ = build_step(model_path, batch_size, threads, precision, fused_attention=False, text_length=text_length)
    for _ in range(2):
        step()
        unfused()
    phases: dict = {}
    whole: dict = {"fused": [], "mha": []}
    for _ in range(steps):
        for name, run in (("fused", step), ("mha", unfused)):
            start = time.perf_counter()
            run(phases if name == "fused" else None)
            whole[name].append(time.perf_counter() - start)
    return {"attention_kernel": kernel, "phases": {name: seconds / steps for name, seconds in phases.items()},
            "step_seconds_median": {name: statistics.median(times) for name, times in whole.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "configs" / "models" / "bench-small.json")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()

    from clipx.train.host_memory import retain_freed_host_memory

    retain_freed_host_memory()
    step, kernel = build_step(args.model, args.batch, args.threads, args.precision)
    for _ in range(2):
        step()
    from torch.profiler import ProfilerActivity, profile

    phases: dict = {}
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step(phases)
    total = sum(phases.values())
    print(f"model {args.model.name}, batch {args.batch}, {args.precision}, attention kernel {kernel}, "
          f"{args.threads} threads, {args.steps} profiled steps: {total / args.steps:.3f} s per step\n")
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

"""What loader workers on the training process's cores cost a step: 2 workers against none, alternating.

    .venv/bin/python bench/loader_contention.py [--precision bf16] [--alternations 3] [--steps 30]
    .venv/bin/python bench/loader_contention.py --markdown runs/bench/loader_contention.json

clipx on `make bench`'s work (configs/bench-small.yaml, its shards and model file, batch 128, 2
threads), each run a fresh process timing its own loop: how long each step waited for its batch
(``fetch``) and how long the step itself took (``train_step``: forward, backward, guard, update),
medians over the steps after the first 5. With ``data.workers=0`` the batch is decoded in the
training process between steps, on both cores' time but never beside the step; with 2 workers
it is decoded beside the step, in processes that share the step's two cores. The step's
slow-down with workers, against the loader's own time per batch (the fetch without workers), says
what sharing the cores costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402

WARMUP_STEPS = 5


def timed_run(work: Path, precision: str, workers: int, steps: int) -> dict:
    """In this process: train, timing fetch and train_step per step; their medians in ms."""
    from bench.perf import CONFIG, MODEL, shard_pattern, write_bench_shards
    from clipx.config import load_config
    from clipx.train import loop

    shards = write_bench_shards(work / "perf", 64, 5120)
    config = load_config(CONFIG, [f"model.name={MODEL}", f"data.train={shard_pattern(shards)}",
                                  f"data.train_num_samples={128 * steps}", f"data.workers={workers}",
                                  f"train.steps={steps}", "train.threads=2", "train.plots=false",
                                  f"train.output_dir={work / 'loader_contention' / f'run-{workers}'}",
                                  f"train.precision={'bf16' if precision == 'bf16' else 'no'}"])
    seconds: dict[str, list[float]] = {"fetch": [], "train_step": []}

    def timing(name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            seconds[name].append(time.perf_counter() - started)
            return result
        return timed

    loop.fetch, loop.train_step = timing("fetch", loop.fetch), timing("train_step", loop.train_step)
    loop.train(config)
    return {name: 1000 * statistics.median(values[WARMUP_STEPS:]) for name, values in seconds.items()}


def measure(work: Path, precision: str, alternations: int, steps: int) -> dict:
    runs: dict[str, list[dict]] = {"0 workers": [], "2 workers": []}
    for index in range(alternations):
        for name in (list(runs) if index % 2 == 0 else list(runs)[::-1]):
            command = [sys.executable, __file__, "--child", name.split()[0], "--precision", precision,
                       "--steps", str(steps), "--work", str(work)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1200)
            if result.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
            runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"  {name}: {runs[name][-1]}", file=sys.stderr)
    medians = {name: {phase: statistics.median(r[phase] for r in values) for phase in ("fetch", "train_step")}
               for name, values in runs.items()}
    loader = medians["0 workers"]["fetch"]
    slowdown = medians["2 workers"]["train_step"] - medians["0 workers"]["train_step"]
    return {"command": "bench/loader_contention.py", "precision": precision, "steps": steps, "runs": runs,
            "medians": medians, "loader_ms_per_batch": loader, "step_slowdown_ms": slowdown,
            "slowdown_over_loader": slowdown / loader if loader > 0 else None}


def markdown(results: dict) -> str:
    lines = [f"Bench model, batch 128, {results['precision']}, {results['steps']} steps per run (first "
             f"{WARMUP_STEPS} dropped), {len(results['runs']['0 workers'])} runs each, alternating; median ms:", "",
             "| loader | waiting for the batch | the step | sum |", "|---|---:|---:|---:|"]
    for name, m in results["medians"].items():
        lines.append(f"| {name} | {m['fetch']:.1f} | {m['train_step']:.1f} | {m['fetch'] + m['train_step']:.1f} |")
    lines += ["", f"**With 2 workers on the step's cores the step is {results['step_slowdown_ms']:.0f} ms slower, "
              f"{results['slowdown_over_loader']:.2f}x the {results['loader_ms_per_batch']:.0f} ms the loader takes "
              "per batch on its own.**"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one timed run with this many workers
    add_report_arguments(parser, "loader_contention")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(timed_run(args.work, args.precision, args.child, args.steps)))
        return
    run_or_render(args, lambda: measure(args.work, args.precision, args.alternations, args.steps), markdown)


if __name__ == "__main__":
    main()

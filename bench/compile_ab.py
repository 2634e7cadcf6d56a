"""Does torch.compile pay for a clipx run, and after how many steps? Eager against compiled, alternating.

    .venv/bin/python bench/compile_ab.py [--precision bf16] [--alternations 3] [--steps 40]
    .venv/bin/python bench/compile_ab.py --markdown runs/bench/compile_ab.json

clipx on `make bench`'s work (configs/bench-small.yaml, its shards and model file, batch 128, 2
loader workers, 2 threads), `train.compile=false` and `train.compile=true`, one after the other,
the order reversed every other time; medians. Per run: the steady rate (the steps after the first
5, compilation among them) and the first step's seconds (worker start-up, the attention-kernel
measurement and, compiled, the compilation, from an empty compile cache as a first run pays it).
Compiling pays after

    (compiled first step - eager first step) / (eager seconds per step - compiled seconds per step)

steps, the figure behind `train.compile`'s default, false (clipx/config_schema.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.perf import MODEL, run_clipx, write_bench_shards  # noqa: E402

VARIANTS = {"eager": "train.compile=false", "compiled": "train.compile=true"}


def measure(work: Path, precision: str, alternations: int, steps: int, batch: int = 128) -> dict:
    shards = write_bench_shards(work / "perf", 64, 5120)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for index in range(alternations):
        for name in (list(VARIANTS) if index % 2 == 0 else list(VARIANTS)[::-1]):
            run_dir = work / "compile_ab" / "runs" / f"{name}-{index}"
            # An empty compile cache in every run (run_clipx empties run_dir first): the compile
            # time a first run pays, not a warm cache's few seconds.
            cold = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor-cache")}
            result = run_clipx(run_dir, shards, MODEL, batch, steps, workers=2, threads=2, precision=precision,
                               overrides=[VARIANTS[name]], env=cold)
            summary = json.loads((run_dir / "summary.json").read_text())
            if summary["compiled"] != (name == "compiled"):
                raise RuntimeError(f"the {name} run reports compiled={summary['compiled']}")
            runs[name].append({"samples_per_second": result["samples_per_second"],
                               "first_step_seconds": summary["first_step_seconds"]})
            print(f"  {name}: {result['samples_per_second']:.1f} samples/s, first step "
                  f"{summary['first_step_seconds']:.1f} s", file=sys.stderr)
    rate = {name: statistics.median(r["samples_per_second"] for r in values) for name, values in runs.items()}
    first = {name: statistics.median(r["first_step_seconds"] for r in values) for name, values in runs.items()}
    saved_per_step = batch / rate["eager"] - batch / rate["compiled"]
    extra = first["compiled"] - first["eager"]
    return {"command": "bench/compile_ab.py", "precision": precision, "batch": batch, "steps": steps, "runs": runs,
            "median_samples_per_second": rate, "median_first_step_seconds": first,
            "speedup": rate["compiled"] / rate["eager"], "compile_seconds": extra,
            "seconds_saved_per_step": saved_per_step,
            "break_even_steps": extra / saved_per_step if saved_per_step > 0 else None}


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [f"Bench model, batch {results['batch']}, {results['precision']}, {results['steps']} steps per run, "
             f"{len(runs['eager'])} runs each, alternating:", "",
             "| variant | samples/s (median) | runs | first step s (median) |", "|---|---:|---|---:|"]
    for name, values in runs.items():
        rates = ", ".join(f"{v['samples_per_second']:.1f}" for v in values)
        lines.append(f"| {name} | {results['median_samples_per_second'][name]:.1f} | {rates} | "
                     f"{results['median_first_step_seconds'][name]:.1f} |")
    even = results["break_even_steps"]
    lines += ["", f"**compiled / eager = {results['speedup']:.3f}** (steady state); compiling costs "
              f"{results['compile_seconds']:.1f} s and saves {1000 * results['seconds_saved_per_step']:.1f} ms "
              "per step: " + (f"**it pays after {even:.0f} steps**" if even is not None else "**it never pays**")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    add_report_arguments(parser, "compile_ab")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args.work, args.precision, args.alternations, args.steps), markdown)


if __name__ == "__main__":
    main()

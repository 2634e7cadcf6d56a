"""Does `train.retain_host_memory` (glibc malloc tuning, clipx/train/host_memory.py) still pay?

    .venv/bin/python bench/host_memory.py                       # writes runs/bench/host_memory.json
    .venv/bin/python bench/host_memory.py --markdown runs/bench/host_memory.json

The same `clipx train` run (bench/perf.py's model, shards and settings) with the setting on and off,
alternating on, off, off, on, ... so that drift on this shared machine hits both alike, in fp32
and in bf16 (where this CPU's speed is). Reported: the median samples/s of each, their ratio, and
the peak resident memory of the process tree (the setting's cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import run_or_render  # noqa: E402
from bench.perf import MODEL, run_clipx, write_bench_shards  # noqa: E402

SETTINGS = {"on": ["train.retain_host_memory=true"], "off": ["train.retain_host_memory=false"]}


def measure(args) -> dict:
    shards = write_bench_shards(args.work, args.image_size, args.batch * args.steps)
    results: dict = {"settings": vars(args) | {"work": str(args.work), "out": str(args.out), "model": str(args.model)}}
    for precision in args.precisions.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for index in range(args.alternations):
            order = list(SETTINGS) if index % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                run = args.work / "runs" / f"host-memory-{precision}-{name}-{index}"
                result = run_clipx(run, shards, args.model, args.batch, args.steps, args.workers, args.threads,
                                   precision, SETTINGS[name])
                runs[name].append(result)
                print(f"{precision} {name}: {result['samples_per_second']:.1f} samples/s, "
                      f"{result['peak_rss_mb']:.0f} MB", file=sys.stderr)
        results[precision] = {
            name: {"samples_per_second": statistics.median(r["samples_per_second"] for r in rs),
                   "runs": [round(r["samples_per_second"], 1) for r in rs],
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
            for name, rs in runs.items()}
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Settings: `{Path(s['model']).name}` at {s['image_size']} px, batch {s['batch']}, {s['steps']} steps "
             f"per run (first 5 dropped), {s['workers']} loader workers, {s['threads']} torch threads, "
             f"{s['alternations']} alternations.", "",
             "| precision | retain_host_memory | samples/s (median) | runs | peak RSS, MB (process tree) |",
             "|---|---|---:|---|---:|"]
    for precision in s["precisions"].split(","):
        for name, row in results[precision].items():
            lines.append(f"| {precision} | {name} | {row['samples_per_second']:.1f} | "
                         f"{', '.join(f'{r:.1f}' for r in row['runs'])} | {row['peak_rss_mb']:.0f} |")
    lines.append("")
    for precision in s["precisions"].split(","):
        on, off = (results[precision][n]["samples_per_second"] for n in ("on", "off"))
        lines.append(f"- {precision}: on / off = **{on / off:.3f}**")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "perf")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "host_memory.json")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alternations", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json", help="print saved results as a table")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()

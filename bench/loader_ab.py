"""clipx's training loader alone at this checkout against an earlier commit, on `make bench`'s work.

    .venv/bin/python bench/loader_ab.py --baseline REV [--workers 1 2] [--alternations 5]

The baseline is checked out with `git worktree` into the work folder for the run and removed after
it (an existing checkout of that commit is reused and left); each measurement is a fresh
process whose PYTHONPATH puts one checkout first, running bench/perf.py's loader_throughput (decode,
augment, tokenize and collate of batches of 128, no model) on the same shards. The two checkouts
alternate, and the table gives medians. Prints a Markdown table; writes runs/bench/loader_ab.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.perf import MODEL, write_bench_shards  # noqa: E402

PROBE = ("import json, sys; from pathlib import Path; from bench.perf import loader_throughput; "
         "print(json.dumps(loader_throughput(Path(sys.argv[1]), Path(sys.argv[2]), 128, int(sys.argv[3]))))")


@contextlib.contextmanager
def checkout(work: Path, rev: str) -> Iterator[Path]:
    """A worktree of ``rev`` under ``work`` for the block: added, then removed, so the repository
    keeps no stray worktree; one that already exists is reused and left as it was."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    tree = work / f"baseline-{commit[:10]}"
    added = not tree.exists()
    if added:
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True,
                       capture_output=True)
    try:
        yield tree
    finally:
        if added:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


def loader_rate(tree: Path, shards: Path, workers: int) -> float:
    # The bench's data and model come from this checkout; the code under test from ``tree``.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(shards), str(MODEL), str(workers)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["samples_per_second"]


def measure(args) -> dict:
    shards = write_bench_shards(args.work / "perf", 64, 128 * 40)
    with checkout(args.work, args.baseline) as baseline:
        trees = {"baseline": baseline, "this checkout": REPO}
        rates: dict[str, dict[str, list[float]]] = {str(w): {name: [] for name in trees} for w in args.workers}
        for index in range(args.alternations):
            for workers in args.workers:
                for name in (list(trees) if index % 2 == 0 else list(trees)[::-1]):
                    rates[str(workers)][name].append(loader_rate(trees[name], shards, workers))
                    print(f"  {workers} worker(s), {name}: {rates[str(workers)][name][-1]:.0f} samples/s",
                          file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"baseline": args.baseline, "head": commit.strip(), "runs": rates}


def markdown(results: dict) -> str:
    lines = [f"Loader alone, batch 128, {MODEL.name}'s shards; medians of alternating runs. Baseline "
             f"{results['baseline']}, this checkout {results['head']}.", "",
             "| workers | baseline samples/s | this checkout samples/s | speed-up | runs (baseline; this checkout) |",
             "|---:|---:|---:|---:|---|"]
    for workers, by_tree in results["runs"].items():
        base, head = statistics.median(by_tree["baseline"]), statistics.median(by_tree["this checkout"])
        runs = "; ".join(", ".join(f"{r:.0f}" for r in by_tree[name]) for name in ("baseline", "this checkout"))
        lines.append(f"| {workers} | {base:.0f} | {head:.0f} | {head / base:.2f}x | {runs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (any git revision)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--alternations", type=int, default=5)
    add_report_arguments(parser, "loader_ab")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
